"""Self-checks for lesson 02 (LoRA from scratch).

Each check builds its own small layers or a shrunken copy of the lesson's model config, so it tests the
learner's code and nothing else in the notebook's state.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

from . import close, expect, passed


def _seeded(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _callable(obj, name: str) -> None:
    expect(callable(obj), f"`{name}` should be a function or class; found {type(obj).__name__}.",
           "run the exercise cell above first.")


# ------------------------------------------------------------------------------- ex02_adapter_parameters

def adapter_parameters(fn) -> None:
    _callable(fn, "adapter_parameters")
    got = fn(5000, 4000, 8)
    expect(got == 72_000, f"W of 5000 x 4000 with r=8: expected A (8 x 4000) + B (5000 x 8) = 72,000 parameters, "
                          f"found {got!r}.", "A has r * d_in numbers and B has d_out * r numbers.")
    for d_out, d_in, r in [(4096, 4096, 8), (11008, 4096, 64), (192, 512, 1)]:
        got = fn(d_out, d_in, r)
        expect(got == r * (d_in + d_out), f"d_out={d_out}, d_in={d_in}, r={r}: expected {r * (d_in + d_out):,}, "
                                          f"found {got!r}.", "r * d_in + d_out * r.")
    passed(f"A and B of a 5000 x 4000 weight at r=8: 72,000 numbers instead of 20,000,000 "
           f"({72_000 / 20_000_000:.2%})")


# ------------------------------------------------------------------------------------ ex02_lora_linear

def _layer(cls, d_in=256, d_out=96, r=8, alpha=16, **kw):
    _seeded(0)
    base = nn.Linear(d_in, d_out)
    try:
        layer = cls(base, r, alpha, **kw)
    except TypeError as e:
        raise AssertionError(f"`LoRALinear(base, r, alpha, dropout=..., use_rslora=...)` could not be called: {e}.") from e
    return base, layer


def _has(layer, name, kind=None):
    expect(hasattr(layer, name), f"your LoRALinear has no attribute `{name}`.",
           "use peft's names: base_layer, lora_A, lora_B, lora_dropout, scaling, merged.")
    if kind is not None:
        expect(isinstance(getattr(layer, name), kind),
               f"`{name}` should be an {kind.__name__}; found {type(getattr(layer, name)).__name__}.")


def lora_linear(cls) -> None:
    """Shapes, peft's initialisation, scaling, output at init, dropout placement, and what trains."""
    _callable(cls, "LoRALinear")
    d_in, d_out, r = 256, 96, 8
    base, layer = _layer(cls, d_in, d_out, r, alpha=16)
    for name in ("base_layer", "lora_A", "lora_B", "lora_dropout", "scaling"):
        _has(layer, name, nn.Linear if name.startswith("lora_A") or name.startswith("lora_B") else None)
    expect(layer.base_layer is base, "`base_layer` should be the very nn.Linear you were given (not a copy).")
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expect(tuple(A.shape) == (r, d_in), f"lora_A.weight should have shape (r, in) = {(r, d_in)}; found {tuple(A.shape)}.",
           "nn.Linear(in_features, r, bias=False) stores its weight as (r, in_features).")
    expect(tuple(B.shape) == (d_out, r), f"lora_B.weight should have shape (out, r) = {(d_out, r)}; found {tuple(B.shape)}.")
    expect(layer.lora_A.bias is None and layer.lora_B.bias is None, "lora_A and lora_B should have no bias (bias=False).")
    expect(close(layer.scaling, 2.0), f"alpha=16, r=8: scaling should be alpha / r = 2.0; found {layer.scaling!r}.")
    _, rs = _layer(cls, d_in, d_out, r, alpha=16, use_rslora=True)
    expect(close(rs.scaling, 16 / math.sqrt(8)), f"with use_rslora=True scaling should be alpha / sqrt(r) = "
           f"{16 / math.sqrt(8):.4f}; found {rs.scaling!r}.")

    expect(torch.count_nonzero(B) == 0, "lora_B should start at zero, so the adapted layer starts equal to the base layer.")
    bound = 1 / math.sqrt(d_in)
    expect(A.abs().max() <= bound + 1e-6 and A.std().item() > 0.8 * bound / math.sqrt(3),
           f"lora_A should be kaiming-uniform with a = sqrt(5): uniform in +-1/sqrt(in) = +-{bound:.4f}; found values "
           f"up to {A.abs().max().item():.4f} with std {A.std().item():.4f} (expected about {bound / math.sqrt(3):.4f}).",
           "nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5)).")

    x = torch.randn(4, 5, d_in)
    y = layer(x)
    expect(tuple(y.shape) == (4, 5, d_out), f"output shape: expected (4, 5, {d_out}), found {tuple(y.shape)}.")
    expect(torch.allclose(y, base(x), atol=1e-6), "at initialisation the output should equal the base layer's output "
           "(B is zero).", "forward = base_layer(x) + lora_B(lora_A(lora_dropout(x))) * scaling.")

    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.1)
    expected = base(x) + (x @ A.T @ layer.lora_B.weight.T) * layer.scaling
    expect(torch.allclose(layer(x), expected, atol=1e-5), "with a non-zero B the output should be "
           "base(x) + (x A^T B^T) * scaling; it is not.", "did you multiply by `scaling`, and apply A before B?")

    # Only A and B learn.
    layer.zero_grad(set_to_none=True)
    layer(x).square().mean().backward()
    expect(layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None,
           "lora_A and lora_B should receive gradients.")
    frozen = [n for n, p in layer.base_layer.named_parameters() if p.requires_grad or p.grad is not None]
    expect(not frozen, f"the base layer's {frozen} still require gradients: LoRA freezes the pretrained weights.",
           "call p.requires_grad_(False) on every parameter of base_layer.")
    trainable = sorted(n for n, p in layer.named_parameters() if p.requires_grad)
    expect(trainable == ["lora_A.weight", "lora_B.weight"],
           f"only lora_A.weight and lora_B.weight should be trainable; found {trainable}.")

    # Dropout belongs to the adapter's input only: with B = 0 the output must be the base output even in
    # train mode; with B != 0, train mode differs from eval mode.
    _, drop = _layer(cls, d_in, d_out, r, alpha=16, dropout=0.5)
    drop.train()
    expect(torch.allclose(drop(x), base(x), atol=1e-6), "with dropout and B = 0 the output changed: dropout must act "
           "on the adapter's input only, never on the frozen path.", "base_layer(x) + lora_B(lora_A(lora_dropout(x))) * scaling.")
    with torch.no_grad():
        drop.lora_B.weight.normal_(std=0.1)
    y_train = drop(x)
    drop.eval()
    y_eval = drop(x)
    expect(not torch.allclose(y_train, y_eval), "with dropout=0.5 the adapter output in train() mode should differ from "
           "eval() mode.", "self.lora_dropout = nn.Dropout(dropout) and use it on x in forward.")
    passed(f"LoRALinear: A {tuple(A.shape)} kaiming-uniform, B {tuple(B.shape)} zeros, scaling alpha/r, output equals the "
           f"base layer at init, dropout on the adapter only, only A and B get gradients")


