"""LoftQ from scratch: start QLoRA's adapters where they cancel the quantization error.

QLoRA freezes Q = NF4(W) and starts the adapters at B A = 0, so training begins from the quantized model,
which is off from W by the quantization error W - dequant(Q). LoftQ (Li et al. 2023, "LoftQ:
LoRA-Fine-Tuning-Aware Quantization for Large Language Models", arXiv 2310.08659, Algorithm 1) chooses Q,
A and B together so that dequant(Q) + s B A is as close to W as rank r allows, alternating two steps:

    Q_t        = NF4(W - s B_{t-1} A_{t-1})              quantize what the adapters do not cover
    A_t, B_t   = best rank-r approximation of (W - dequant(Q_t)) / s     (truncated SVD)

starting from B_0 A_0 = 0. One iteration already sets B A to the rank-r part of plain NF4's error; more
iterations let Q absorb what the adapters explain and the adapters what Q cannot.

The NF4 step is `lorakit.nf4.quantize_nf4` (bit-exact with bitsandbytes, blocks of 64, no double
quantization: the settings peft's `loftq_init` uses), the SVD split puts sqrt(S) on both sides as peft's
`_low_rank_decomposition` does: B = U sqrt(S), A = sqrt(S) V^T.

The rank and the scaling come loose (`r`, `scaling`) or from a LoRA config (`config=`: a `LoRAConfig`, or
peft's `LoraConfig`, `init_lora_weights="loftq"` and its `loftq_config` included), whose scaling is alpha / r.

One difference from peft on purpose: peft's LoftQ ignores the LoRA scaling s = alpha / r (peft issue
#1982): it sets B A to the residual's rank-r part, so with alpha != r the layer's update s B A starts at s
times that part. Here the SVD factors are divided by sqrt(s) each, so s B A is the residual's part for any
alpha; with alpha = r (s = 1) the result is peft's. Lesson 07 measures both.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

from lorakit.lora_config import check_rank, resolve_config
from lorakit.nf4 import NF4State, dequantize_nf4, nf4_code, quantize_nf4

__all__ = ["LoftQResult", "low_rank", "loftq_iteration", "loftq_init", "reconstruction_error", "peft_on_cpu",
           "nfquantizer_roundtrip"]


def _rank_and_scaling(r, scaling, config, who: str) -> tuple[int, float]:
    """(r, scaling) from the loose arguments (scaling 1.0 when not given) or from `config`, whose scaling is
    alpha / r; a loose value the config disagrees with is an error, as in `lorakit.lora_config.resolve_config`."""
    if config is None:
        if r is None:
            raise TypeError(f"{who} needs the LoRA rank: pass r (e.g. r=16) or config=LoRAConfig(r=16, ...).")
        return r, 1.0 if scaling is None else scaling
    cfg = resolve_config(config, who, allow=("init_lora_weights", "loftq_config"), r=r)
    init, bits = getattr(config, "init_lora_weights", True), getattr(config, "loftq_config", {}).get("loftq_bits", 4)
    if init not in (True, "loftq") or bits != 4:
        raise ValueError(f"{who} builds LoftQ with 4-bit NF4; this peft LoraConfig asks for init_lora_weights="
                         f"{init!r} with {bits} bits. Use init_lora_weights='loftq' and loftq_bits=4, or peft.")
    if scaling is not None and scaling != cfg.scaling:
        raise ValueError(f"{who} got config= with scaling {cfg.scaling!r} (alpha / r) and also scaling={scaling!r}: "
                         f"drop scaling={scaling!r} (the config carries it), or drop config=.")
    return cfg.r, cfg.scaling


def _check(weight: torch.Tensor, r: int, scaling: float) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        got = f"a tensor of shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"LoftQ works on a 2-D weight matrix (out x in), like a linear layer's .weight; got {got}.")
    check_rank(r)
    out_features, in_features = weight.shape
    if r > min(out_features, in_features):
        raise ValueError(
            f"r={r} is larger than this matrix allows: a {out_features} x {in_features} weight has rank at most "
            f"min({out_features}, {in_features}) = {min(out_features, in_features)}, so the SVD has no more "
            f"directions to give. Choose r <= {min(out_features, in_features)} (LoRA ranks are usually 8-64).")
    if not scaling > 0:
        raise ValueError(f"scaling (alpha / r) must be positive; got {scaling!r}.")


def low_rank(residual: torch.Tensor, r: int | None = None, scaling: float | None = None, *,
             config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-r approximation of `residual` (out, in) as LoRA factors, so that scaling * B @ A is
    it: lora_A (r, in) = sqrt(S/s) V^T and lora_B (out, r) = U sqrt(S/s), from the truncated SVD (fp32)."""
    r, scaling = _rank_and_scaling(r, scaling, config, "low_rank")
    _check(residual, r, scaling)
    U, S, Vh = torch.linalg.svd(residual.float(), full_matrices=False)         # (out, k), (k,), (k, in)
    root = torch.sqrt(S[:r] / scaling)                                          # (r,)
    return root.unsqueeze(1) * Vh[:r], U[:, :r] * root                          # A (r, in), B (out, r)


