"""Checks for lesson 04 (QLoRA from scratch), judged (see lorakit.checks.judged).

Each check builds its own small layers (or a tiny random Llama) from weights and seeds the grader drew, so it
tests the learner's code and nothing else in the notebook's state. The probe returns what the learner's
layers computed (outputs, gradients, packed bytes, counts); the judge compares with the real thing on the same
weights: bitsandbytes' packed bytes and `Linear4bit` outputs, peft's LoRA layer for 4-bit bases (both built
by `lorakit.qlora.bitsandbytes_lora`, which lesson 04 compares with too), and `lorakit.qlora`, the reference.
As in lesson 02's checks, adapters get drawn non-zero values through the learner's own layers before outputs
and gradients are compared, and every weight a check keeps comes from a seeded Generator
(`lorakit.models.seeded_llama`, drawn tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.checks import CheckFailed, close, expect
from lorakit.checks.judged import as_tensor, data_or_repr, expect_callable, judged_check
from lorakit.checks.llama import adapter_grads, alpha_for, draw_adapters, set_drawn_adapters
from lorakit.models import building, seeded_llama

D_IN, D_OUT = 192, 128  # multiples of 64, as bitsandbytes' CPU kernels want (`_convert_weight_packed_for_cpu`)


def _dims(rng) -> tuple[int, int]:
    """(in, out): multiples of 64 and 32, as bitsandbytes' CPU kernels want."""
    return (64 * rng.integer(1, 5), 32 * rng.integer(1, 8)) if rng.grading else (D_IN, D_OUT)


def _linear(inputs, bias: bool = False) -> nn.Linear:
    W = inputs["W"]
    with building():
        lin = nn.Linear(W.shape[1], W.shape[0], bias=bias)
    with torch.no_grad():
        lin.weight.copy_(W)
        if bias:
            lin.bias.copy_(inputs["bias"])
    return lin


def _packed_and_state(W):
    from lorakit.nf4 import quantize_nf4
    return quantize_nf4(W.detach(), blocksize=64, double_quant=True)


def _bnb_quantized(W):
    """bitsandbytes' packed NF4 bytes and QuantState of W (blocksize 64, double quantization)."""
    import bitsandbytes.functional as BF
    return BF.quantize_4bit(W.detach().float(), blocksize=64, quant_type="nf4", compress_statistics=True)


def _full_size_float_tensors(module: nn.Module, n: int) -> list[str]:
    """Names of float parameters/buffers with at least n numbers: a 16/32-bit copy of the weight."""
    out = []
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t is not None and t.is_floating_point() and t.numel() >= n:
            out.append(f"{name} ({tuple(t.shape)}, {t.dtype})")
    return out


def _kind(x) -> str:
    return f"a {str(x.dtype).removeprefix('torch.')} tensor {tuple(x.shape)}" if isinstance(x, torch.Tensor) else repr(x)[:60]


def _diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item() if a.shape == b.shape else float("inf")


def _close(got, want, tol) -> tuple[bool, float]:
    if not isinstance(got, torch.Tensor):
        return False, float("inf")
    err = _diff(got, want)
    return err <= tol * max(1.0, want.float().abs().max().item()), err


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


class _MatmulDtypes(torch.overrides.TorchFunctionMode):
    """Records the dtypes of the floating-point operands of every matrix product run inside it: the dtype a
    layer computed in, which its output (cast back to the input's dtype) no longer shows."""
    PRODUCTS = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.addmm}

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.PRODUCTS:
            self.seen |= {str(a.dtype).removeprefix("torch.") for a in args
                          if isinstance(a, torch.Tensor) and a.is_floating_point()}
        return func(*args, **(kwargs or {}))


def _computed(layer, x) -> tuple[object, list[str]]:
    """`layer(x)` without gradients, as data, and the dtypes its matrix products ran in."""
    with torch.no_grad(), _MatmulDtypes() as mode:
        y = layer(x)
    return data_or_repr(y), sorted(mode.seen)


