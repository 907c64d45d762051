"""Self-checks for lesson 04 (QLoRA from scratch).

Each check builds its own small layers (or a tiny random Llama), so it tests the learner's code and
nothing else in the notebook's state. The comparisons go to the real thing: bitsandbytes' packed bytes
and `Linear4bit` outputs, peft's LoRA layer for 4-bit bases, and `lorakit.qlora`, the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import close, expect, passed

D_IN, D_OUT = 192, 128  # multiples of 64, as bitsandbytes' CPU kernels want (`_convert_weight_packed_for_cpu`)


def _callable(obj, name: str) -> None:
    expect(callable(obj), f"`{name}` should be a class or function; found {type(obj).__name__}.",
           "run the exercise cell above first.")


def _linear(d_in=D_IN, d_out=D_OUT, bias=False, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias)


def _packed_and_state(linear):
    from lorakit.nf4 import quantize_nf4
    return quantize_nf4(linear.weight.detach(), blocksize=64, double_quant=True)


def _bnb_bytes(linear) -> torch.Tensor:
    import bitsandbytes.functional as BF
    packed, _ = BF.quantize_4bit(linear.weight.detach().float(), blocksize=64, quant_type="nf4",
                                 compress_statistics=True)
    return packed


def _full_size_float_tensors(module: nn.Module, n: int) -> list[str]:
    """Names of float parameters/buffers with at least n numbers: a 16/32-bit copy of the weight."""
    out = []
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t is not None and t.is_floating_point() and t.numel() >= n:
            out.append(f"{name} ({tuple(t.shape)}, {t.dtype})")
    return out


def _diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# -------------------------------------------------------------------------------------- ex04_matmul_nf4

def matmul_nf4(fn) -> None:
    """Output and input gradient equal to F.linear with the dequantized weight; the dequantized weight
    is not kept for backward."""
    from lorakit.nf4 import dequantize_nf4
    _callable(getattr(fn, "apply", None), "MatMulNF4.apply")
    for dtype, bias, tol in [(torch.float32, False, 1e-5), (torch.bfloat16, False, 2e-2), (torch.float32, True, 1e-5)]:
        lin = _linear(bias=bias)
        packed, state = _packed_and_state(lin)
        x = torch.randn(3, 5, D_IN, dtype=dtype, requires_grad=True)
        b = None if lin.bias is None else lin.bias.detach()
        saved = []  # (shape, dtype, bytes) of what autograd keeps, leaving out the packed buffer
        def pack(t):
            if t.untyped_storage().data_ptr() != packed.untyped_storage().data_ptr():
                saved.append((tuple(t.shape), t.dtype, t.numel() * t.element_size()))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = fn.apply(x, packed, state, b)
        what = f"x of shape (3, 5, {D_IN}) in {dtype}" + (" with a bias" if bias else "")
        expect(isinstance(y, torch.Tensor) and tuple(y.shape) == (3, 5, D_OUT),
               f"{what}: expected an output of shape (3, 5, {D_OUT}); found "
               f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}.",
               "dequantize the weight to (out, in) and use F.linear(x, W, bias).")
        W = dequantize_nf4(packed, state, dtype=dtype)
        expected = F.linear(x.detach(), W, None if b is None else b.to(dtype))
        expect(y.dtype == dtype, f"{what}: the output should be {dtype} (the input's dtype); found {y.dtype}.",
               "dequantize to x.dtype: dequantize_nf4(weight, quant_state, dtype=x.dtype).")
        err = _diff(y, expected)
        expect(err <= tol * max(1.0, expected.abs().max().item()),
               f"{what}: the output differs from F.linear(x, dequantize_nf4(weight, state)) by up to {err:.3g}.",
               "forward is x @ W.T (+ bias) with W the dequantized (out, in) weight.")
        full = [s[:2] for s in saved if s[0] in ((D_OUT, D_IN), (D_IN, D_OUT))]
        expect(not full, f"{what}: your MatMulNF4 keeps a {D_OUT} x {D_IN} matrix for the backward pass ({full[0] if full else ''}): "
                         f"that is the dequantized weight, the very copy this function exists to avoid.",
               "save only the packed bytes (ctx.save_for_backward(weight)), keep quant_state on ctx, and "
               "dequantize again inside backward.")
        (gx,) = torch.autograd.grad(y.float().sum(), x)
        expected_gx = torch.ones(3, 5, D_OUT, dtype=dtype) @ W
        err = _diff(gx, expected_gx)
        expect(err <= tol * max(1.0, expected_gx.abs().max().item()),
               f"{what}: the gradient with respect to x differs from grad_output @ W by up to {err:.3g}.",
               "backward returns (grad_output @ W, None, None, None): one gradient per input of forward.")
    passed(f"MatMulNF4 equals F.linear with the dequantized weight, forward and backward, and keeps no copy of "
           f"W for backward ({sum(s[2] for s in saved):,} extra bytes; a bf16 copy would be {D_IN * D_OUT * 2:,})")


# ------------------------------------------------------------------------------------- ex04_nf4_linear

def nf4_linear(cls) -> None:
    """4-bit storage only, bitsandbytes' packed bytes, bitsandbytes' outputs, nothing trainable."""
    from lorakit.qlora import bitsandbytes_lora

    _callable(cls, "NF4Linear")
    lin = _linear(bias=False)
    layer = cls(lin)
    expect(isinstance(layer, nn.Module), f"NF4Linear(linear) should build an nn.Module; found {type(layer).__name__}.")
    copies = _full_size_float_tensors(layer, D_IN * D_OUT // 4)
    expect(not copies, f"NF4Linear keeps a 16/32-bit copy of the weight: {copies}.",
           "store only the packed uint8 bytes (a buffer) and the quantization state; do not keep `linear`.")
    packed = getattr(layer, "weight", None)
    expect(isinstance(packed, torch.Tensor) and packed.dtype == torch.uint8,
           f"`layer.weight` should be the packed uint8 tensor from quantize_nf4; found "
           f"{packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__}.",
           "self.register_buffer('weight', packed).")
    expect(tuple(packed.shape) == (D_IN * D_OUT // 2, 1),
           f"packed weight of a {D_OUT} x {D_IN} layer: expected shape ({D_IN * D_OUT // 2}, 1); found {tuple(packed.shape)}.")
    state = getattr(layer, "quant_state", None)
    expect(state is not None and getattr(state, "offset", None) is not None,
           "`layer.quant_state` should be the NF4State from quantize_nf4 with double quantization "
           "(its `offset` is set).", "quantize_nf4(linear.weight, blocksize, double_quant=True) by default.")
    expected = _bnb_bytes(lin)
    same = torch.equal(packed.cpu(), expected)
    expect(same, f"your packed bytes differ from bitsandbytes' quantize_4bit(nf4) in "
                 f"{(packed.cpu() != expected).sum().item()} of {expected.numel()} bytes.",
           "quantize with lorakit.nf4.quantize_nf4 (blocksize 64), which matches bitsandbytes byte for byte.")
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    expect(not trainable, f"NF4Linear should have no trainable parameters; found {trainable}.",
           "the 4-bit weight is a buffer, and a bias (if any) gets requires_grad=False.")
    bnb = bitsandbytes_lora(lin).base_layer
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
        x = torch.randn(4, 7, D_IN, dtype=dtype, requires_grad=True)
        y = layer(x)
        with torch.no_grad():
            ref = bnb(x.detach())
        expect(y.dtype == dtype, f"an input in {dtype} should give an output in {dtype}; found {y.dtype}.")
        err = _diff(y, ref)
        expect(err <= tol * max(1.0, ref.abs().max().item()),
               f"input in {dtype}: your layer's output differs from bitsandbytes' Linear4bit by up to {err:.3g}.",
               "forward should be MatMulNF4.apply(x, self.weight, self.quant_state, self.bias).")
        (gx,) = torch.autograd.grad(y.float().sum(), x)
        expect(gx is not None and torch.isfinite(gx).all(), "gradients should flow back to the input x.")
    passed(f"NF4Linear stores {packed.numel():,} packed bytes, equal to bitsandbytes' to the byte, and its "
           f"outputs match bitsandbytes' Linear4bit")


# ------------------------------------------------------------------------------------ ex04_qlora_linear

def qlora_linear(cls) -> None:
    """A 4-bit base, adapters only trainable, outputs equal to bitsandbytes Linear4bit + peft, merge refuses."""
    from lorakit.qlora import bitsandbytes_lora, copy_adapters

    _callable(cls, "QLoRALinear")
    r, alpha = 8, 16
    lin = _linear(bias=False, seed=1)
    layer = cls(lin, r, alpha)
    for name in ("base_layer", "lora_A", "lora_B", "scaling"):
        expect(hasattr(layer, name), f"your QLoRALinear has no `{name}`.",
               "subclass LoRALinear and call super().__init__(linear, r, alpha, dropout) first.")
    copies = _full_size_float_tensors(layer.base_layer, D_IN * D_OUT // 4)
    expect(not copies, f"the base layer still holds a 16/32-bit weight: {copies}.",
           "after super().__init__, replace self.base_layer by NF4Linear(linear).")
    trainable = sorted(n for n, p in layer.named_parameters() if p.requires_grad)
    expect(trainable == ["lora_A.weight", "lora_B.weight"],
           f"only lora_A.weight and lora_B.weight should be trainable; found {trainable}.")
    expect(close(layer.scaling, alpha / r), f"alpha={alpha}, r={r}: scaling should be {alpha / r}; found {layer.scaling!r}.")
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.05)  # a trained-looking B, so the adapter path counts
    twin = bitsandbytes_lora(lin, r, alpha)
    copy_adapters(layer, twin)
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
        x = torch.randn(2, 9, D_IN, dtype=dtype)
        with torch.no_grad():
            y, ref = layer(x), twin(x)
        err = _diff(y, ref)
        expect(err <= tol * max(1.0, ref.abs().max().item()),
               f"input in {dtype}: your QLoRALinear differs from bitsandbytes Linear4bit + peft LoRA by up to {err:.3g}.",
               "forward is base_layer(x) + lora_B(lora_A(dropout(x))) * scaling: LoRALinear's forward does it "
               "once base_layer is your NF4Linear.")
    try:
        layer.merge()
        raised = None
    except NotImplementedError as e:
        raised = e
        expect(False, "merge() raises NotImplementedError: the exercise is not finished yet.")
    except Exception as e:  # noqa: BLE001 - any clear error is fine
        raised = e
    expect(raised is not None, "merge() on a 4-bit layer should raise an error that explains why, not merge.",
           "raise an exception whose message says that merging into 4 bits rounds the update away and "
           "shows the supported way: merge into a 16-bit copy.")
    msg = str(raised)
    expect("16" in msg, f"merge()'s message should point to the supported way, a 16-bit copy; it says: {msg!r}.",
           "mention merging into a 16-bit (bf16) copy of the weights.")
    passed("QLoRALinear: 4-bit base, only the adapters train, outputs equal to bitsandbytes Linear4bit + peft, "
           "and merge() explains itself")


# ------------------------------------------------------------------------------ ex04_quantize_and_inject

def tiny_llama(seed: int = 0, hidden: int = 128, intermediate: int = 256, layers: int = 2, vocab: int = 256):
    """A random-init Llama with every size a multiple of 64, for checks and tests (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def quantize_and_inject(fn, qlora_cls) -> None:
    """Targets replaced, everything else frozen, the right count returned, gradients reach only adapters."""
    import copy

    from lorakit import qlora

    _callable(fn, "quantize_and_inject")
    targets, r, alpha = ["q_proj", "v_proj"], 4, 8
    base = tiny_llama()
    model, reference = base, copy.deepcopy(base)
    n = fn(model, targets, r, alpha)
    n_ref = qlora.quantize_and_inject(reference, targets, r, alpha)
    expect(n == n_ref, f"q_proj and v_proj of a 2-layer Llama (hidden 128) at r={r}: expected {n_ref:,} trainable "
                       f"parameters to be returned; found {n!r}.", "return sum(p.numel() for p in model.parameters() if p.requires_grad).")
    names = [name for name, _ in model.named_modules() if name.endswith(("q_proj", "v_proj"))]
    wrong = [name for name in names if not isinstance(model.get_submodule(name), qlora_cls)]
    expect(not wrong, f"these target layers were not replaced by your QLoRALinear: {wrong}.",
           "setattr(parent, child_name, QLoRALinear(module, r, alpha)) for every matching name.")
    others = [name for name, m in model.named_modules() if name.endswith(("k_proj", "o_proj", "up_proj"))
              and not isinstance(m, nn.Linear)]
    expect(not others, f"only q_proj and v_proj should change; these changed too: {others}.")
    trainable = sorted({n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad})
    expect(trainable == ["lora_A", "lora_B"], f"only lora_A and lora_B should be trainable; trainable: {trainable}.",
           "freeze every parameter of the model first (requires_grad_(False)), then inject.")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = _diff(model(ids).logits, reference(ids).logits)
    expect(err < 1e-4, f"at initialisation (B = 0) your model's logits should equal the reference QLoRA model's; "
                       f"they differ by {err:.3g}.", "quantize with your QLoRALinear, default blocksize 64.")
    model.train()
    model(ids, labels=ids).loss.backward()
    with_grad = sorted({n.split(".")[-2] for n, p in model.named_parameters() if p.grad is not None})
    expect(with_grad == ["lora_A", "lora_B"], f"after backward, only adapters should have gradients; found {with_grad}.")
    b_grads = [p.grad.abs().sum().item() for n, p in model.named_parameters() if n.endswith("lora_B.weight")]
    expect(all(g > 0 for g in b_grads), "every lora_B should receive a non-zero gradient after backward.")
    passed(f"quantize_and_inject: {len(names)} layers quantized to NF4 with adapters, {n:,} trainable "
           f"parameters, gradients reach the adapters only")


# ----------------------------------------------------------------------------------- ex04_stored_bits

def stored_bits(fn, model) -> None:
    from lorakit.nf4 import bits_per_param
    from lorakit.qlora import stored_bits_per_param

    _callable(fn, "stored_bits")
    expected = stored_bits_per_param(model)
    got = fn(model)
    expect(close(got, expected, rel=1e-6),
           f"expected {expected:.4f} bits per 4-bit weight (packed bytes + absmax codes + offset + second-level "
           f"absmax, times 8, over the weights' count); found {got!r}.",
           "for each NF4Linear: weight.numel() * weight.element_size() + quant_state.nbytes(); sum, times 8, "
           "divided by the sum of in_features * out_features.")
    limit = bits_per_param(64, double_quant=True)
    passed(f"{got:.4f} bits per weight stored, {got / limit:.4f} x the 4.127-bit limit of NF4 + double quantization")
