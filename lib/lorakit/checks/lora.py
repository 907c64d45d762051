"""Checks for lesson 02 (LoRA from scratch), judged (see lorakit.checks.judged).

Each check builds its own small layers, or a small Llama (the embedded model's shapes, two layers, for the
notebook's own call; other shapes when graded), from weights and seeds drawn by the grader. The probe runs
the learner's code on them and returns what came out (outputs, gradients, weights, names); the judge builds
the same layers with lorakit.lora, the lesson's reference, and compares. Adapters are set to drawn non-zero
values through the learner's own objects before outputs are compared: with B = 0 doing nothing gives the
right answer. Every weight a check keeps comes from a seeded torch Generator (`lorakit.models.seeded_llama`,
drawn tensors), never from torch's global generator, so that judging many submissions at once in threads gives
the verdicts each gets alone.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.checks import CheckFailed, close, expect
from lorakit.checks.judged import as_tensor, data_or_repr, expect_callable, judged_check
from lorakit.checks.llama import (alpha_for, draw_adapters, has_adapters, linear_shapes, logits, set_adapters,
                                  set_drawn_adapters, small_config)
from lorakit.models import building, seeded_llama


# ------------------------------------------------------------------------------- small models, adapters

def _seed_adapters(model, seed: int) -> None:
    """LoRA's initialisation (A kaiming-uniform in +-1/sqrt(in), B zero) for every layer with adapters, drawn
    from a Generator seeded with `seed` in module-name order: what LoRALinear would draw from the global one."""
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for _, m in sorted(model.named_modules(), key=lambda nm: nm[0]):
            if has_adapters(m):
                A = m.lora_A.weight
                A.copy_((torch.rand(A.shape, generator=g) * 2 - 1) / math.sqrt(A.shape[1]))
                m.lora_B.weight.zero_()


def expected_trainable(config: dict, r: int, target_modules) -> int:
    """lorakit.memory's count from the config, checked against peft's on the same model."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig

    from lorakit.memory import lora_parameters

    with warnings.catch_warnings(), building():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(seeded_llama(config), LoraConfig(r=r, lora_alpha=r, target_modules=list(target_modules)))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    counted = lora_parameters(LlamaConfig(**config), r, list(target_modules))
    if trainable != counted:  # the kit disagrees with peft: a grader error, never the learner's failed check
        raise RuntimeError(f"lorakit.memory.lora_parameters says {counted:,} but peft trains {trainable:,}")
    return counted


def _model_inputs(rng, grading_targets) -> dict:
    cfg = small_config(rng if rng.grading else None)
    targets, r, alpha = (["q_proj", "v_proj"], 8, 16)
    if rng.grading:
        targets, r = rng.sample(grading_targets, rng.integer(1, 2)), rng.choice([1, 2, 4, 8])
        alpha = alpha_for(rng, r, [1, 4, 8, 16])
    return {"config": cfg, "seed": rng.new_seed(), "targets": sorted(targets), "r": r, "alpha": alpha,
            "ids": rng.randint(0, cfg["vocab_size"], (2, 12))}


# ---------------------------------------------------------------------------------- ex02_break_even_rank

@judged_check
class break_even_rank:
    """`break_even_rank(d_in, d_out)`: the largest rank at which A (r x d_in) and B (d_out x r) hold fewer numbers
    than the d_out x d_in weight W, built on lesson 01's count r * (d_in + d_out)."""
    answer = {"ranks": [object]}
    reference = ("lorakit.lora.break_even_rank",)

    def draw(rng):
        cases = [[4000, 5000], [4096, 4096], [4096, 11008], [192, 512], [1, 3], [2, 3]]
        if rng.grading:
            cases = [cases[0]] + [[rng.integer(1, 20_000), rng.integer(1, 20_000)] for _ in range(4)]
            side = 2 * rng.integer(1, 2048)  # a square W of even side: r = side / 2 gives exactly W's count
            cases.append([side, side])
            # d_in * d_out - 1 a multiple of d_in + d_out (d_out = a^2 - a + 1): "fewer than W" has no slack
            a = rng.integer(2, 100)
            cases.append([a, a * a - a + 1])
        return {"cases": cases}

    def probe(inputs, fn):
        expect_callable(fn, "break_even_rank")
        return {"ranks": [data_or_repr(fn(*case)) for case in inputs["cases"]]}

    def judge(inputs, answer):
        expect(len(answer["ranks"]) == len(inputs["cases"]), "`break_even_rank` should return one number per call.")
        for (d_in, d_out), got in zip(inputs["cases"], answer["ranks"]):
            want = (d_in * d_out - 1) // (d_in + d_out)
            hint = ("A and B hold r * (d_in + d_out) numbers and W holds d_in * d_out: return the largest whole r with "
                    "r * (d_in + d_out) < d_in * d_out.")
            if type(got) is int and got == want + 1 and got * (d_in + d_out) == d_in * d_out:
                hint = f"at r = {got} A and B hold exactly as many numbers as W: the rank must give fewer."
            elif type(got) is float:
                hint = "a rank is a whole number: return an int (floor division, //)."
            expect(type(got) is int and got == want,
                   f"W of {d_out} x {d_in}: expected r = {want:,} (A and B then hold {want * (d_in + d_out):,} numbers, "
                   f"W {d_in * d_out:,}), found {got!r}.", hint)
        return ("a 5000 x 4000 weight: LoRA holds fewer numbers than W up to r = 2,222; the usual ranks, 4 to 64, "
                "are far below")