COMPUTE = "bfloat16"   # the compute_dtype the checks ask for, pinned: whatever this CPU would pick by itself


# -------------------------------------------------------------------------------------- ex04_matmul_nf4

@judged_check
class matmul_nf4:
    """Output and input gradient equal to F.linear with the dequantized weight; the dequantized weight
    is not kept for backward."""
    answer = {"results": [dict], "saved": [[list]]}
    reference = ("lorakit.qlora.MatMulNF4",)
    reported = {"saved": "what autograd kept for backward (shapes and bytes), seen by a hook in the learner's "
                         "process: the grader cannot see that memory"}

    def draw(rng):
        d_in, d_out = _dims(rng)
        cases = [["float32", False, 1e-5], ["bfloat16", False, 2e-2], ["float32", True, 1e-5]]
        return {"W": rng.randn(d_out, d_in) / d_in ** 0.5, "bias": rng.randn(d_out) * 0.1, "cases": cases,
                "x": rng.randn(3, 5, d_in)}

    def probe(inputs, fn):
        expect_callable(getattr(fn, "apply", None), "MatMulNF4.apply")
        packed, state = _packed_and_state(inputs["W"])
        out, kept = [], []
        for dtype, bias, _ in inputs["cases"]:
            x = inputs["x"].to(_dtype(dtype)).requires_grad_(True)
            saved = []  # (shape, dtype, bytes) of what autograd keeps, leaving out the packed buffer

            def pack(t):
                if t.untyped_storage().data_ptr() != packed.untyped_storage().data_ptr():
                    saved.append([list(t.shape), str(t.dtype), t.numel() * t.element_size()])
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = fn.apply(x, packed, state, inputs["bias"] if bias else None)
            result = {"y": data_or_repr(y), "gx": None}
            if isinstance(y, torch.Tensor) and y.requires_grad:
                (gx,) = torch.autograd.grad(y.float().sum(), x)
                result["gx"] = data_or_repr(gx)
            out.append(result)
            kept.append(saved)
        return {"results": out, "saved": kept}

    def judge(inputs, answer):
        from lorakit.nf4 import dequantize_nf4
        packed, state = _packed_and_state(inputs["W"])
        d_out, d_in = inputs["W"].shape
        expect(len(answer["results"]) == len(inputs["cases"]) == len(answer["saved"]), "MatMulNF4 should answer once per call.")
        for (dtype, bias, tol), got, saved in zip(inputs["cases"], answer["results"], answer["saved"]):
            dt = _dtype(dtype)
            x = inputs["x"].to(dt)
            what = f"x of shape {tuple(x.shape)} in {dt}" + (" with a bias" if bias else "")
            y = got.get("y")
            expect(isinstance(y, torch.Tensor) and tuple(y.shape) == (*x.shape[:-1], d_out),
                   f"{what}: expected an output of shape {(*x.shape[:-1], d_out)}; found "
                   f"{tuple(y.shape) if isinstance(y, torch.Tensor) else y!r}.",
                   "dequantize the weight to (out, in) and use F.linear(x, W, bias).")
            W = dequantize_nf4(packed, state, dtype=dt)
            expected = F.linear(x, W, inputs["bias"].to(dt) if bias else None)
            expect(y.dtype == dt, f"{what}: the output should be {dt} (the input's dtype); found {y.dtype}.",
                   "dequantize to x.dtype: dequantize_nf4(weight, quant_state, dtype=x.dtype).")
            ok, err = _close(y, expected, tol)
            expect(ok, f"{what}: the output differs from F.linear(x, dequantize_nf4(weight, state)) by up to {err:.3g}.",
                   "forward is x @ W.T (+ bias) with W the dequantized (out, in) weight.")
            full = [s[:2] for s in saved if s and s[0] in ([d_out, d_in], [d_in, d_out])]
            expect(not full, f"{what}: your MatMulNF4 keeps a {d_out} x {d_in} matrix for the backward pass ({full[0] if full else ''}): "
                             f"that is the dequantized weight, the very copy this function exists to avoid.",
                   "save only the packed bytes (ctx.save_for_backward(weight)), keep quant_state on ctx, and "
                   "dequantize again inside backward.")
            ok, err = _close(got.get("gx"), torch.ones(*x.shape[:-1], d_out, dtype=dt) @ W, tol)
            expect(ok, f"{what}: the gradient with respect to x differs from grad_output @ W by up to {err:.3g}.",
                   "backward returns (grad_output @ W, None, None, None): one gradient per input of forward.")
        extra = sum(s[2] for s in answer["saved"][-1] if len(s) == 3 and type(s[2]) is int)
        return (f"MatMulNF4 equals F.linear with the dequantized weight, forward and backward, and keeps no copy of "
                f"W for backward ({extra:,} extra bytes; a bf16 copy would be {d_in * d_out * 2:,})")


