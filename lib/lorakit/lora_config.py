"""LoRA's knobs: which values r, alpha, dropout and target_modules may take, where they become behaviour
(`lora_scaling`), and the object that carries them together (`LoRAConfig`, with peft's field names).

peft keeps these settings in one `LoraConfig` (peft/tuners/lora/config.py) and turns them into behaviour in
one place, the layer's `scaling`; nanoGPT keeps a model's in a `GPTConfig` dataclass. `LoRAConfig` is the
kit's: checked when built, convertible to and from peft's (`to_peft`, `from_peft`). Every lorakit layer and
function that takes adapter settings (`lorakit.lora`, `qlora`, `dora`, `loftq`) runs them through
`resolve_config`, so loose arguments, a `LoRAConfig` and a peft `LoraConfig` give the same layer, and a peft
setting the kit does not build is refused by name rather than ignored.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from lorakit.validate import whole_number

__all__ = ["LoRAConfig", "resolve_config", "check_rank", "check_hyperparameters", "check_target_modules",
           "lora_scaling"]


def check_rank(r) -> int:
    """The LoRA rank as a Python int: a positive whole number (a numpy integer too), else a clear error."""
    try:
        return whole_number(r, "r")
    except ValueError:
        shown = int(r) if hasattr(r, "__index__") and not isinstance(r, bool) else r  # np.int64(0) shows as 0
        raise ValueError(f"r (the LoRA rank) must be a positive integer such as 8 or 16; got r={shown!r}.") from None


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_hyperparameters(r, alpha, dropout) -> int:
    """Clear errors for values LoRA cannot use: what was given and what is accepted. Integers may be numpy
    integers (anything `operator.index` accepts); alpha and dropout may be numpy floats too. Returns the
    rank as a Python int."""
    r = check_rank(r)
    if not _is_number(alpha) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number (peft's default is alpha = r = 8); got alpha={alpha!r}.")
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"dropout is a probability in [0, 1) (0.0 = no dropout, QLoRA used 0.05-0.1); "
                         f"got dropout={dropout!r}.")
    return r


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """What multiplies B @ A: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA (Kalajdzievski 2023,
    arXiv 2312.03732), peft's `scaling`. The one place where r, alpha and rsLoRA become behaviour."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def check_target_modules(target_modules):
    """`target_modules` as peft takes it: one regular expression string (returned as is), or a non-empty
    list, tuple or set of module names (returned as a list). Anything else gets a clear error."""
    if isinstance(target_modules, str):
        return target_modules
    if isinstance(target_modules, (list, tuple, set)) and not target_modules:
        raise ValueError("target_modules is empty: name at least one module, e.g. ['q_proj', 'v_proj'].")
    if isinstance(target_modules, (list, tuple, set)) and all(isinstance(t, str) and t for t in target_modules):
        return list(target_modules)
    raise TypeError(f"target_modules is a list of module names such as ['q_proj', 'v_proj'] (or one regular "
                    f"expression string); got {target_modules!r}.")


# ------------------------------------------------------------------------------- the knobs, in one object

PEFT_READ = ("r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules")
# bookkeeping, not arithmetic: which task, which model it was made for, the peft version, frozen or not
PEFT_NOT_MATH = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                 "inference_mode", "runtime_config", "megatron_core", "qalora_group_size")
PEFT_HINTS = {"use_dora": "For DoRA use lorakit.dora's DoRALinear or inject_dora, which take this config. ",
              "init_lora_weights": "lorakit.loftq.loftq_init builds init_lora_weights='loftq'. "}