# ------------------------------------------------------------------------------------ ex02_lora_linear

def _layer_inputs(rng, d_in, d_out, r, alpha) -> dict:
    return {"d_in": d_in, "d_out": d_out, "r": r, "alpha": alpha,
            "W": rng.randn(d_out, d_in) / math.sqrt(d_in), "b": rng.randn(d_out) * 0.1, "x": rng.randn(4, 5, d_in),
            "A": rng.randn(r, d_in) / math.sqrt(d_in), "B": rng.randn(d_out, r) * 0.1}


def _one_hot_rows(rng, n: int, d_in: int) -> torch.Tensor:
    """n inputs with one non-zero feature each: dropout on a layer's input either keeps that feature (scaled
    by 1 / (1 - p)) or drops it, so each row's adapter output is all or nothing, which the judge can check."""
    x = torch.zeros(n, d_in)
    x[torch.arange(n), rng.randint(0, d_in, (n,))] = 1 + rng.rand(n)
    return x


def _base(inputs) -> nn.Linear:
    with building():
        base = nn.Linear(inputs["d_in"], inputs["d_out"])
    with torch.no_grad():
        base.weight.copy_(inputs["W"])
        base.bias.copy_(inputs["b"])
    return base


def _build(cls, base, r, alpha, **kw):
    try:
        return cls(base, r, alpha, **kw)
    except TypeError as e:
        raise CheckFailed(f"`LoRALinear(base, r, alpha, dropout=..., use_rslora=...)` could not be called: {e}.") from e


def _has(layer, names) -> None:
    for name in names:
        expect(hasattr(layer, name), f"your LoRALinear has no attribute `{name}`.",
               "use peft's names: base_layer, lora_A, lora_B, lora_dropout, scaling, merged.")
    for name in ("lora_A", "lora_B"):
        if name in names:
            expect(isinstance(getattr(layer, name), nn.Linear),
                   f"`{name}` should be an nn.Linear; found {type(getattr(layer, name)).__name__}.")


def _reference(inputs, A=None, B=None, **kw):
    """lorakit.lora's LoRALinear on the same base weights, with the given adapters."""
    from lorakit.lora import LoRALinear
    with building():
        ref = LoRALinear(_base(inputs), inputs["r"], inputs["alpha"], **kw)
    with torch.no_grad():
        ref.lora_A.weight.copy_(inputs["A"] if A is None else A)
        ref.lora_B.weight.copy_(inputs["B"] if B is None else B)
    return ref


DROPOUT = 0.5     # the dropout the check asks for: a row keeps its feature (x 2) or loses it
INIT_SHAPE = (64, 256, 16)   # (out, in, r) of the layer whose lora_A is checked for kaiming-uniform: 4,096 draws


