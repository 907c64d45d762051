"""LoRA from scratch: a low-rank adapter beside a frozen linear layer, injected by module name.

LoRA (Hu et al. 2021, arXiv 2106.09685) freezes a pretrained weight W0 (out x in) and learns its change
as a product of two thin matrices, B (out x r) and A (r x in), with r much smaller than in and out:

    h = W0 x + (alpha / r) * B A x

B starts at zero, so the adapted model starts exactly equal to the base model; only A and B train.
After training, B A can be added into W0 ("merged"), so inference costs nothing extra.

This file is lesson 02's reference and speaks peft's vocabulary (peft/tuners/lora/layer.py):
`base_layer`, `lora_A`, `lora_B`, `lora_dropout`, `scaling`, `merge()`, `unmerge()`, so that a learner
moving to `peft.get_peft_model(model, LoraConfig(...))` recognises every name, and the lesson proves
the two numerically equal. The knobs travel together in `LoRAConfig` (peft's field names); every layer and
function that takes them accepts `config=`, a `LoRAConfig` or peft's `LoraConfig`, beside the loose
arguments. `lorakit.qlora` builds its 4-bit layer on `LoRALinear`.

Lesson 02's exercises under their own names: `break_even_rank(d_in, d_out)`, `LoRALinear`, `inject_lora`
(exercise: `inject_lora(model, target_modules, r, alpha, dropout=0.0)`), `lorakit.train.training_step`, and
`copy_into_peft(my_model, peft_model)`, which lives in `lorakit.qlora` beside the other code that reaches into
peft's layers (`copy_adapters`).
"""

from __future__ import annotations

import math
import re
import warnings

import torch
from torch import nn

# The knobs and their checks live in lora_config; LoRAConfig is re-exported because lessons and peft users look
# for it beside the layer, lora_scaling because lesson 06 imports it from here.
from lorakit.lora_config import LoRAConfig, check_target_modules, lora_scaling, resolve_config

__all__ = ["break_even_rank", "LoRAConfig", "LoRALinear", "inject_lora", "replace_linears", "lora_state_dict",
           "merge_lora", "trainable_parameters", "concat_lora", "concat_adapters", "lora_scaling", "target_matches",
           "unmatched_targets"]