def lora_merge(cls) -> None:
    """merge() folds B A into the base weight without changing outputs; twice warns; unmerge() undoes it."""
    _callable(cls, "LoRALinear")
    base, layer = _layer(cls, 64, 48, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.1)
    layer.eval()
    x = torch.randn(3, 64)
    w0 = base.weight.detach().clone()
    y0 = layer(x).detach()
    layer.merge()
    expect(getattr(layer, "merged", None) is True, "after merge() `merged` should be True.")
    delta = (layer.lora_B.weight @ layer.lora_A.weight * layer.scaling).detach()
    expect(torch.allclose(base.weight, w0 + delta, atol=1e-6), "merge() should add (B @ A) * scaling to base_layer.weight.",
           "under torch.no_grad(): self.base_layer.weight += (self.lora_B.weight @ self.lora_A.weight) * self.scaling")
    expect(torch.allclose(layer(x), y0, atol=1e-5), "after merging, the output should equal the unmerged output, and it "
           "does not.", "once merged, forward should return base_layer(x) alone (B A is inside its weight now).")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.merge()
    expect(torch.allclose(base.weight, w0 + delta, atol=1e-6), "merging twice added B A twice: the second merge() "
           "should do nothing.", "check `self.merged` first.")
    expect(caught, "merging twice should warn the user (warnings.warn) that the layer is already merged.")
    layer.unmerge()
    expect(getattr(layer, "merged", None) is False, "after unmerge() `merged` should be False.")
    expect(torch.allclose(base.weight, w0, atol=1e-6), "unmerge() should subtract exactly what merge() added.")
    expect(torch.allclose(layer(x), y0, atol=1e-5), "after unmerge() the output should be what it was before merging.")
    passed("merge() keeps outputs equal (max difference "
           f"{(layer(x) - y0).abs().max().item():.1e}), merging twice warns and changes nothing, unmerge() undoes it")