@judged_check
class lora_linear:
    """Shapes, peft's initialisation, scaling (and rsLoRA's), outputs and gradients with drawn non-zero adapters,
    dropout on the adapter's input only (train vs eval), and what trains."""
    answer = {"same_base": bool, "A_init": torch.Tensor, "B_init": torch.Tensor, "A_big": torch.Tensor,
              "no_bias": [bool], "scaling": object, "rs_scaling": object, "y_init": torch.Tensor,
              "y": (torch.Tensor, None), "grads": (dict, None), "y_rs": (torch.Tensor, None), "frozen": [str],
              "trainable": [str], "y_drop0": torch.Tensor, "y_train": (torch.Tensor, None), "y_eval": (torch.Tensor, None),
              "devices": [str]}
    reference = ("lorakit.lora.LoRALinear",)
    reported = {"same_base": "whether base_layer is the very object given: identity lives in the learner's process",
                "no_bias": "whether lora_A/lora_B have a bias (a random bias would also fail the outputs)",
                "frozen": "which base parameters still require gradients: a flag of the learner's objects",
                "trainable": "the names of the parameters that require gradients",
                "devices": "the devices lora_A and lora_B were made on, for a base layer on the meta device"}

    def draw(rng):
        if rng.grading:
            r = rng.integer(2, 16)   # at r = 1, sqrt(r) = r and B * A broadcasts to B @ A: slips would not show
            inputs = _layer_inputs(rng, rng.integer(16, 300), rng.integer(8, 200), r, alpha_for(rng, r, [1, 3, 4, 8, 16, 32]))
        else:
            inputs = _layer_inputs(rng, 256, 96, 8, 16)
        inputs["x_drop"] = _one_hot_rows(rng, 48, inputs["d_in"])
        return inputs

    def probe(inputs, cls):
        expect_callable(cls, "LoRALinear")
        r, alpha, x = inputs["r"], inputs["alpha"], inputs["x"]
        base = _base(inputs)
        layer = _build(cls, base, r, alpha)
        _has(layer, ("base_layer", "lora_A", "lora_B", "lora_dropout", "scaling"))
        out_f, in_f, big_r = INIT_SHAPE
        big = _build(cls, nn.Linear(in_f, out_f), big_r, big_r)
        _has(big, ("lora_A",))
        rs = _build(cls, _base(inputs), r, alpha, use_rslora=True)
        out = {"same_base": layer.base_layer is base, "A_init": as_tensor(layer.lora_A.weight), "B_init": as_tensor(layer.lora_B.weight),
               "A_big": as_tensor(big.lora_A.weight), "no_bias": [layer.lora_A.bias is None, layer.lora_B.bias is None],
               "scaling": data_or_repr(layer.scaling), "rs_scaling": data_or_repr(getattr(rs, "scaling", None)),
               "y_init": as_tensor(layer(x)), "y": None, "grads": None, "y_rs": None}
        if set_adapters(layer, inputs["A"], inputs["B"]):
            layer.zero_grad(set_to_none=True)
            y = layer(x)
            y.square().mean().backward()
            out["y"] = as_tensor(y)
            out["grads"] = {k: None if g is None else as_tensor(g) for k, g in
                            (("A", layer.lora_A.weight.grad), ("B", layer.lora_B.weight.grad))}
        _has(rs, ("lora_A", "lora_B"))
        if set_adapters(rs, inputs["A"], inputs["B"]):
            with torch.no_grad():
                out["y_rs"] = as_tensor(rs(x))
        out["frozen"] = [n for n, p in layer.base_layer.named_parameters() if p.requires_grad or p.grad is not None]
        out["trainable"] = sorted(n for n, p in layer.named_parameters() if p.requires_grad)
        elsewhere = _build(cls, nn.Linear(inputs["d_in"], inputs["d_out"], device="meta"), r, alpha)
        out["devices"] = [str(getattr(getattr(elsewhere, k, None), "weight", torch.empty(0)).device.type)
                          for k in ("lora_A", "lora_B")]
        drop = _build(cls, _base(inputs), r, alpha, dropout=DROPOUT)
        _has(drop, ("lora_A", "lora_B"))
        drop.train()
        out["y_drop0"] = as_tensor(drop(x))
        out["y_train"] = out["y_eval"] = None
        if set_adapters(drop, inputs["A"], inputs["B"]):
            with torch.no_grad():
                out["y_train"] = as_tensor(drop(inputs["x_drop"]))
                drop.eval()
                out["y_eval"] = as_tensor(drop(x))
        return out

    def judge(inputs, a):
        d_in, d_out, r, alpha, x = inputs["d_in"], inputs["d_out"], inputs["r"], inputs["alpha"], inputs["x"]
        expect(a["same_base"], "`base_layer` should be the very nn.Linear you were given (not a copy).")
        A, B = a["A_init"], a["B_init"]
        expect(tuple(A.shape) == (r, d_in), f"lora_A.weight should have shape (r, in) = {(r, d_in)}; found {tuple(A.shape)}.",
               "nn.Linear(in_features, r, bias=False) stores its weight as (r, in_features).")
        expect(tuple(B.shape) == (d_out, r), f"lora_B.weight should have shape (out, r) = {(d_out, r)}; found {tuple(B.shape)}.")
        expect(all(a["no_bias"]), "lora_A and lora_B should have no bias (bias=False).")
        expect(close(a["scaling"], alpha / r), f"alpha={alpha}, r={r}: scaling should be alpha / r = {alpha / r:g}; "
                                              f"found {a['scaling']!r}.")
        expect(close(a["rs_scaling"], alpha / math.sqrt(r)), f"with use_rslora=True scaling should be alpha / sqrt(r) = "
               f"{alpha / math.sqrt(r):.4f}; found {a['rs_scaling']!r}.")
        expect(B.is_floating_point() and torch.count_nonzero(B) == 0,
               "lora_B should start at zero, so the adapted layer starts equal to the base layer.")
        # kaiming-uniform with a = sqrt(5) is uniform in +-1/sqrt(in): every value inside the bound, the largest
        # of 4,096 draws of a larger layer within 2% of it, and their spread within 5% of a uniform's (bound /
        # sqrt 3; the estimate's own error is about 0.7%, so correct work passes whatever the draws).
        out_f, in_f, big_r = INIT_SHAPE
        big, bound = a["A_big"], 1 / math.sqrt(in_f)
        ok = tuple(big.shape) == (big_r, in_f) and big.is_floating_point() and A.is_floating_point()
        spread = big.float().std().item() if ok else float("nan")
        expect(ok and A.abs().max() <= 1 / math.sqrt(d_in) + 1e-6 and 0.98 * bound <= big.abs().max() <= bound + 1e-6
               and abs(spread - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3),
               f"lora_A should be kaiming-uniform with a = sqrt(5): uniform in +-1/sqrt(in); for in={in_f} that is "
               f"+-{bound:.4f} with std {bound / math.sqrt(3):.4f}; found values up to "
               f"{big.abs().max().item() if ok else float('nan'):.4f} with std {spread:.4f}.",
               "nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5)).")
        base_y = F.linear(x, inputs["W"], inputs["b"])
        y0 = a["y_init"]
        expect(tuple(y0.shape) == tuple(base_y.shape) and y0.is_floating_point(),
               f"output shape: expected {tuple(base_y.shape)}, found {tuple(y0.shape)}.")
        expect(torch.allclose(y0.float(), base_y, atol=1e-5), "at initialisation the output should equal the base "
               "layer's output (B is zero).", "forward = base_layer(x) + lora_B(lora_A(lora_dropout(x))) * scaling.")
        ref = _reference(inputs)
        want = ref(x)
        want.square().mean().backward()
        want = want.detach()
        expect(_same(a["y"], want, 1e-5), "with a non-zero B the output should be base(x) + (x A^T B^T) * scaling; "
               "it is not.", "did you multiply by `scaling`, and apply A before B?")
        grads = a["grads"] or {}
        expect(isinstance(grads.get("A"), torch.Tensor) and isinstance(grads.get("B"), torch.Tensor),
               "lora_A and lora_B should receive gradients.")
        for k, g in (("A", ref.lora_A.weight.grad), ("B", ref.lora_B.weight.grad)):
            expect(_same(grads[k], g, 1e-6, rtol=1e-4),
                   f"the gradient of lora_{k} differs from what backpropagation through base(x) + B A x * scaling gives.")
        with torch.no_grad():
            want_rs = _reference(inputs, use_rslora=True)(x)
        expect(_same(a["y_rs"], want_rs, 1e-5), "with use_rslora=True the output should be base(x) + (x A^T B^T) * "
               "alpha / sqrt(r); it is not.", "forward should multiply by self.scaling, whatever __init__ set it to.")
        expect(not a["frozen"], f"the base layer's {a['frozen']} still require gradients: LoRA freezes the pretrained "
               "weights.", "call p.requires_grad_(False) on every parameter of base_layer.")
        expect(a["trainable"] == ["lora_A.weight", "lora_B.weight"],
               f"only lora_A.weight and lora_B.weight should be trainable; found {a['trainable']}.")
        expect(a["devices"] == ["meta", "meta"], f"for a base layer on the meta device, lora_A and lora_B were made on "
               f"{a['devices']}: make them on the base weight's device.", "nn.Linear(..., device=base.weight.device).")
        # Dropout belongs to the adapter's input only: with B = 0 the output is the base output even in train
        # mode; in eval mode dropout does nothing; in train mode each one-feature input row keeps its feature
        # (the adapter's output doubles, 1 / (1 - 0.5)) or loses it (the adapter adds nothing).
        expect(_same(a["y_drop0"], base_y, 1e-5), "with dropout and B = 0 the output changed: dropout must act on "
               "the adapter's input only, never on the frozen path.", "base_layer(x) + lora_B(lora_A(lora_dropout(x))) * scaling.")
        expect(_same(a["y_eval"], want, 1e-5), f"with dropout={DROPOUT} in eval() mode the output should be the same as "
               "without dropout.")
        with torch.no_grad():
            ref = _reference(inputs).eval()
            xd = inputs["x_drop"]
            base_d, delta = F.linear(xd, inputs["W"], inputs["b"]), ref(xd) - F.linear(xd, inputs["W"], inputs["b"])
        y_train = a["y_train"]
        ok = _same(y_train, base_d, float("inf"))
        if ok:
            kept = ((y_train - base_d - delta / (1 - DROPOUT)).abs() <= 1e-5 + 1e-4 * delta.abs()).all(dim=1)
            dropped = ((y_train - base_d).abs() <= 1e-5).all(dim=1)
            ok = bool((kept | dropped).all()) and bool(kept.any()) and bool(dropped.any())
        expect(ok, f"with dropout={DROPOUT} in train() mode, on inputs with one non-zero feature each, every row's adapter "
               "output should be either dropped (the base output alone) or kept and scaled by 1 / (1 - p); it is not.",
               "self.lora_dropout = nn.Dropout(dropout), applied to x before lora_A (not to lora_A's or lora_B's "
               "output), in forward.")
        return (f"LoRALinear: A {tuple(A.shape)} kaiming-uniform, B {tuple(B.shape)} zeros, scaling alpha/r, output equals "
                f"the base layer at init and the reference with drawn adapters, dropout on the adapter only, only A "
                f"and B get gradients")


