"""DoRA from scratch: LoRA's update split into a direction and a learned magnitude per output feature.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353) writes a weight
as a magnitude times a direction. For each output feature o (row o of the (out, in) weight):

    W'[o] = m[o] * (W0 + s B A)[o] / ||(W0 + s B A)[o]||

W0 is frozen, B A is the LoRA update scaled by s = alpha / r, and m (out,) is a trainable magnitude that
starts at ||W0[o]||, so the adapted layer starts equal to the base layer. (The paper stores weights as
(in, out) and calls this the column-wise norm, ||.||_c; torch's nn.Linear stores (out, in), so it is
the norm of each row here, as in peft.) A forward pass is then

    h = (m / ||W0 + s B A||) * (W0 x + s B A x) + bias                         (paper, eq. 5)

Section 4.3 of the paper treats the norm as a constant in backward ("detaching it from the gradient
graph"), which saves the memory of its gradient; peft does the same (`weight_norm.detach()` in
peft/tuners/lora/dora.py), and so does this layer. Gradients still reach m, A and B, just not through
the norm.

`DoRALinear` is lesson 02's `LoRALinear` plus the magnitude vector, with peft's names
(`lora_magnitude_vector`, `get_weight_norm` -> `weight_norm`). Its forward follows peft's arrangement,
`base(x) + (m/||.|| - 1) * (W0 x) + (m/||.||) * s B A x`, which reuses the base layer's output instead of
a second matmul with W0 and equals the formula above. Lesson 07 proves it equal to peft's
`LoraConfig(use_dora=True)` in outputs, gradients and merged weights.

Lesson 07's first exercise, `dora_forward(x, weight, bias, lora_A, lora_B, magnitude, scaling)`, is the formula
above as one function of the layer's tensors (no dropout, no layer), with the same `weight_norm`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.lora import LoRALinear, replace_linears
from lorakit.lora_config import resolve_config

__all__ = ["DoRALinear", "inject_dora", "weight_norm", "dora_forward"]


def weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W0 + delta|| of each output row: (out, in), (out, in) -> (out,), detached (DoRA, section 4.3)."""
    return torch.linalg.norm(weight + delta, dim=1).to(weight.dtype).detach()   # (out,)


def dora_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float) -> torch.Tensor:
    """DoRA's output for x (..., in): (m / ||W0 + s B A||) * (x W0^T + s x A^T B^T) + bias, with weight (out, in),
    lora_A (r, in), lora_B (out, r), magnitude (out,) and the norm a constant in backward (lesson 07's exercise 1)."""
    scale = magnitude / weight_norm(weight, scaling * (lora_B @ lora_A))               # (out,)
    lora = F.linear(F.linear(x, lora_A), lora_B)                                       # (..., out) B A x
    return scale * (F.linear(x, weight) + scaling * lora) + (0 if bias is None else bias)