# ------------------------------------------------------------------------------------- ex02_inject_lora

def small_config(config, layers: int = 2, vocab: int = 256):
    """A copy of `config` with fewer layers and a small vocabulary: the same projections, built in a blink."""
    small = copy.deepcopy(config)
    small.num_hidden_layers = min(layers, config.num_hidden_layers)
    small.vocab_size = min(vocab, config.vocab_size)
    for key in ("layer_types", "max_window_layers"):
        if isinstance(getattr(small, key, None), list):
            setattr(small, key, getattr(small, key)[: small.num_hidden_layers])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(getattr(small, key, None), int) and getattr(small, key) >= small.vocab_size:
            setattr(small, key, 0)
    return small


def small_model(config):
    """A freshly initialised float32 model of `config` (seeded), in eval mode."""
    from transformers import AutoModelForCausalLM

    _seeded(0)
    return AutoModelForCausalLM.from_config(config).float().eval()


def expected_trainable(config, r, target_modules) -> int:
    """lorakit.memory's count from the config, checked against peft's on the same model."""
    from peft import LoraConfig, get_peft_model

    from lorakit.memory import lora_parameters

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(small_model(config), LoraConfig(r=r, lora_alpha=r, target_modules=list(target_modules)))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    counted = lora_parameters(config, r, list(target_modules))
    expect(trainable == counted, f"lorakit.memory.lora_parameters says {counted:,} but peft trains {trainable:,}: "
           "this is a bug in the course kit, not in your code.")
    return counted