def _same(got, want: torch.Tensor, atol: float, rtol: float = 1e-5) -> bool:
    """`got` (data from the probe) is a float tensor of `want`'s shape, allclose to it."""
    return (isinstance(got, torch.Tensor) and got.is_floating_point() and tuple(got.shape) == tuple(want.shape)
            and (atol == float("inf") or torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol)))


@judged_check
class lora_merge:
    """merge() folds B A into the base weight without changing outputs; twice warns; unmerge() undoes it."""
    answer = {"adapters_set": bool, "y0": torch.Tensor, "merged": object, "W_merged": torch.Tensor, "y_merged": torch.Tensor,
              "W_twice": torch.Tensor, "warned": bool, "unmerged": object, "W_unmerged": torch.Tensor, "y_unmerged": torch.Tensor}
    reference = ("lorakit.lora.LoRALinear",)
    reported = {"adapters_set": "whether lora_A and lora_B had the shapes to take the drawn adapters",
                "merged": "the learner's `merged` flag after merge()", "unmerged": "the `merged` flag after unmerge()",
                "warned": "whether merging twice raised a warning: only the learner's process sees it"}

    def draw(rng):
        if rng.grading:
            r = rng.integer(2, 8)
            return _layer_inputs(rng, rng.integer(8, 200), rng.integer(8, 200), r, alpha_for(rng, r, [1, 3, 8, 16]))
        return _layer_inputs(rng, 64, 48, 4, 8)

    def probe(inputs, cls):
        expect_callable(cls, "LoRALinear")
        x = inputs["x"]
        base = _base(inputs)
        layer = _build(cls, base, inputs["r"], inputs["alpha"])
        _has(layer, ("base_layer", "lora_A", "lora_B", "scaling"))
        out = {"adapters_set": set_adapters(layer, inputs["A"], inputs["B"])}
        layer.eval()
        out["y0"] = as_tensor(layer(x))
        layer.merge()
        out.update(merged=data_or_repr(getattr(layer, "merged", None)), W_merged=as_tensor(base.weight), y_merged=as_tensor(layer(x)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer.merge()
        out.update(W_twice=as_tensor(base.weight), warned=bool(caught))
        layer.unmerge()
        out.update(unmerged=data_or_repr(getattr(layer, "merged", None)), W_unmerged=as_tensor(base.weight), y_unmerged=as_tensor(layer(x)))
        return out

    def judge(inputs, a):
        expect(a["adapters_set"], f"lora_A and lora_B should have shapes ({inputs['r']}, in) and (out, {inputs['r']}).")
        W = inputs["W"]
        with torch.no_grad():
            y0 = _reference(inputs).eval()(inputs["x"])
        expect(_same(a["y0"], y0, 1e-5), "before merging, the output should be base(x) + B A x * scaling.")
        delta = inputs["B"] @ inputs["A"] * (inputs["alpha"] / inputs["r"])
        expect(a["merged"] is True, "after merge() `merged` should be True.")
        expect(_same(a["W_merged"], W + delta, 1e-6), "merge() should add (B @ A) * scaling to base_layer.weight.",
               "under torch.no_grad(): self.base_layer.weight += (self.lora_B.weight @ self.lora_A.weight) * self.scaling")
        expect(_same(a["y_merged"], y0, 1e-5), "after merging, the output should equal the unmerged output, "
               "and it does not.", "once merged, forward should return base_layer(x) alone (B A is inside its weight now).")
        expect(_same(a["W_twice"], W + delta, 1e-6), "merging twice added B A twice: the second merge() "
               "should do nothing.", "check `self.merged` first.")
        expect(a["warned"], "merging twice should warn the user (warnings.warn) that the layer is already merged.")
        expect(a["unmerged"] is False, "after unmerge() `merged` should be False.")
        expect(_same(a["W_unmerged"], W, 1e-6), "unmerge() should subtract exactly what merge() added.")
        expect(_same(a["y_unmerged"], y0, 1e-5), "after unmerge() the output should be what it was before merging.")
        return ("merge() keeps outputs equal (max difference "
                f"{(a['y_merged'] - y0).abs().max().item():.1e}), merging twice warns and changes nothing, unmerge() undoes it")


# ------------------------------------------------------------------------------------- ex02_inject_lora

def _reference_model(inputs):
    """The inputs' small Llama with lorakit.lora's adapters on the targets, set to the drawn adapters."""
    from lorakit.lora import inject_lora as reference_inject
    model = seeded_llama(inputs["config"], inputs["seed"])
    with building():
        reference_inject(model, inputs["targets"], r=inputs["r"], alpha=inputs["alpha"])
    set_drawn_adapters(model, inputs["adapters"])
    return model


NO_MATCH = (("no_such_layer",), ("proj",))   # targets that match no layer of a Llama under peft's rule


@judged_check
class inject_lora:
    """On a small Llama: the count returned and the parameters that train, drawn non-zero adapters set through
    the learner's layers give the reference's logits, logits unchanged right after injection (B = 0), and a
    name that matches nothing raises."""
    answer = {"n": object, "wrapped": [str], "trainable": [str], "n_trainable": int, "before": torch.Tensor,
              "after": torch.Tensor, "adapters_set": [str], "adapted": torch.Tensor, "raised": [(str, None)]}
    reference = ("lorakit.lora.inject_lora", "lorakit.lora.replace_linears")
    reported = {"wrapped": "which modules are instances of the learner's class: names only the probe sees",
                "trainable": "the names of the parameters that require gradients",
                "adapters_set": "which target layers took the drawn adapters (the logits show whether they work)",
                "before": "the logits of the model the check built, before the learner's code ran on it: the two "
                          "sides built the same model",
                "raised": "the types of the exceptions raised for targets that match nothing"}

    def draw(rng):
        inputs = _model_inputs(rng, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
        inputs["adapters"] = draw_adapters(rng, inputs["config"], inputs["targets"], inputs["r"])
        return inputs

    def probe(inputs, fn, cls):
        expect_callable(fn, "inject_lora")
        model = seeded_llama(inputs["config"], inputs["seed"])
        before = logits(model, inputs["ids"])
        n = fn(model, inputs["targets"], r=inputs["r"], alpha=inputs["alpha"])
        out = {"n": data_or_repr(n), "before": before,
               "wrapped": sorted(name for name, m in model.named_modules() if isinstance(cls, type) and isinstance(m, cls)),
               "trainable": [name for name, p in model.named_parameters() if p.requires_grad],
               "n_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "after": logits(model, inputs["ids"]), "adapters_set": set_drawn_adapters(model, inputs["adapters"])}
        out["adapted"] = logits(model, inputs["ids"])
        out["raised"] = []
        for targets in NO_MATCH:
            try:
                fn(seeded_llama(inputs["config"], inputs["seed"]), list(targets), r=inputs["r"], alpha=inputs["alpha"])
                out["raised"].append(None)
            except Exception as e:  # noqa: BLE001 - the learner may pick the exception type
                out["raised"].append(type(e).__name__)
        return out

    def judge(inputs, a):
        cfg, targets, r = inputs["config"], inputs["targets"], inputs["r"]
        expected = expected_trainable(cfg, r, targets)
        n = a["n"]
        expect(type(n) is int and n == expected, f"inject_lora should return the number of trainable parameters: expected "
               f"{expected:,} (r * (in + out) summed over every {' and '.join(targets)}), found {n!r}.",
               "return sum(p.numel() for p in model.parameters() if p.requires_grad).")
        expect(a["n_trainable"] == expected, f"{a['n_trainable']:,} parameters of the model require gradients after "
               f"inject_lora; expected {expected:,}, the adapters' parameters only.",
               "freeze every parameter of the model first (requires_grad_(False)), then wrap the targets.")
        want = list(inputs["adapters"])
        expect(a["wrapped"] == want, f"expected these layers to become LoRALinear: {want}; found {a['wrapped']}.",
               "match a module when its name ends with '.' + one of target_modules, then setattr it on its parent.")
        stray = [name for name in a["trainable"] if ".lora_A." not in name and ".lora_B." not in name]
        expect(not stray, f"only the adapters should train, but these require gradients too: {stray[:4]}.",
               "freeze every parameter of the model first (requires_grad_(False)), then wrap the targets.")
        base = logits(seeded_llama(cfg, inputs["seed"]), inputs["ids"])
        expect(_same(a["before"], base, 1e-5), "the model the check built gave other logits than the same model built "
               "by the grader.")
        expect(_same(a["after"], base, 1e-5), "right after inject_lora the model's logits changed: B starts at zero, so "
               "they should not.")
        missing = [name for name in want if name not in a["adapters_set"]]
        expect(not missing, f"these layers have no lora_A / lora_B of shapes (r, in) and (out, r) to take adapters: "
               f"{missing[:4]}.", "wrap every target with your LoRALinear(module, r, alpha).")
        ref = logits(_reference_model(inputs), inputs["ids"])
        diff = (a["adapted"].float() - ref).abs().max().item() if _same(a["adapted"], ref, float("inf")) else float("inf")
        expect(diff <= 1e-4 * max(1.0, ref.abs().max().item()), f"with non-zero adapters set in your layers, the "
               f"model's logits differ from the reference LoRA model's by up to {diff:.3g}.",
               "wrap each target with LoRALinear(module, r, alpha) (scaling alpha / r); if the LoRALinear check fails "
               "too, fix LoRALinear first.")
        raised = dict(zip((t[0] for t in NO_MATCH), a["raised"]))
        expect(len(a["raised"]) == len(NO_MATCH) and raised.get("no_such_layer") is not None,
               "target_modules=['no_such_layer'] matched nothing, and inject_lora said nothing: it should raise an "
               "error (a ValueError) that names what was given.", "a typo in target_modules is the most common LoRA "
               "bug: fail loudly instead of training nothing.")
        expect(raised.get("proj") is not None, "target_modules=['proj'] matches no layer under peft's rule (a module's "
               "full name equals a target or ends with '.' + target), and inject_lora did not raise: it wrapped layers "
               "whose names merely end with 'proj'.", "match with name == t or name.endswith('.' + t).")
        return (f"inject_lora wrapped {len(a['wrapped'])} layers and returns {n:,} trainable parameters, equal to "
                f"lorakit.memory.lora_parameters and to peft's count; with drawn adapters the logits equal the reference's")


# ------------------------------------------------------------------------------------ ex02_training_step

def _optimizer(name: str, params, lr: float):
    return torch.optim.AdamW(params, lr=lr) if name == "adamw" else torch.optim.SGD(params, lr=lr)


def _trained(inputs, step):
    """Run `step` (the learner's training_step, or the reference) on the inputs' model; (model, results)."""
    from lorakit.lora import inject_lora as reference_inject
    model = seeded_llama(inputs["config"], inputs["seed"]).train()
    with building():
        reference_inject(model, inputs["targets"], r=inputs["r"], alpha=inputs["alpha"])
    _seed_adapters(model, inputs["seed"] + 1)
    opt = _optimizer(inputs["optimizer"], [p for p in model.parameters() if p.requires_grad], inputs["lr"])
    ids = inputs["ids"]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    return model, [step(model, batch, opt) for _ in range(inputs["steps"])]


@judged_check
class training_step:
    """A few steps on one batch: the loss of each step, the adapters and the model's logits after them, only
    the adapters move, gradients are cleared."""
    answer = {"losses": [object], "leftover": [str], "moved": [str], "adapters": dict, "logits": torch.Tensor}
    reference = ("lorakit.train.training_step",)
    reported = {"leftover": "which parameters still hold a gradient after the last step: only the probe sees them",
                "moved": "which frozen parameters changed (the logits after the steps show it too)"}

    def draw(rng):
        inputs = _model_inputs(rng, ["q_proj", "v_proj", "k_proj", "o_proj"])
        inputs["ids"] = rng.randint(0, inputs["config"]["vocab_size"], (4, 16))
        inputs.update(optimizer="adamw", lr=1e-2, steps=6)
        if rng.grading:
            inputs.update(optimizer=rng.choice(["adamw", "sgd"]), steps=rng.integer(3, 6))
            inputs["lr"] = rng.choice([1e-2, 3e-3]) if inputs["optimizer"] == "adamw" else rng.choice([0.1, 0.5])
        return inputs

    def probe(inputs, fn):
        from lorakit.lora import lora_state_dict
        expect_callable(fn, "training_step")
        frozen = {n: as_tensor(p) for n, p in seeded_llama(inputs["config"], inputs["seed"]).named_parameters()}
        model, losses = _trained(inputs, fn)
        return {"losses": [data_or_repr(v) for v in losses],
                "leftover": [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0],
                "moved": [n for n, p in model.named_parameters()
                          if not p.requires_grad and n in frozen and not torch.equal(p, frozen[n])],
                "adapters": {k: as_tensor(v) for k, v in lora_state_dict(model).items()},
                "logits": logits(model.eval(), inputs["ids"])}

    def judge(inputs, a):
        from lorakit.lora import lora_state_dict
        from lorakit.train import training_step as reference_step
        losses = a["losses"]
        expect(len(losses) == inputs["steps"] and all(type(v) is float for v in losses), "training_step should return "
               f"the loss as a Python float (loss.item()); found {type(losses[0]).__name__ if losses else 'nothing'}.")
        expect(not a["leftover"], f"gradients are left over after the step ({a['leftover'][:2]}...): the next step would "
               "add to them.", "call optimizer.zero_grad() after optimizer.step().")
        expect(not a["moved"], f"frozen weights changed: {a['moved'][:3]}.")
        model, want = _trained(inputs, reference_step)
        expect(all(math.isclose(g, w, rel_tol=1e-3, abs_tol=1e-5) for g, w in zip(losses, want)),
               f"the losses of the {len(want)} steps should be {', '.join(f'{w:.4f}' for w in want)}; found "
               f"{', '.join(f'{g:.4f}' for g in losses)}.", "forward, loss.backward(), optimizer.step(), optimizer.zero_grad().")
        ref = lora_state_dict(model)
        same = set(a["adapters"]) == set(ref) and all(_same(a["adapters"][k], v, 1e-5, rtol=1e-3) for k, v in ref.items())
        expect(same, "after the steps the adapters differ from what the same steps give with the reference: the "
               "optimizer should update lora_A and lora_B once per call.")
        expect(any(torch.count_nonzero(v) for k, v in a["adapters"].items() if "lora_B" in k),
               "lora_B is still zero after the steps: the optimizer did not update the adapters.")
        want_logits = logits(model.eval(), inputs["ids"])
        expect(_same(a["logits"], want_logits, 1e-4, rtol=1e-3), "after the steps the model's logits differ from the "
               "reference's: something besides the adapters changed.", "step only the optimizer you were given.")
        return (f"training_step: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps on one batch, only the "
                "adapters moved")


# ---------------------------------------------------------------------------------------- ex02_peft_copy

@judged_check
class peft_equal:
    """After copying the learner's A and B into a peft model of the same base, both give the same logits."""
    answer = {"copied": dict, "logits": torch.Tensor}
    # copy_into_peft is a loop over copy_adapters: a learner's function that calls copy_adapters answers with it
    reference = ("lorakit.qlora.copy_into_peft", "lorakit.qlora.copy_adapters")

    def draw(rng):
        inputs = _model_inputs(rng, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
        inputs["adapters"] = {name: [rng.randn(inputs["r"], d_in) * 0.1, rng.randn(d_out, inputs["r"]) * 0.1]
                              for name, (d_out, d_in) in linear_shapes(inputs["config"], inputs["targets"]).items()}
        return inputs

    def probe(inputs, fn, cls):
        from peft import LoraConfig, get_peft_model

        from lorakit.lora import replace_linears
        expect_callable(fn, "copy_into_peft")
        expect_callable(cls, "LoRALinear")
        r, alpha = inputs["r"], inputs["alpha"]
        mine = seeded_llama(inputs["config"], inputs["seed"])
        replace_linears(mine, inputs["targets"], lambda m: cls(m, r, alpha), adapted=(cls,))
        with torch.no_grad():
            for name, (A, B) in inputs["adapters"].items():
                set_adapters(mine.get_submodule(name), A, B)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(seeded_llama(inputs["config"], inputs["seed"]),
                                        LoraConfig(r=r, lora_alpha=alpha, target_modules=inputs["targets"], lora_dropout=0.0))
        fn(mine, peft_model)
        peft_model.eval()
        inner = peft_model.base_model.model
        copied = {name: [as_tensor(inner.get_submodule(name).lora_A["default"].weight),
                         as_tensor(inner.get_submodule(name).lora_B["default"].weight)] for name in inputs["adapters"]}
        with torch.no_grad():
            return {"copied": copied, "logits": as_tensor(peft_model(input_ids=inputs["ids"]).logits)}

    def judge(inputs, a):
        for name, (A, B) in inputs["adapters"].items():
            got = a["copied"].get(name)
            ok = isinstance(got, list) and len(got) == 2 and all(isinstance(t, torch.Tensor) for t in got) \
                and got[0].shape == A.shape and got[1].shape == B.shape and got[0].dtype == A.dtype \
                and got[1].dtype == B.dtype and torch.equal(got[0], A) and torch.equal(got[1], B)
            expect(ok, f"peft's {name} does not hold your adapter after copy_into_peft.",
                   "for every LoRALinear named `name` in your model, copy its lora_A.weight and lora_B.weight into "
                   "peft_model.base_model.model.get_submodule(name).lora_A['default'] / lora_B['default'].")
        want = logits(_reference_model(inputs), inputs["ids"]).float()
        got = a["logits"]
        diff = (got.float() - want).abs().max().item() if _same(got, want, float("inf")) else float("inf")
        expect(diff <= 1e-4 + 1e-4 * want.abs().max().item(), f"the logits differ by up to {diff:.3g} after copying: "
               "expected equal (allclose).", "copy every adapter, A and B, into the module of the same name.")
        return f"your LoRA and peft's give the same logits: max difference {diff:.1e} over {want.numel():,} logits"