class DoRALinear(LoRALinear):
    """A frozen `nn.Linear` adapted with DoRA: magnitude `lora_magnitude_vector` (out,) times the direction
    of W0 + scaling * B A, each row normalised.

    base        the nn.Linear to adapt (kept as `base_layer`, frozen)
    r, alpha    LoRA's rank and alpha: lora_A (r x in), lora_B (out x r), scaling = alpha / r
    dropout     on the adapter's input, as in peft (with dropout active, W0 x in the DoRA term sees the
                dropped-out x too, exactly as peft computes it)
    config      the knobs in one object instead: a `LoRAConfig`, or peft's `LoraConfig` (use_dora=True or not)

    Trainable: lora_A, lora_B and lora_magnitude_vector (out) - r * (in + out) + out numbers per layer.
    """

    def __init__(self, base: nn.Linear, r: int | None = None, alpha: float | None = None,
                 dropout: float | None = None, use_rslora: bool | None = None, *, config=None):
        if isinstance(base, LoRALinear):
            raise TypeError(f"this layer already is a {type(base).__name__}: wrap the plain nn.Linear once, not twice.")
        if not isinstance(base, nn.Linear):
            kind = type(base).__name__
            raise TypeError(f"DoRALinear adapts an nn.Linear; got {kind}. DoRA normalises each output row of a 2-D "
                            f"weight (out x in); for {kind} layers use peft's LoraConfig(use_dora=True), which has "
                            f"DoRA variants for nn.Embedding and nn.Conv1d/2d/3d, or leave this module out of "
                            f"target_modules.")
        # peft's use_dora=True is what this layer builds, so a peft config may carry it
        super().__init__(base, config=resolve_config(config, "DoRALinear", allow=("use_dora",), r=r, alpha=alpha,
                                                     dropout=dropout, use_rslora=use_rslora))
        # m starts at ||W0 + s B A|| = ||W0|| (B = 0): the layer starts equal to its base. Computed in W0's
        # dtype and then kept in the adapters' (fp32 beside a 16-bit base), as peft does: its adapters are
        # still in the base dtype when DoRA initialises and are upcast afterwards.
        W = self.base_layer.weight
        self.lora_magnitude_vector = nn.Parameter(torch.linalg.norm(W.detach(), dim=1).to(self.lora_A.weight.dtype))
        self._merged_norm = None

    def weight_norm(self) -> torch.Tensor:
        """||W0 + scaling * B A|| per output row (out,), detached, in the adapters' dtype (peft's forward pass
        casts its input to that dtype and computes the norm in it)."""
        dtype = self.lora_A.weight.dtype
        lora_weight = (self.lora_B.weight @ self.lora_A.weight).detach().to(dtype)      # (out, in)
        return weight_norm(self.base_layer.weight.to(dtype), self.scaling * lora_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)                                                   # (..., out) W0 x + bias
        if self.merged:
            return result
        x = x.to(self.lora_A.weight.dtype)
        scale = self.lora_magnitude_vector / self.weight_norm()                       # (out,) m / ||W0 + s B A||
        dropped = self.lora_dropout(x)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base = result if bias is None else result - bias                          # W0 x, reused
        else:                                                                         # W0 dropout(x), as peft does
            base = F.linear(dropped, self.base_layer.weight.to(x.dtype))
        lora = self.lora_B(self.lora_A(dropped))                                      # (..., out) B A x
        # the same order of operations as peft, so that the two agree to the last bit where they can
        return (result + ((scale - 1) * base + scale * lora * self.scaling)).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- (m / ||W0 + s B A||) * (W0 + s B A): one plain matmul at inference. The norm is kept so that
        `unmerge` can invert it (it cannot be recomputed from the merged weight)."""
        if self.merged:
            warnings.warn("this DoRALinear is already merged; nothing was done. Call unmerge() first.", stacklevel=2)
            return
        W = self.base_layer.weight
        delta = self.delta_weight()                                                   # (out, in) s B A
        norm = weight_norm(W.to(delta.dtype), delta)
        self._merged_norm = norm
        W.copy_(((self.lora_magnitude_vector / norm).unsqueeze(1) * (W + delta)).to(W.dtype))
        self.merged = True

    # merge/unmerge deliberately read like LoRALinear's (the same guards and warnings, as peft's LoRA and DoRA
    # layers share them): only the update differs, a magnitude-scaled direction instead of a sum.
    @torch.no_grad()
    def unmerge(self) -> None:
        """The inverse of `merge`: W0 = W' / (m / norm) - s B A (equal up to float rounding, as in peft)."""
        if not self.merged:
            warnings.warn("this DoRALinear is not merged; nothing to unmerge.", stacklevel=2)
            return
        W = self.base_layer.weight
        factor = (self.lora_magnitude_vector / self._merged_norm).unsqueeze(1)        # (out, 1)
        W.copy_((W / factor - self.delta_weight()).to(W.dtype))
        self.merged, self._merged_norm = False, None


def inject_dora(model: nn.Module, target_modules=None, r: int | None = None, alpha: float | None = None,
                dropout: float | None = None, use_rslora: bool | None = None, *, config=None) -> int:
    """Freeze `model` and replace every `nn.Linear` whose name matches `target_modules` by a `DoRALinear`
    (peft: `LoraConfig(use_dora=True)`). The knobs come loose or as `config=`, as in `lorakit.lora.inject_lora`.
    Returns the number of trainable parameters."""
    cfg = resolve_config(config, "inject_dora", allow=("use_dora",), target_modules=target_modules, r=r, alpha=alpha,
                         dropout=dropout, use_rslora=use_rslora)
    return replace_linears(model, cfg.target_modules if target_modules is None else target_modules,
                           lambda m: DoRALinear(m, config=cfg), method="DoRA")
