"""QLoRA from scratch: a frozen NF4 weight, dequantized on the fly, with trainable LoRA adapters beside it.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) fine-tunes a model whose frozen weights are stored in
4 bits and trains only LoRA adapters kept in 16/32 bits:

    Y = X dequant(W_nf4)^T + scaling * X A^T B^T

The 4-bit weight is never trained. On each forward pass it is unpacked to the compute dtype (bf16),
used for one matmul, and thrown away. The backward pass needs W again for dL/dX = dL/dY W. Autograd
would normally keep the 16-bit copy alive until then, 4x the memory of the 4-bit weight. `MatMulNF4`
keeps only the packed bytes the layer already holds and dequantizes a second time in backward. That
trades a little compute for memory, as bitsandbytes' `MatMul4Bit` does.

Built from lessons 02 and 03's reference code: `NF4Linear` quantizes with `lorakit.nf4`, and
`QLoRALinear` is a `lorakit.lora.LoRALinear` whose `base_layer` is an `NF4Linear`. The layout is the
one peft uses around a bitsandbytes `Linear4bit` (`base_layer`, `lora_A`, `lora_B`, `scaling`). Lesson
04 shows that the two give the same packed bytes and the same outputs.

Lesson 04's exercises under their own names: `MatMulNF4`, `NF4Linear`, `QLoRALinear`,
`quantize_and_inject` and `stored_bits(model)`. The peft-facing code sits at
the end: `bitsandbytes_lora` (the real layer, for comparison), `copy_adapters`, and lesson 02's exercise 5,
`copy_into_peft(my_model, peft_model)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.lora import LoRALinear, replace_linears
from lorakit.lora_config import resolve_config
from lorakit.nf4 import BLOCKSIZES, NF4State, dequantize_nf4, quantize_nf4

__all__ = ["MatMulNF4", "NF4Linear", "QLoRALinear", "QLoRAMergeError", "quantize_and_inject",
           "merged_linear", "merge_to_16bit", "stored_bits", "stored_bits_per_param"]


class QLoRAMergeError(RuntimeError):
    """merge() was called on a 4-bit layer; the message explains the supported way."""


# ------------------------------------------------------------------------------------- the matmul

class MatMulNF4(torch.autograd.Function):
    """y = x W^T + bias, with W = dequantize_nf4(weight, quant_state) made twice: once in forward and
    once in backward. Only the packed bytes (which the layer holds anyway) are kept for backward, never
    the 16-bit W."""

    @staticmethod
    def forward(ctx, x, weight, quant_state, bias=None):
        W = dequantize_nf4(weight, quant_state, dtype=x.dtype)                    # (out, in), temporary
        ctx.quant_state = quant_state
        ctx.save_for_backward(weight)                                             # packed uint8, 0.5 B/param
        return F.linear(x, W, None if bias is None else bias.to(x.dtype))        # (..., out)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            W = dequantize_nf4(weight, ctx.quant_state, dtype=grad_output.dtype)  # recomputed, not saved
            grad_x = grad_output @ W                                              # (..., out) @ (out, in)
        return grad_x, None, None, None                                           # W and bias are frozen


# ------------------------------------------------------------------------------ the frozen 4-bit base

class NF4Linear(nn.Module):
    """A frozen linear layer stored as NF4: packed bytes plus the quantization state, no 16-bit copy.

    linear         the nn.Linear to quantize (its weight is read once and not kept)
    blocksize      numbers per absmax block (64 in QLoRA); `in_features` must be a multiple of it
    double_quant   also quantize the absmax values to 8 bits (QLoRA's double quantization)
    compute_dtype  the dtype the weight is dequantized to for the matmul. None: the input's dtype, or
                   the autocast dtype inside `torch.autocast` (bitsandbytes' `Linear4bit` behaves alike)

    The packed weight and every tensor of the state are buffers, so `.to(device)`, `state_dict()` and
    `lorakit.memory.measure` see them all.
    """

    def __init__(self, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear quantizes an nn.Linear (a layer with an out x in weight matrix); got "
                            f"{type(linear).__name__}. Pass the linear layer itself, e.g. model.model.layers[0].self_attn.q_proj.")
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES} (what bitsandbytes supports); got {blocksize}.")
        if linear.in_features % blocksize:
            raise ValueError(
                f"in_features={linear.in_features} is not a multiple of blocksize={blocksize}: each block of "
                f"{blocksize} weights should lie inside one row, and bitsandbytes' CPU kernels need it too. "
                f"Use a blocksize that divides {linear.in_features}, or keep this layer in 16 bits (leave it out of target_modules).")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        packed, state = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        self.register_buffer("weight", packed)                                    # (out * in / 2, 1) uint8
        for name in ("absmax", "code", "offset", "absmax2", "code2"):
            self.register_buffer(name, getattr(state, name))
        self.shape, self.weight_dtype = state.shape, state.dtype
        self.blocksize, self.blocksize2 = state.blocksize, state.blocksize2
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def quant_state(self) -> NF4State:
        """The state `dequantize_nf4` needs, built from this layer's (possibly moved) buffers."""
        return NF4State(absmax=self.absmax, shape=self.shape, dtype=self.weight_dtype, blocksize=self.blocksize,
                        code=self.code, offset=self.offset, absmax2=self.absmax2, code2=self.code2,
                        blocksize2=self.blocksize2)

    @property
    def double_quant(self) -> bool:
        return self.offset is not None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full weight (out, in) in `dtype` (default: the dtype it was quantized from)."""
        return dequantize_nf4(self.weight, self.quant_state, dtype=dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        dtype = self.compute_dtype
        if dtype is None and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)  # dequantize straight to bf16, not fp32 first
        x = x.to(dtype or inp_dtype)
        return MatMulNF4.apply(x, self.weight, self.quant_state, self.bias).to(inp_dtype)

    def nbytes(self) -> int:
        """Bytes this layer stores for its weight: packed codes plus quantization constants (the shared
        16- and 256-entry code tables are not counted, bias neither)."""
        return self.weight.numel() * self.weight.element_size() + self.quant_state.nbytes()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


# ------------------------------------------------------------------------------------ the QLoRA layer

class QLoRALinear(LoRALinear):
    """LoRA adapters (lesson 02's `LoRALinear`) around a frozen `NF4Linear`:
    base_layer(x) + lora_B(lora_A(dropout(x))) * scaling, where only lora_A and lora_B train.

    The adapters are fp32 (like peft's), the base computes in `compute_dtype`. The LoRA knobs come loose (r,
    alpha, dropout, use_rslora: defaults 8, 8, 0.0, False) or as `config=` (a `LoRAConfig` or peft's
    `LoraConfig`); blocksize, double_quant and compute_dtype are the quantization's (peft: BitsAndBytesConfig)."""

    def __init__(self, linear: nn.Linear, r: int | None = None, alpha: float | None = None,
                 dropout: float | None = None, blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype | None = None, use_rslora: bool | None = None, *, config=None):
        if isinstance(linear, (LoRALinear, NF4Linear)):
            raise TypeError(f"this layer already is a {type(linear).__name__}: build a QLoRALinear from the "
                            f"plain 16/32-bit nn.Linear, once.")
        cfg = resolve_config(config, type(self).__name__, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        base = NF4Linear(linear, blocksize, double_quant, compute_dtype)          # validates the layer
        super().__init__(linear, config=cfg)                                     # adapters, scaling, as in LoRA
        self.base_layer = base                                                   # the 16-bit weight is dropped

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int | None = None, alpha: float | None = None,
                    dropout: float | None = None, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None, use_rslora: bool | None = None, *,
                    config=None) -> "QLoRALinear":
        """Quantize `linear`'s weight to NF4 and put fresh LoRA adapters (B = 0) beside it."""
        return cls(linear, r, alpha, dropout, blocksize, double_quant, compute_dtype, use_rslora, config=config)

    def merge(self) -> None:
        raise QLoRAMergeError(
            "merge() on a 4-bit layer is not supported: adding scaling * B @ A into the NF4 weight means "
            "re-quantizing W + B A, and the rounding (one of 16 levels per block) swallows most of the "
            "small update, so the merged model is not the model you trained. Merge into a 16-bit copy "
            "instead: `layer.to_merged_linear(torch.bfloat16)` for one layer, or "
            "`lorakit.qlora.merge_to_16bit(model)` for a whole model (peft: load the base model in 16 "
            "bits, load the adapters, then merge_and_unload()).")

    def to_merged_linear(self, dtype: torch.dtype = torch.bfloat16) -> nn.Linear:
        """A plain nn.Linear in `dtype` holding dequantize(W) + scaling * B @ A (see `merged_linear`)."""
        return merged_linear(self, dtype)

    def extra_repr(self) -> str:
        return super().extra_repr().replace(", merged=False", "")


# ----------------------------------------------------------------------------------------- the model

def quantize_and_inject(model: nn.Module, target_modules=None, r: int | None = None, alpha: float | None = None,
                        dropout: float | None = None, blocksize: int = 64, double_quant: bool = True,
                        compute_dtype: torch.dtype | None = None, use_rslora: bool | None = None, *,
                        config=None) -> int:
    """Freeze `model` and replace every `nn.Linear` whose name matches `target_modules` (peft's rule: a
    list of name suffixes or one regular expression) by a `QLoRALinear`, in place. The LoRA knobs come loose
    or as `config=` (target_modules included), as in `lorakit.lora.inject_lora`. Returns the number of
    trainable parameters: the adapters only."""
    cfg = resolve_config(config, "quantize_and_inject", target_modules=target_modules, r=r, alpha=alpha,
                         dropout=dropout, use_rslora=use_rslora)
    return replace_linears(
        model, cfg.target_modules if target_modules is None else target_modules,
        lambda m: QLoRALinear(m, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype,
                              config=cfg),
        adapted=(LoRALinear, NF4Linear), method="QLoRA")


def _is_4bit(module: nn.Module) -> bool:
    """A layer holding packed NF4 bytes and their NF4State (ours, or a learner's own NF4Linear)."""
    w = getattr(module, "weight", None)
    return (isinstance(w, torch.Tensor) and w.dtype == torch.uint8
            and isinstance(getattr(module, "quant_state", None), NF4State))


@torch.no_grad()
def merged_linear(layer: LoRALinear, dtype: torch.dtype = torch.bfloat16) -> nn.Linear:
    """The supported merge for one layer: a plain nn.Linear in `dtype` holding
    dequantize(W) + scaling * B @ A, computed in fp32 and rounded once."""
    base = getattr(layer, "base_layer", None)
    if not _is_4bit(base):
        raise TypeError(f"merged_linear expects a LoRA layer around a 4-bit NF4 base; got {type(layer).__name__}.")
    weight = dequantize_nf4(base.weight, base.quant_state, dtype=torch.float32) + layer.delta_weight().float()
    bias = getattr(base, "bias", None)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    out.weight.copy_(weight)                                                      # (out, in)
    if bias is not None:
        out.bias.copy_(bias)
    return out


@torch.no_grad()
def merge_to_16bit(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The supported merge for a model: replace every LoRA layer around a 4-bit base by a plain
    `nn.Linear` in `dtype` holding dequantize(W) + scaling * B @ A. The model then has the base
    architecture, in 16 bits, with the fine-tune inside. Returns the model."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear) and _is_4bit(m.base_layer)]
    if not layers:
        raise ValueError("merge_to_16bit found no QLoRA layers in this model: call quantize_and_inject first.")
    for name, m in layers:
        model.set_submodule(name, merged_linear(m, dtype))
    return model


def stored_bits(model: nn.Module) -> float:
    """Bits stored per weight of the 4-bit layers (packed codes + quantization constants) averaged over
    every NF4 layer in `model`, lorakit's or bitsandbytes' (lesson 04's exercise 5); NF4 with double
    quantization approaches 4 + 8/64 + 32/(64*256) = 4.127."""
    layers = [m for m in model.modules() if _is_4bit(m)]
    if not layers:
        raise ValueError("no NF4 layers in this model: quantize it first (quantize_and_inject).")
    stored = sum(m.weight.numel() * m.weight.element_size() + m.quant_state.nbytes() for m in layers)
    return 8 * stored / sum(m.quant_state.numel for m in layers)


# The name lesson 04's notebook, the tests and bench_qlora used before the function took the exercise's name.
stored_bits_per_param = stored_bits


# --------------------------------------------------------------------------- the real thing, for comparison

def bitsandbytes_lora(linear: nn.Linear, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                      compute_dtype: torch.dtype | None = None, blocksize: int = 64):
    """The layer `QLoRALinear` rebuilds, made with the real libraries: bitsandbytes `Linear4bit` (nf4, double
    quantization = compress_statistics) from `linear`'s weights, wrapped by peft's LoRA layer for 4-bit bases.
    Lesson 04, its checks, the tests and the benchmarks compare `QLoRALinear` with it.

    bitsandbytes' CPU inference repack is switched off (`lorakit.models.disable_cpu_inference_repack`) so
    that the adapters keep receiving gradients after an evaluation in eval() mode under no_grad."""
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    from lorakit.env import import_bitsandbytes
    from lorakit.models import disable_cpu_inference_repack

    bnb = import_bitsandbytes()

    if not isinstance(linear, nn.Linear):
        raise TypeError(f"bitsandbytes_lora quantizes an nn.Linear; got {type(linear).__name__}")
    device = linear.weight.device
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                          quant_storage=torch.uint8, device="meta")
    q.weight = bnb.nn.Params4bit(linear.weight.detach().to("cpu").clone(), requires_grad=False,
                                 compress_statistics=True, quant_type="nf4", blocksize=blocksize)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    q = q.to(device)                                                              # quantizes here
    disable_cpu_inference_repack(q)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout)
    layer = PeftLinear4bit(q, "default", config, r=r, lora_alpha=alpha)
    # Adapters in fp32, as get_peft_model leaves them (autocast_adapter_dtype=True) and as LoRALinear keeps
    # them; built directly, peft would give them the base layer's compute dtype.
    layer.lora_A.float()
    layer.lora_B.float()
    return layer


@torch.no_grad()
def copy_adapters(src: nn.Module, dst: nn.Module) -> None:
    """Copy lora_A / lora_B weights from one LoRA layer to another, lorakit's or peft's (peft keeps them in
    a ModuleDict per adapter name; the active one is used): two layers with the same adapters."""
    def linear(layer, part):
        m = getattr(layer, part)
        if isinstance(m, nn.ModuleDict):
            m = m[layer.active_adapters[0]]
        return m

    for part in ("lora_A", "lora_B"):
        linear(dst, part).weight.copy_(linear(src, part).weight)


@torch.no_grad()
def copy_into_peft(my_model: nn.Module, peft_model: nn.Module) -> None:
    """Lesson 02's exercise 5: `copy_adapters` from every `LoRALinear` of `my_model` into the peft layer of the
    same name, so that the two models give the same logits. peft wraps the model twice (PeftModel, then its
    tuner), so the layer names of `my_model` are found under `peft_model.base_model.model`."""
    inner = peft_model.base_model.model
    for name, layer in my_model.named_modules():
        if isinstance(layer, LoRALinear):
            copy_adapters(layer, inner.get_submodule(name))


__all__ += ["bitsandbytes_lora", "copy_adapters", "copy_into_peft"]