# ------------------------------------------------------------------------------------- ex04_nf4_linear

@judged_check
class nf4_linear:
    """4-bit storage only, bitsandbytes' packed bytes and double-quantized constants, bitsandbytes' outputs,
    nothing trainable."""
    answer = {"is_module": bool, "copies": [str], "packed": object, "state": dict, "trainable": [str],
              "outputs": [object], "compute_out": object, "compute_dtypes": [str]}
    reference = ("lorakit.qlora.NF4Linear",)
    reported = {"is_module": "whether the learner's object is an nn.Module",
                "copies": "which 16/32-bit tensors the layer holds: only the probe sees the learner's object",
                "trainable": "the names of the parameters that require gradients",
                "compute_dtypes": "the dtypes the layer's matrix products ran in with compute_dtype set (its output, "
                                  "cast back to the input's dtype, cannot show it beyond rounding)"}

    def draw(rng):
        d_in, d_out = _dims(rng)
        return {"W": rng.randn(d_out, d_in) / d_in ** 0.5, "bias": rng.randn(d_out) * 0.1, "x": rng.randn(4, 7, d_in),
                "dtypes": ["float32", "bfloat16"], "compute_dtype": COMPUTE}

    def probe(inputs, cls):
        expect_callable(cls, "NF4Linear")
        lin = _linear(inputs, bias=True)
        layer = cls(lin)
        if not isinstance(layer, nn.Module):
            return {"is_module": False, "copies": [], "packed": None, "state": {}, "trainable": [], "outputs": [],
                    "compute_out": None, "compute_dtypes": []}
        state = getattr(layer, "quant_state", None)
        out = {"is_module": True, "copies": _full_size_float_tensors(layer, lin.weight.numel() // 4),
               "packed": data_or_repr(getattr(layer, "weight", None)),
               "state": {k: data_or_repr(getattr(state, k, None)) for k in ("absmax", "offset", "absmax2")},
               "trainable": [n for n, p in layer.named_parameters() if p.requires_grad], "outputs": []}
        for name in inputs["dtypes"]:
            x = inputs["x"].to(_dtype(name)).requires_grad_(True)
            y = layer(x)
            gx = torch.autograd.grad(y.float().sum(), x)[0] if isinstance(y, torch.Tensor) and y.requires_grad else None
            out["outputs"].append([data_or_repr(y), None if gx is None else bool(torch.isfinite(gx).all())])
        computing = cls(_linear(inputs, bias=True), compute_dtype=_dtype(inputs["compute_dtype"]))
        out["compute_out"], out["compute_dtypes"] = _computed(computing, inputs["x"])
        return out

    def judge(inputs, a):
        expect(a["is_module"], "NF4Linear(linear) should build an nn.Module.")
        expect(not a["copies"], f"NF4Linear keeps a 16/32-bit copy of the weight: {a['copies']}.",
               "store only the packed uint8 bytes (a buffer) and the quantization state; do not keep `linear`.")
        packed = a["packed"]
        d_out, d_in = inputs["W"].shape
        expect(isinstance(packed, torch.Tensor) and packed.dtype == torch.uint8,
               f"`layer.weight` should be the packed uint8 tensor from quantize_nf4; found "
               f"{packed.dtype if isinstance(packed, torch.Tensor) else packed!r}.", "self.register_buffer('weight', packed).")
        expect(tuple(packed.shape) == (d_in * d_out // 2, 1),
               f"packed weight of a {d_out} x {d_in} layer: expected shape ({d_in * d_out // 2}, 1); found {tuple(packed.shape)}.")
        expected, ref_state = _bnb_quantized(inputs["W"])
        expect(torch.equal(packed, expected), f"your packed bytes differ from bitsandbytes' quantize_4bit(nf4) in "
               f"{(packed != expected).sum().item()} of {expected.numel()} bytes.",
               "quantize with lorakit.nf4.quantize_nf4 (blocksize 64), which matches bitsandbytes byte for byte.")
        st = a["state"]
        same = all(isinstance(st.get(k), torch.Tensor) for k in ("absmax", "absmax2")) and \
            st["absmax"].dtype == torch.uint8 and st["absmax"].shape == ref_state.absmax.shape and \
            torch.equal(st["absmax"], ref_state.absmax) and st["absmax2"].shape == ref_state.state2.absmax.shape and \
            torch.equal(st["absmax2"].float(), ref_state.state2.absmax) and \
            close(st.get("offset").item() if isinstance(st.get("offset"), torch.Tensor) and st["offset"].numel() == 1
                  else st.get("offset"), ref_state.offset.item(), rel=0)
        expect(same, "`layer.quant_state` should hold bitsandbytes' double-quantized constants (8-bit absmax codes, "
               "second-level absmax, offset), as quantize_nf4(..., double_quant=True) returns them.",
               "quantize_nf4(linear.weight, blocksize, double_quant=True) by default.")
        expect(not a["trainable"], f"NF4Linear should have no trainable parameters; found {a['trainable']}.",
               "the 4-bit weight is a buffer, and a bias (if any) gets requires_grad=False.")
        from lorakit.qlora import bitsandbytes_lora
        with building():
            bnb = bitsandbytes_lora(_linear(inputs, bias=True)).base_layer
        expect(len(a["outputs"]) == len(inputs["dtypes"]), "NF4Linear should answer once per input dtype.")
        for name, got, tol in zip(inputs["dtypes"], a["outputs"], (1e-5, 2e-2)):
            dt = _dtype(name)
            y, finite = got if isinstance(got, list) and len(got) == 2 else (got, None)
            with torch.no_grad():
                ref = bnb(inputs["x"].to(dt))
            expect(isinstance(y, torch.Tensor) and y.dtype == dt,
                   f"an input in {dt} should give an output in {dt}; found {y.dtype if isinstance(y, torch.Tensor) else y!r}.")
            ok, err = _close(y, ref, tol)
            expect(ok, f"input in {dt}: your layer's output differs from bitsandbytes' Linear4bit by up to {err:.3g}.",
                   "forward should be MatMulNF4.apply(x, self.weight, self.quant_state, self.bias).")
            expect(finite is True, "gradients should flow back to the input x.")
        compute = inputs["compute_dtype"]
        with torch.no_grad(), building():
            bnb_compute = bitsandbytes_lora(_linear(inputs, bias=True), compute_dtype=_dtype(compute)).base_layer
            ref = bnb_compute(inputs["x"])
        y = a["compute_out"]
        ok, err = _close(y, ref, 2e-2)
        expect(ok and y.dtype == torch.float32, f"with compute_dtype={compute} and a float32 input, the output should be "
               f"float32 (cast back) and match bitsandbytes' Linear4bit(compute_dtype={compute}); found "
               f"{_kind(y)}, off by up to {err:.3g}.", "cast x to compute_dtype, apply MatMulNF4, cast the result back "
               "to the input's dtype.")
        expect(compute in a["compute_dtypes"], f"with compute_dtype={compute} your layer's matrix products ran in "
               f"{a['compute_dtypes']}, not in {compute}.", "in forward, x = x.to(self.compute_dtype) when it is set, "
               "before MatMulNF4.")
        return (f"NF4Linear stores {packed.numel():,} packed bytes, equal to bitsandbytes' to the byte, and its "
                f"outputs match bitsandbytes' Linear4bit")


# ------------------------------------------------------------------------------------ ex04_qlora_linear

@judged_check
class qlora_linear:
    """A 4-bit base, adapters only trainable, outputs equal to bitsandbytes Linear4bit + peft, merge refuses."""
    answer = {"missing": [str], "copies": [str], "trainable": [str], "scaling": object, "outputs": [object],
              "merge": [object], "compute_out": object, "compute_dtypes": [str]}
    reference = ("lorakit.qlora.QLoRALinear",)
    reported = {"missing": "which of peft's attribute names the layer lacks",
                "copies": "which 16/32-bit tensors the base layer holds: only the probe sees the learner's object",
                "trainable": "the names of the parameters that require gradients",
                "merge": "the exception merge() raised and its message",
                "compute_dtypes": "the dtypes the layer's matrix products ran in with compute_dtype set"}

    def draw(rng):
        d_in, d_out = _dims(rng)
        r = rng.choice([2, 4, 8, 16]) if rng.grading else 8
        alpha = alpha_for(rng, r, [4, 8, 16, 32]) if rng.grading else 16
        return {"W": rng.randn(d_out, d_in) / d_in ** 0.5, "x": rng.randn(2, 9, d_in), "r": r, "alpha": alpha,
                "A": rng.randn(r, d_in) / d_in ** 0.5, "B": rng.randn(d_out, r) * 0.05, "dtypes": ["float32", "bfloat16"],
                "compute_dtype": COMPUTE}

    def probe(inputs, cls):
        expect_callable(cls, "QLoRALinear")
        lin = _linear(inputs)
        layer = cls(lin, inputs["r"], inputs["alpha"])
        missing = [n for n in ("base_layer", "lora_A", "lora_B", "scaling") if not hasattr(layer, n)]
        if missing:
            raise CheckFailed(f"your QLoRALinear has no `{missing[0]}`.\nHint: subclass LoRALinear and call "
                              "super().__init__(linear, r, alpha, dropout) first.")
        out = {"missing": [], "copies": _full_size_float_tensors(layer.base_layer, lin.weight.numel() // 4),
               "trainable": sorted(n for n, p in layer.named_parameters() if p.requires_grad),
               "scaling": data_or_repr(layer.scaling), "outputs": []}
        if tuple(layer.lora_A.weight.shape) == tuple(inputs["A"].shape) and \
                tuple(layer.lora_B.weight.shape) == tuple(inputs["B"].shape):
            with torch.no_grad():  # a trained-looking B, so the adapter path counts
                layer.lora_A.weight.copy_(inputs["A"])
                layer.lora_B.weight.copy_(inputs["B"])
            with torch.no_grad():
                out["outputs"] = [data_or_repr(layer(inputs["x"].to(_dtype(name)))) for name in inputs["dtypes"]]
        out["compute_out"], out["compute_dtypes"] = None, []
        computing = cls(_linear(inputs), inputs["r"], inputs["alpha"], compute_dtype=_dtype(inputs["compute_dtype"]))
        if tuple(getattr(getattr(computing, "lora_A", None), "weight", torch.empty(0)).shape) == tuple(inputs["A"].shape):
            with torch.no_grad():
                computing.lora_A.weight.copy_(inputs["A"])
                computing.lora_B.weight.copy_(inputs["B"])
            out["compute_out"], out["compute_dtypes"] = _computed(computing, inputs["x"])
        try:
            layer.merge()
            out["merge"] = [None, ""]
        except Exception as e:  # noqa: BLE001 - any clear error is fine
            out["merge"] = [type(e).__name__, str(e)[:500]]
        return out

    def judge(inputs, a):
        r, alpha = inputs["r"], inputs["alpha"]
        expect(not a["copies"], f"the base layer still holds a 16/32-bit weight: {a['copies']}.",
               "after super().__init__, replace self.base_layer by NF4Linear(linear).")
        expect(a["trainable"] == ["lora_A.weight", "lora_B.weight"],
               f"only lora_A.weight and lora_B.weight should be trainable; found {a['trainable']}.")
        expect(close(a["scaling"], alpha / r), f"alpha={alpha}, r={r}: scaling should be {alpha / r:g}; found {a['scaling']!r}.")
        expect(len(a["outputs"]) == len(inputs["dtypes"]), f"lora_A and lora_B should have shapes ({r}, in) and (out, {r}).")
        from lorakit.qlora import bitsandbytes_lora
        with building():
            twin = bitsandbytes_lora(_linear(inputs), r, alpha)
        with torch.no_grad():
            twin.lora_A["default"].weight.copy_(inputs["A"])
            twin.lora_B["default"].weight.copy_(inputs["B"])
        for name, y, tol in zip(inputs["dtypes"], a["outputs"], (1e-5, 2e-2)):
            with torch.no_grad():
                ref = twin(inputs["x"].to(_dtype(name)))
            ok, err = _close(y, ref, tol)
            expect(ok, f"input in {name}: your QLoRALinear differs from bitsandbytes Linear4bit + peft LoRA by up to {err:.3g}.",
                   "forward is base_layer(x) + lora_B(lora_A(dropout(x))) * scaling: LoRALinear's forward does it "
                   "once base_layer is your NF4Linear.")
        from lorakit.qlora import QLoRALinear
        compute = inputs["compute_dtype"]
        with torch.no_grad(), building():
            ref_layer = QLoRALinear(_linear(inputs), r, alpha, compute_dtype=_dtype(compute))
            ref_layer.lora_A.weight.copy_(inputs["A"])
            ref_layer.lora_B.weight.copy_(inputs["B"])
            ref = ref_layer(inputs["x"])
        y = a["compute_out"]
        ok, err = _close(y, ref, 2e-2)
        expect(ok and y.dtype == torch.float32, f"QLoRALinear(..., compute_dtype={compute}) on a float32 input should give "
               f"a float32 output equal to the reference's; found {_kind(y)}, off by up to {err:.3g}.",
               "pass compute_dtype on to NF4Linear(linear, compute_dtype=compute_dtype).")
        expect(compute in a["compute_dtypes"], f"QLoRALinear(..., compute_dtype={compute}): the 4-bit base computed in "
               f"{a['compute_dtypes']}, not in {compute}.", "pass compute_dtype on to NF4Linear.")
        raised, msg = a["merge"] if len(a["merge"]) == 2 else (None, "")
        expect(isinstance(msg, str), "merge()'s error should have a message.")
        expect(raised != "NotImplementedError", "merge() raises NotImplementedError: the exercise is not finished yet.")
        expect(raised is not None, "merge() on a 4-bit layer should raise an error that explains why, not merge.",
               "raise an exception whose message says that merging into 4 bits rounds the update away and "
               "shows the supported way: merge into a 16-bit copy.")
        expect("16" in msg, f"merge()'s message should point to the supported way, a 16-bit copy; it says: {msg!r}.",
               "mention merging into a 16-bit (bf16) copy of the weights.")
        return ("QLoRALinear: 4-bit base, only the adapters train, outputs equal to bitsandbytes Linear4bit + peft, "
                "and merge() explains itself")


# ------------------------------------------------------------------------------ ex04_quantize_and_inject

def _llama_config(hidden: int = 128, intermediate: int = 256, layers: int = 2, vocab: int = 256) -> dict:
    """The config (a dict) of the Llamas these checks build: every size a multiple of 64, as bitsandbytes'
    CPU kernels want."""
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def _llama(inputs):
    """The inputs' Llama, its weights drawn from the inputs' seed."""
    return seeded_llama(_llama_config(**inputs["sizes"]), inputs["seed"])


def _llama_inputs(rng, visible_targets) -> dict:
    if rng.grading:
        sizes = {"hidden": 64 * rng.integer(1, 4), "intermediate": 64 * rng.integer(2, 6), "layers": rng.integer(1, 2)}
        targets = sorted(rng.sample(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                    rng.integer(1, 3)))
        r = rng.choice([2, 4, 8])
        alpha = alpha_for(rng, r, [4, 8, 16])
    else:
        sizes, targets, r, alpha = {"hidden": 128, "intermediate": 256, "layers": 2}, visible_targets, 4, 8
    adapters = draw_adapters(rng, _llama_config(**sizes), targets, r)
    return {"seed": rng.new_seed(), "sizes": sizes, "targets": targets, "r": r, "alpha": alpha,
            "ids": rng.randint(0, 256, (2, 12)), "adapters": adapters}


def _reference_model(inputs, adapters: bool = False):
    """lorakit.qlora's model for the inputs (with the drawn adapters set when asked); (model, count returned)."""
    from lorakit import qlora
    model = _llama(inputs)
    with building():
        n = qlora.quantize_and_inject(model, inputs["targets"], inputs["r"], inputs["alpha"])
    if adapters:
        set_drawn_adapters(model, inputs["adapters"])
    return model, n


@judged_check
class quantize_and_inject:
    """Targets replaced, everything else frozen, the right count returned; with drawn non-zero adapters set
    through the learner's layers, the logits and the adapters' gradients equal the reference QLoRA model's."""
    answer = {"n": object, "not_replaced": [str], "others": [str], "trainable": [str], "adapters_set": [str],
              "logits": torch.Tensor, "with_grad": [str], "grads": dict, "suffix_only": [str]}
    reference = ("lorakit.qlora.quantize_and_inject", "lorakit.lora.replace_linears")
    reported = {"not_replaced": "which targets are not instances of the learner's QLoRALinear: names only",
                "others": "which other projections changed type", "trainable": "which kinds of parameters train",
                "adapters_set": "which target layers took the drawn adapters (the logits show whether they work)",
                "with_grad": "which kinds of parameters hold a gradient after backward",
                "suffix_only": "which layers target_modules=['proj'] replaced (peft's rule matches none)"}

    def draw(rng):
        return _llama_inputs(rng, ["q_proj", "v_proj"])

    def probe(inputs, fn, qlora_cls):
        expect_callable(fn, "quantize_and_inject")
        targets = inputs["targets"]
        model = _llama(inputs)
        n = fn(model, targets, inputs["r"], inputs["alpha"])
        names = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in targets]
        out = {"n": data_or_repr(n),
               "not_replaced": [name for name in names
                                if not (isinstance(qlora_cls, type) and isinstance(model.get_submodule(name), qlora_cls))],
               "others": [name for name, m in model.named_modules() if name.rsplit(".", 1)[-1] not in targets
                          and name.endswith("_proj") and not isinstance(m, nn.Linear)],
               "trainable": sorted({n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}),
               "adapters_set": set_drawn_adapters(model, inputs["adapters"])}
        with torch.no_grad():
            out["logits"] = as_tensor(model.eval()(inputs["ids"]).logits)
        out["grads"] = adapter_grads(model, inputs["ids"])
        out["with_grad"] = sorted({n.split(".")[-2] for n, p in model.named_parameters() if p.grad is not None})
        other = _llama(inputs)
        try:
            fn(other, ["proj"], inputs["r"], inputs["alpha"])
        except Exception:  # noqa: BLE001 - raising for targets that match nothing is fine too
            pass
        out["suffix_only"] = sorted(name for name, m in other.named_modules() if hasattr(m, "lora_A"))
        return out

    def judge(inputs, a):
        targets, r = inputs["targets"], inputs["r"]
        model, n_ref = _reference_model(inputs, adapters=True)
        what = f"{' and '.join(targets)} of a {inputs['sizes']['layers']}-layer Llama (hidden {inputs['sizes']['hidden']}) at r={r}"
        expect(a["n"] == n_ref and type(a["n"]) is int, f"{what}: expected {n_ref:,} trainable parameters to be returned; "
               f"found {a['n']!r}.", "return sum(p.numel() for p in model.parameters() if p.requires_grad).")
        expect(not a["not_replaced"], f"these target layers were not replaced by your QLoRALinear: {a['not_replaced']}.",
               "setattr(parent, child_name, QLoRALinear(module, r, alpha)) for every matching name.")
        expect(not a["others"], f"only {' and '.join(targets)} should change; these changed too: {a['others']}.")
        expect(a["trainable"] == ["lora_A", "lora_B"], f"only lora_A and lora_B should be trainable; trainable: {a['trainable']}.",
               "freeze every parameter of the model first (requires_grad_(False)), then inject.")
        missing = [name for name in inputs["adapters"] if name not in a["adapters_set"]]
        expect(not missing, f"these layers have no lora_A / lora_B of shapes (r, in) and (out, r) to take adapters: "
               f"{missing[:4]}.", "wrap every target with your QLoRALinear(module, r, alpha).")
        with torch.no_grad():
            ref = model.eval()(inputs["ids"]).logits
        err = _diff(a["logits"], ref)
        expect(err < 1e-4 * max(1.0, ref.abs().max().item()), f"with non-zero adapters set in your layers, your model's "
               f"logits differ from the reference QLoRA model's by up to {err:.3g}.",
               "quantize with your QLoRALinear (NF4, blocksize 64) and keep its scaling alpha / r; if the QLoRALinear "
               "check fails too, fix QLoRALinear first.")
        expect(not a["suffix_only"], f"target_modules=['proj'] matches no layer under peft's rule (a full name equals a "
               f"target or ends with '.' + target), yet your function replaced {a['suffix_only'][:3]}.",
               "match with name == t or name.endswith('.' + t).")
        expect(a["with_grad"] == ["lora_A", "lora_B"], f"after backward, only adapters should have gradients; found {a['with_grad']}.")
        want = adapter_grads(model, inputs["ids"])
        got = a["grads"]
        for name, (gA, gB) in want.items():
            mine = got.get(name)
            ok = isinstance(mine, list) and len(mine) == 2 and all(
                _close(m, w, 1e-4)[0] for m, w in zip(mine, (gA, gB)))
            expect(ok, f"{name}: the gradients of lora_A and lora_B differ from the reference QLoRA model's.",
                   "gradients reach the adapters through your QLoRALinear's forward; the base stays frozen.")
        return (f"quantize_and_inject: {len(want)} layers quantized to NF4 with adapters, {a['n']:,} trainable "
                f"parameters; with drawn adapters the logits and the adapters' gradients equal the reference's")


# ----------------------------------------------------------------------------------- ex04_stored_bits

@judged_check
class stored_bits:
    """`stored_bits(model)`: bits stored per weight of the 4-bit layers, constants included."""
    answer = {"bits": object}
    reference = ("lorakit.qlora.stored_bits", "lorakit.qlora.stored_bits_per_param")   # one function, two names

    def draw(rng):
        return _llama_inputs(rng, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def probe(inputs, fn, quantize_and_inject):
        expect_callable(fn, "stored_bits")
        model = _llama(inputs)
        quantize_and_inject(model, inputs["targets"], inputs["r"], inputs["alpha"])
        return {"bits": data_or_repr(fn(model))}

    def judge(inputs, answer):
        from lorakit.nf4 import bits_per_param
        from lorakit.qlora import stored_bits
        expected = stored_bits(_reference_model(inputs)[0])
        got = answer["bits"]
        expect(close(got, expected, rel=1e-6),
               f"expected {expected:.4f} bits per 4-bit weight (packed bytes + absmax codes + offset + second-level "
               f"absmax, times 8, over the weights' count); found {got!r}.",
               "for each NF4Linear: weight.numel() * weight.element_size() + quant_state.nbytes(); sum, times 8, "
               "divided by the sum of in_features * out_features.")
        limit = bits_per_param(64, double_quant=True)
        return f"{got:.4f} bits per weight stored, {got / limit:.4f} x the 4.127-bit limit of NF4 + double quantization"