def loftq_iteration(weight: torch.Tensor, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
                    r: int | None = None, scaling: float | None = None, blocksize: int = 64, *,
                    config=None) -> tuple[torch.Tensor, NF4State, torch.Tensor, torch.Tensor]:
    """One LoftQ step: Q = NF4(W - s B A), then A, B = rank-r SVD of (W - dequant(Q)) / s.

    `lora_A`, `lora_B` are the previous step's factors (None, None for the first step: B A = 0).
    Returns (packed NF4 bytes, NF4State, new lora_A (r, in), new lora_B (out, r))."""
    r, scaling = _rank_and_scaling(r, scaling, config, "loftq_iteration")
    _check(weight, r, scaling)
    W = weight.detach().float()                                                 # (out, in), fp32 like peft
    target = W if lora_A is None else W - scaling * (lora_B.float() @ lora_A.float())
    packed, state = quantize_nf4(target, blocksize=blocksize, double_quant=False)
    residual = W - dequantize_nf4(packed, state, dtype=torch.float32)           # what Q misses of W
    lora_A, lora_B = low_rank(residual, r, scaling)
    return packed, state, lora_A, lora_B


def reconstruction_error(weight: torch.Tensor, packed: torch.Tensor, state: NF4State,
                         lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None,
                         scaling: float = 1.0) -> float:
    """||W - (dequant(Q) + s B A)|| (Frobenius), the error the model starts training from. Without adapters
    it is plain QLoRA's ||W - dequant(Q)||."""
    approx = dequantize_nf4(packed, state, dtype=torch.float32)
    if lora_A is not None:
        approx = approx + scaling * (lora_B.float() @ lora_A.float())
    return torch.linalg.norm(weight.detach().float() - approx).item()


@dataclass
class LoftQResult:
    """What `loftq_init` returns: the 4-bit weight, the adapters, and the error after each iteration."""
    packed: torch.Tensor              # NF4 codes, uint8 (n/2, 1)
    quant_state: NF4State
    lora_A: torch.Tensor              # (r, in) fp32
    lora_B: torch.Tensor              # (out, r) fp32
    scaling: float
    plain_error: float                # ||W - dequant(NF4(W))||: QLoRA's start, B A = 0
    errors: list[float] = field(default_factory=list)   # ||W - (dequant(Q_t) + s B_t A_t)|| for t = 1..T

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """dequant(Q) (out, in): the frozen base weight the adapters sit beside."""
        return dequantize_nf4(self.packed, self.quant_state, dtype=dtype)


def loftq_init(weight: torch.Tensor, r: int | None = None, scaling: float | None = None, num_iter: int | None = None,
               blocksize: int = 64, *, config=None) -> LoftQResult:
    """LoftQ (Algorithm 1): `num_iter` alternating steps of NF4 quantization and a rank-r SVD of the rest.

    With scaling = 1 (alpha = r) this is peft's `loftq_init(weight, num_bits=4, reduced_rank=r, num_iter)`:
    the same quantized weight and the same B A. num_iter: 1 unless given, or a peft config's loftq_iter."""
    r, scaling = _rank_and_scaling(r, scaling, config, "loftq_init")
    peft_iter = getattr(config, "loftq_config", {}).get("loftq_iter")
    if num_iter is not None and peft_iter is not None and num_iter != peft_iter:
        raise ValueError(f"loftq_init got num_iter={num_iter} and a peft config with loftq_iter={peft_iter}: drop one.")
    if num_iter is None:
        num_iter = 1 if peft_iter is None else peft_iter
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"num_iter must be a positive integer (LoftQ's paper uses 1 to 5); got {num_iter!r}.")
    _check(weight, r, scaling)
    packed, state = quantize_nf4(weight.detach().float(), blocksize=blocksize, double_quant=False)
    result = LoftQResult(packed, state, None, None, scaling, reconstruction_error(weight, packed, state))
    lora_A = lora_B = None
    for _ in range(num_iter):
        packed, state, lora_A, lora_B = loftq_iteration(weight, lora_A, lora_B, r, scaling, blocksize)
        result.errors.append(reconstruction_error(weight, packed, state, lora_A, lora_B, scaling))
    result.packed, result.quant_state, result.lora_A, result.lora_B = packed, state, lora_A, lora_B
    return result


# ------------------------------------------------------------------------- running peft's LoftQ on a CPU

class _AcceleratorMovesToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            cpu = lambda d: "cpu" if isinstance(d, (str, torch.device)) and torch.device(d).type in ("cuda", "xpu") else d  # noqa: E731
            args = tuple(cpu(a) for a in args)
            kwargs = {k: cpu(v) if k == "device" else v for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextmanager
def peft_on_cpu():
    """Inside this block, every `tensor.to("cuda")` (or "xpu") stays on the CPU.

    peft 0.21's LoftQ (`peft.utils.loftq_utils.loftq_init`, used by `LoraConfig(init_lora_weights="loftq")`)
    moves the weight to a hard-coded "cuda" (or "xpu") device, so on a machine without one it stops with
    "Torch not compiled with CUDA enabled". Its arithmetic (bitsandbytes NF4 and torch's SVD) runs on a
    CPU too; this lets the lesson and the tests run peft's own code unchanged and compare. Where CUDA is
    present nothing is redirected: peft runs where it was written to run."""
    if torch.cuda.is_available():
        yield
        return
    with _AcceleratorMovesToCpu():
        yield


def nfquantizer_roundtrip(weight: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Quantize and dequantize the way peft 0.17-0.19's `NFQuantizer` did (its fallback when bitsandbytes could
    not quantize to 4 bits; peft 0.20 removed it), for comparison with bitsandbytes: the same 16 NF4 values, but
    each block is divided by its absmax (bitsandbytes multiplies by 1/absmax) and a number takes the nearest
    value by argmin |x - value| (bitsandbytes counts the midpoints strictly below it). Checked against peft
    0.19.1's class: the same dequantized weights. Its numel must be a multiple of `blocksize`, as there."""
    blocks = weight.detach().reshape(-1, blocksize).float()                    # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    idx = torch.argmin(((blocks / absmax).unsqueeze(-1) - nf4_code()).abs(), dim=-1)
    return (nf4_code()[idx] * absmax).reshape(weight.shape)