def break_even_rank(d_in: int, d_out: int) -> int:
    """The largest rank at which LoRA's A (r x d_in) and B (d_out x r) hold fewer numbers than the d_out x d_in
    weight they adapt: r * (d_in + d_out) < d_in * d_out. At higher ranks LoRA stores more than W itself (0: no
    rank saves anything)."""
    return (d_in * d_out - 1) // (d_in + d_out)


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update: base(x) + lora_B(lora_A(dropout(x))) * scaling.

    base        the layer to adapt; it is kept as `base_layer` (never modified except by `merge`)
    r           the rank of the update: lora_A is (r x in), lora_B is (out x r)
    alpha       the update is scaled by alpha / r (by alpha / sqrt(r) with `use_rslora`, rank-stabilised
                LoRA), so changing r does not change the step size the optimizer needs
    dropout     dropout probability on the adapter's input only; the frozen path sees x unchanged
    config      the same knobs in one object (`LoRAConfig` or peft's `LoraConfig`) instead of r, alpha,
                dropout, use_rslora (None: not given; defaults 8, 8, 0.0, False)
    """

    def __init__(self, base: nn.Linear, r: int | None = None, alpha: float | None = None,
                 dropout: float | None = None, use_rslora: bool | None = None, *, config=None):
        super().__init__()
        if isinstance(base, LoRALinear):
            raise TypeError("this layer already is a LoRALinear: wrap the plain nn.Linear once, not twice.")
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear (a layer with in_features x out_features weights); "
                            f"got {type(base).__name__}.")
        cfg = resolve_config(config, type(self).__name__, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        r = cfg.r
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.lora_alpha, self.use_rslora = r, cfg.lora_alpha, cfg.use_rslora
        self.scaling = cfg.scaling
        self.lora_dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        # Adapters live on the base weight's device; fp32 even beside a 16-bit or 4-bit base, as in peft
        # (its default autocast_adapter_dtype=True), so small updates are not rounded away.
        weight = base.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=dtype)   # (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=dtype)  # (out, r)
        self.reset_lora_parameters()
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.merged = False

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        # A like nn.Linear's own init (Microsoft's loralib and peft do the same), B zero: B A = 0 at start.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # uniform(+-1/sqrt(in))
        nn.init.zeros_(self.lora_B.weight)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter branch alone: (..., in) -> (..., out), already scaled."""
        x = x.to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling  # (..., r) in between

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:  # B A is inside the base weight already
            return result
        return (result + self.lora_forward(x)).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, shaped like the base weight (out, in): what `merge` adds (peft: get_delta_weight)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight: one matmul per layer at inference, no extra latency."""
        if self.merged:
            warnings.warn("this LoRALinear is already merged; merging again would add B A twice, so nothing "
                          "was done. Call unmerge() first to merge new adapter weights.", stacklevel=2)
            return
        weight = self.base_layer.weight
        weight += self.delta_weight().to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again: the inverse of `merge` (equal up to float rounding, as in peft)."""
        if not self.merged:
            warnings.warn("this LoRALinear is not merged; nothing to unmerge.", stacklevel=2)
            return
        weight = self.base_layer.weight
        weight -= self.delta_weight().to(weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.lora_alpha}, scaling={self.scaling:.4g}, merged={self.merged}")


# ------------------------------------------------------------------------------- which modules to adapt

def target_matches(name: str, target_modules) -> bool:
    """peft's rule (`check_target_module_exists`): a string is a regular expression the full module name
    must match; a list of names matches a module whose full name is one of them or ends with '.' + one of
    them, so 'q_proj' and 'self_attn.q_proj' both match 'model.layers.0.self_attn.q_proj'."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def unmatched_targets(names, target_modules: list[str]) -> list[str]:
    """The entries of a list of target modules that match none of the module `names` (typos, or layers
    this model does not have)."""
    names = [n for n in names if n]
    return [t for t in target_modules if not any(target_matches(n, [t]) for n in names)]


def inject_lora(model: nn.Module, target_modules=None, r: int | None = None, alpha: float | None = None,
                dropout: float | None = None, use_rslora: bool | None = None, *, config=None) -> int:
    """Freeze `model` and replace every `nn.Linear` whose name matches `target_modules` by a `LoRALinear`,
    in place. The knobs come loose (defaults as `LoRALinear`'s) or as `config=` (a `LoRAConfig` or peft's
    `LoraConfig`, target_modules included). Returns the number of trainable parameters (the adapters'
    r * (in + out) per layer)."""
    cfg = resolve_config(config, "inject_lora", target_modules=target_modules, r=r, alpha=alpha, dropout=dropout,
                         use_rslora=use_rslora)
    # the loose target_modules as given (error messages quote them so); the config's are sorted
    targets = cfg.target_modules if target_modules is None else target_modules
    return replace_linears(model, targets, lambda m: LoRALinear(m, config=cfg))


def replace_linears(model: nn.Module, target_modules, make_layer, adapted: tuple = (LoRALinear,),
                    method: str = "LoRA") -> int:
    """The injection LoRA, QLoRA and DoRA use: check `target_modules` (peft's rule: a list of name
    suffixes or one regular expression), freeze every parameter, then swap each matching `nn.Linear`
    for `make_layer(linear)` (which holds the other knobs). Layers of the `adapted` types are refused
    (inject once). Returns the count of trainable parameters."""
    targets = check_target_modules(target_modules)
    found = [(name, m) for name, m in model.named_modules() if name and target_matches(name, targets)]
    if not found:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules={targets!r} matched no module of this {type(model).__name__}. "
                         f"Its linear layers are named: {linear}.")
    for name, m in found:
        if isinstance(m, adapted) or not isinstance(m, nn.Linear):
            what = (f"already a {type(m).__name__} (already adapted: inject once)" if isinstance(m, adapted)
                    else type(m).__name__)
            raise TypeError(f"target module {name!r} is {what}; {method} adapts nn.Linear layers only. "
                            f"Name the linear layers, e.g. ['q_proj', 'v_proj'].")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in found:
        model.set_submodule(name, make_layer(m))
    return trainable_parameters(model)


def trainable_parameters(model: nn.Module) -> int:
    """How many parameters receive gradients (peft's `print_trainable_parameters` counts the same)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights: {'model.layers.0.self_attn.q_proj.lora_A.weight': tensor, ...}, and DoRA's
    magnitude vectors ('....q_proj.lora_magnitude_vector', lesson 07) where there are any.

    These are all a fine-tune needs to save. peft's `set_peft_model_state_dict` loads them into a peft
    model after prefixing each key with 'base_model.model.'."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if ".lora_A." in k or ".lora_B." in k or k.endswith(".lora_magnitude_vector")}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every `LoRALinear` into its base weight and put the plain `nn.Linear` back (peft:
    `merge_and_unload`). Returns the model, which now has the base model's architecture."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not wrapped:
        raise ValueError("merge_lora found no LoRALinear layers in this model: call inject_lora first.")
    for name, m in wrapped:
        if not m.merged:
            m.merge()
        model.set_submodule(name, m.base_layer)
    return model


# ------------------------------------------------------------------------------- combining adapters

def concat_lora(lora_As, lora_Bs, scalings, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Several adapters of one layer as one adapter of rank sum(r_i) and scaling 1 (peft's
    `add_weighted_adapter(..., combination_type="cat")`):

        A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]   rows stacked: (r_1 + r_2 + ..., in)
        B = [B_1, B_2, ...]                   columns side by side: (out, r_1 + r_2 + ...)

    so that B @ A = sum_i w_i s_i B_i A_i exactly: nothing is approximated, the rank just adds up."""
    n = len(lora_As)
    if not (n == len(lora_Bs) == len(scalings) == len(weights)) or n == 0:
        raise ValueError(f"give one lora_A, lora_B, scaling and weight per adapter; got {len(lora_As)} lora_As, "
                         f"{len(lora_Bs)} lora_Bs, {len(scalings)} scalings and {len(weights)} weights.")
    out_f, in_f = lora_Bs[0].shape[0], lora_As[0].shape[1]
    for i, (A, B) in enumerate(zip(lora_As, lora_Bs)):
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"adapter {i}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit: lora_A is "
                             f"(r, in) and lora_B (out, r) with the same rank r. Pass each adapter's own A and B.")
        if (B.shape[0], A.shape[1]) != (out_f, in_f):
            raise ValueError(f"adapter {i} adapts a {A.shape[1]} -> {B.shape[0]} layer but adapter 0 a {in_f} -> "
                             f"{out_f} layer: combine the adapters of the same module of the same base model.")
    A = torch.cat([A * (w * s) for A, w, s in zip(lora_As, weights, scalings)], dim=0)   # (sum r, in)
    B = torch.cat(list(lora_Bs), dim=1)                                                 # (out, sum r)
    return A, B


def concat_adapters(adapters: list[dict], scalings: list[float], weights: list[float]) -> dict[str, torch.Tensor]:
    """`concat_lora` for every adapted module of a model: `adapters` are adapter state dicts (keys
    '<module>.lora_A.weight' and '<module>.lora_B.weight', as `lora_state_dict` or peft's saved
    adapter_model.safetensors hold them), `scalings` each adapter's alpha / r. Returns the combined state dict
    (rank sum r_i, to be used with alpha = rank, i.e. scaling 1). The adapters must target the same modules."""
    def modules(state):
        return {k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")}

    names = modules(adapters[0])
    for i, state in enumerate(adapters[1:], start=1):
        if modules(state) != names:
            only_0, only_i = sorted(names - modules(state)), sorted(modules(state) - names)
            raise ValueError(f"adapter {i} targets other modules than adapter 0 (only in adapter 0: {only_0[:3]}, only "
                             f"in adapter {i}: {only_i[:3]}{' ...' if len(only_0) > 3 or len(only_i) > 3 else ''}). "
                             f"Train both with the same target_modules, or let peft's add_weighted_adapter combine "
                             f"them (it treats a module an adapter lacks as a zero update).")
    out = {}
    for name in sorted(names):
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = concat_lora(
            [s[f"{name}.lora_A.weight"] for s in adapters], [s[f"{name}.lora_B.weight"] for s in adapters],
            scalings, weights)
    return out