def inject_lora(fn, cls, config) -> None:
    """On a shrunken copy of the lesson's model: count, placement, freezing, unchanged output, bad names."""
    _callable(fn, "inject_lora")
    small = small_config(config)
    targets, r = ["q_proj", "v_proj"], 8
    expected = expected_trainable(small, r, targets)
    model = small_model(small)
    ids = torch.randint(0, small.vocab_size, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    n = fn(model, targets, r=r, alpha=16)
    expect(isinstance(n, int) and n == expected, f"inject_lora should return the number of trainable parameters: expected "
           f"{expected:,} (r * (in + out) summed over every q_proj and v_proj), found {n!r}.",
           "return sum(p.numel() for p in model.parameters() if p.requires_grad).")
    wrapped = sorted(name for name, m in model.named_modules() if isinstance(m, cls))
    want = sorted(name for name, m in small_model(small).named_modules() if name.rsplit(".", 1)[-1] in targets)
    expect(wrapped == want, f"expected these layers to become LoRALinear: {want}; found {wrapped}.",
           "match a module when its name ends with '.' + one of target_modules, then setattr it on its parent.")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    stray = [name for name in trainable if ".lora_A." not in name and ".lora_B." not in name]
    expect(not stray, f"only the adapters should train, but these require gradients too: {stray[:4]}.",
           "freeze every parameter of the model first (requires_grad_(False)), then wrap the targets.")
    expect(sum(p.numel() for p in model.parameters() if p.requires_grad) == n,
           "the number you return differs from the number of parameters that actually require gradients.")
    with torch.no_grad():
        after = model(ids).logits
    expect(torch.allclose(before, after, atol=1e-5), "right after inject_lora the model's logits changed: B starts at "
           "zero, so they should not.")
    try:
        fn(small_model(small), ["no_such_layer"], r=r, alpha=16)
        raised = None
    except Exception as e:  # noqa: BLE001 - the learner may pick the exception type
        raised = e
    expect(raised is not None, "target_modules=['no_such_layer'] matched nothing, and inject_lora said nothing: it "
           "should raise an error (a ValueError) that names what was given.", "a typo in target_modules is the most "
           "common LoRA bug: fail loudly instead of training nothing.")
    passed(f"inject_lora wrapped {len(wrapped)} layers and returns {n:,} trainable parameters, equal to "
           f"lorakit.memory.lora_parameters and to peft's count")


# ------------------------------------------------------------------------------------ ex02_training_step

def training_step(fn, config) -> None:
    """A few steps on one batch: loss goes down, only the adapters move, gradients are cleared."""
    from lorakit.lora import inject_lora as reference_inject

    _callable(fn, "training_step")
    small = small_config(config)
    model = small_model(small).train()
    reference_inject(model, ["q_proj", "v_proj"], r=8, alpha=16)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, small.vocab_size, (4, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    losses = [fn(model, batch, opt) for _ in range(6)]
    expect(all(isinstance(v, float) for v in losses), f"training_step should return the loss as a Python float "
           f"(loss.item()); found {type(losses[0]).__name__}.")
    expect(losses[-1] < losses[0], f"six steps on the same batch should lower the loss; found {losses[0]:.4f} -> "
           f"{losses[-1]:.4f}.", "forward, loss.backward(), optimizer.step(), optimizer.zero_grad().")
    grads = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    expect(not grads, f"gradients are left over after the step ({grads[:2]}...): the next step would add to them.",
           "call optimizer.zero_grad() after optimizer.step().")
    moved = [n for n, p in model.named_parameters() if n in frozen and not torch.equal(p, frozen[n])]
    expect(not moved, f"frozen weights changed: {moved[:3]}.")
    b_moved = any(torch.count_nonzero(m.lora_B.weight) for m in model.modules() if hasattr(m, "lora_B"))
    expect(b_moved, "lora_B is still zero after the steps: the optimizer did not update the adapters.")
    passed(f"training_step: loss {losses[0]:.3f} -> {losses[-1]:.3f} in 6 steps on one batch, only the adapters moved")


# ---------------------------------------------------------------------------------------- ex02_peft_copy

def peft_equal(fn, my_model, peft_model, input_ids) -> None:
    """After copying the learner's A and B into peft's model, both give the same logits."""
    _callable(fn, "copy_into_peft")
    mine = [m for m in my_model.modules() if hasattr(m, "lora_B") and isinstance(m.lora_B, nn.Linear)]
    expect(mine and any(torch.count_nonzero(m.lora_B.weight) for m in mine),
           "your model's lora_B weights are all zero: train it first (the fine-tune above), so that the comparison "
           "means something.")
    fn(my_model, peft_model)
    my_model.eval(), peft_model.eval()
    with torch.no_grad():
        a = my_model(input_ids=input_ids).logits.float()
        b = peft_model(input_ids=input_ids).logits.float()
    diff = (a - b).abs().max().item()
    expect(torch.allclose(a, b, atol=1e-4, rtol=1e-4), f"the logits differ by up to {diff:.3g} after copying: expected "
           "equal (allclose).", "for every LoRALinear named `name` in your model, copy its lora_A.weight and "
           "lora_B.weight into peft_model.base_model.model.get_submodule(name).lora_A['default'] / lora_B['default'].")
    passed(f"your LoRA and peft's give the same logits: max difference {diff:.1e} over {a.numel():,} logits")