LOOSE = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "use_rslora": "use_rslora",
         "target_modules": "target_modules"}  # the loose arguments' names -> LoRAConfig's fields


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA's knobs in one object, named as in peft's `LoraConfig` (nanoGPT's `GPTConfig` does this for a model).

    r               the rank: lora_A is (r x in), lora_B (out x r)
    lora_alpha      the update is scaled by lora_alpha / r (by lora_alpha / sqrt(r) with `use_rslora`)
    lora_dropout    dropout probability on the adapter's input only
    use_rslora      rank-stabilised LoRA's scaling
    target_modules  the layers `inject_lora` adapts: module names (kept sorted, as peft keeps a set) or one
                    regular expression; None where nothing is injected by name (one layer)

    Checked when built, with the messages the loose arguments get. Frozen: `dataclasses.replace` makes a
    changed copy, checked again."""
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str | None = None

    def __post_init__(self):
        object.__setattr__(self, "r", check_hyperparameters(self.r, self.lora_alpha, self.lora_dropout))
        if self.use_rslora not in (True, False):
            raise TypeError(f"use_rslora is True or False; got use_rslora={self.use_rslora!r}.")
        object.__setattr__(self, "use_rslora", bool(self.use_rslora))
        if self.target_modules is not None:
            targets = check_target_modules(self.target_modules)
            object.__setattr__(self, "target_modules", targets if isinstance(targets, str) else tuple(sorted(set(targets))))

    @property
    def scaling(self) -> float:
        """What multiplies B @ A (`lora_scaling`): where r, lora_alpha and use_rslora become behaviour."""
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    @classmethod
    def from_peft(cls, config, allow: tuple[str, ...] = ()) -> "LoRAConfig":
        """The knobs of a peft `LoraConfig`. A setting the kit's layers do not build (DoRA, a trained bias,
        another init, per-layer patterns, ...) is refused by name, never dropped; `allow` names the settings
        the caller builds itself (`DoRALinear`: use_dora)."""
        if not (dataclasses.is_dataclass(config) and getattr(config, "peft_type", None) == "LORA"):
            raise TypeError(f"config is a lorakit.lora.LoRAConfig or a peft LoraConfig; got {type(config).__name__}.")
        odd = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if f.name not in PEFT_READ + PEFT_NOT_MATH + tuple(allow) and getattr(config, f.name) != (
                   f.default if f.default_factory is dataclasses.MISSING else f.default_factory())}
        if odd:
            raise ValueError(f"this peft LoraConfig sets {', '.join(f'{k}={v!r}' for k, v in odd.items())}, which "
                             f"lorakit's layers do not build. {PEFT_HINTS.get(next(iter(odd)), '')}Drop "
                             f"{'it' if len(odd) == 1 else 'them'}, or build the model with peft's get_peft_model.")
        if config.target_modules == "all-linear":
            raise ValueError("target_modules='all-linear' is a peft shortcut; name the layers instead, e.g. "
                             "lorakit.models.ALL_LINEAR for a Llama-like model.")
        return cls(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                   use_rslora=config.use_rslora, target_modules=config.target_modules)

    def to_peft(self, **peft_only):
        """peft's `LoraConfig` with these knobs, plus settings only peft builds (`use_dora=True`, ...)."""
        from peft import LoraConfig
        targets = list(self.target_modules) if isinstance(self.target_modules, tuple) else self.target_modules
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          use_rslora=self.use_rslora, target_modules=targets, **peft_only)


def resolve_config(config=None, who: str = "this function", allow: tuple[str, ...] = (), **loose) -> LoRAConfig:
    """The one `LoRAConfig` a layer or function runs with: built from the loose arguments (r, alpha, dropout,
    use_rslora, target_modules; None = not given), or `config` (a LoRAConfig or a peft LoraConfig), or both
    where they agree. A loose argument that disagrees with `config` is an error naming both."""
    given = {k: v for k, v in loose.items() if v is not None}
    if config is None:
        return LoRAConfig(**{LOOSE[k]: v for k, v in given.items()})
    cfg = config if isinstance(config, LoRAConfig) else LoRAConfig.from_peft(config, allow)
    for k, v in given.items():
        ours = getattr(dataclasses.replace(cfg, **{LOOSE[k]: v}), LOOSE[k])  # checked, in the config's form
        if ours != getattr(cfg, LOOSE[k]):
            raise ValueError(f"{who} got config= with {LOOSE[k]}={getattr(cfg, LOOSE[k])!r} and also {k}={v!r}: "
                             f"drop {k}={v!r} (the config carries it), or drop config=.")
    return cfg
