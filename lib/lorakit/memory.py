"""Memory and parameter counting: how many parameters a model has, how many LoRA trains, and how many
bytes full fine-tuning, LoRA and QLoRA need, computed from a config alone (no weights, no download).

The reference version of lesson 01; the functions lesson 01 has the learner write are here under the same
names and signatures (`count_parameters(cfg)`, `lora_params(d_in, d_out, r)`, `qlora_weights_gb(cfg)`), and
so are lesson 00's `weights_gb(n_params, dtype)` and lesson 05's `targets_for_budget(config, r, budget,
preference=PREFERENCE)`.

- `config(name)`, `CONFIGS`, `PUBLISHED`: the architectures it counts, from `lorakit.architectures`.
- `count_parameters(config)`: embeddings + blocks (attention with grouped-query heads, SwiGLU MLP, two
  RMSNorms) + final norm + lm_head unless tied — equal to `model.num_parameters()`. Counted module by
  module from `modules(config)`, the table the other counts here read too.
- `lora_params(d_in, d_out, r)` for one layer; `lora_parameters(config, r, target_modules)`: what peft
  would train, matching `target_modules` the way peft does (a list of name suffixes, a regex string, or
  "all-linear", which leaves out lm_head); `targets_for_budget(config, r, budget)`: lesson 05's choice of
  target modules under a budget of trainable parameters.
- `estimate(config, method, ...)`: a `MemoryEstimate` with a per-part breakdown for "full" (mixed-precision
  AdamW: 2 + 2 + 4 + 8 = 16 bytes per parameter), "lora" and "qlora" (NF4 weights + quantization
  constants + adapters with their gradients and Adam states + a rough activation budget).
  With `world_size=N, sharding=...` it is the memory of ONE device of a data-parallel run, the parts
  divided as `lorakit.sharding` says (lesson 08).

What a loaded model really holds is measured in `lorakit.footprint`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

from lorakit import nf4
# CONFIGS, PUBLISHED and config() live in lorakit.architectures; memory uses config() and re-exports the
# three because lessons 01, 05 and 08 read them as memory.CONFIGS, memory.PUBLISHED, memory.config.
from lorakit.architectures import CONFIGS, PUBLISHED, SUPPORTED, config
# Re-exported, not used here: lesson 04 reads these measuring functions as `memory.measure`,
# `memory.saved_bytes` and `memory.quant_state_tensors`; they live in lorakit.footprint.
from lorakit.footprint import measure, quant_state_tensors, saved_bytes  # noqa: F401
from lorakit.lora import target_matches, unmatched_targets
from lorakit.lora_config import check_rank, check_target_modules
from lorakit.sharding import ZERO_STAGES, check_sharding, device_share, gathered_bytes
from lorakit.validate import whole_number

__all__ = ["METHODS", "BYTES", "ATTENTION", "MLP", "PREFERENCE", "CONFIGS", "PUBLISHED", "config", "sizes",
           "modules", "count_parameters", "quantized_parameters", "packed_parameter_count", "lora_targets",
           "lora_params", "lora_parameters", "targets_for_budget", "bits_per_param", "quantization_constant_bytes",
           "weights_gb", "qlora_weights_gb", "activation_bytes", "MemoryEstimate", "estimate"]

METHODS = ("full", "lora", "qlora")

# Bytes one number takes in each storage type. nf4 is the packed 4-bit code alone; see `bits_per_param`
# for the quantization constants that come with it.
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "nf4": 0.5}
# Optimizer state bytes per trained parameter: AdamW keeps m and v (fp32: 4 + 4).
OPTIMIZER_BYTES = {"adamw": 8, "adamw_bf16": 4, "adamw_8bit": 2, "sgd": 0}
# peft's default LoRA targets for these architectures (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
PEFT_DEFAULT_TARGETS = ("q_proj", "v_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# The order lesson 05 adds LoRA targets in when the trainable parameters are on a budget: the QLoRA paper's
# q and v first, then the rest of attention, then the MLP.
PREFERENCE = ("q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
def sizes(cfg) -> dict:
    """The numbers every count here is made of: kind (model_type), h (hidden), i (intermediate), layers,
    vocab, q and kv (the widths of q_proj's and k/v_proj's outputs: heads x head_dim), tied (lm_head shares
    the embedding), and which linear layers have biases (qkv_bias, o_bias, mlp_bias)."""
    cfg = config(cfg)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        raise ValueError(f"unsupported architecture {kind!r}: lorakit.memory counts {', '.join(SUPPORTED)} "
                         "(Llama-family decoders with RMSNorm, grouped-query attention and a SwiGLU MLP)")
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if kind == "qwen2":  # Qwen2 puts biases on q, k and v only
        qkv_bias, o_bias, mlp_bias = True, False, False
    else:
        qkv_bias = o_bias = bool(getattr(cfg, "attention_bias", False))
        mlp_bias = bool(getattr(cfg, "mlp_bias", False))
    return dict(kind=kind, h=h, i=cfg.intermediate_size, layers=cfg.num_hidden_layers, vocab=cfg.vocab_size,
                q=heads * head_dim, kv=kv_heads * head_dim, tied=bool(getattr(cfg, "tie_word_embeddings", False)),
                qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias)


def modules(cfg) -> dict[str, tuple[str, int, int, bool]]:
    """Every module of the model the config describes, by its name in `model.named_modules()`:
    name -> (kind, in_features, out_features, bias). kind is "linear", "embedding", "norm" or "container"
    (for an embedding, in/out are num_embeddings/embedding_dim). No weights are built."""
    s = sizes(cfg)
    h, q, kv, i = s["h"], s["q"], s["kv"], s["i"]
    out = {"": ("container", 0, 0, False), "model": ("container", 0, 0, False),
           "model.embed_tokens": ("embedding", s["vocab"], h, False), "model.layers": ("container", 0, 0, False)}
    shapes = {"q_proj": (h, q, s["qkv_bias"]), "k_proj": (h, kv, s["qkv_bias"]), "v_proj": (h, kv, s["qkv_bias"]),
              "o_proj": (q, h, s["o_bias"]), "gate_proj": (h, i, s["mlp_bias"]), "up_proj": (h, i, s["mlp_bias"]),
              "down_proj": (i, h, s["mlp_bias"])}
    for n in range(s["layers"]):
        p = f"model.layers.{n}"
        out[p] = ("container", 0, 0, False)
        out[f"{p}.self_attn"] = ("container", 0, 0, False)
        for name in ATTENTION:
            out[f"{p}.self_attn.{name}"] = ("linear", *shapes[name])
        out[f"{p}.mlp"] = ("container", 0, 0, False)
        for name in MLP:
            out[f"{p}.mlp.{name}"] = ("linear", *shapes[name])
        out[f"{p}.mlp.act_fn"] = ("container", 0, 0, False)
        out[f"{p}.input_layernorm"] = ("norm", h, h, False)
        out[f"{p}.post_attention_layernorm"] = ("norm", h, h, False)
    out["model.norm"] = ("norm", h, h, False)
    out["model.rotary_emb"] = ("container", 0, 0, False)
    out["lm_head"] = ("linear", h, s["vocab"], False)
    return out


# --------------------------------------------------------------------------------------- parameters

def _module_params(kind: str, fan_in: int, fan_out: int, bias: bool) -> int:
    if kind == "linear":
        return fan_in * fan_out + (fan_out if bias else 0)
    if kind == "embedding":
        return fan_in * fan_out
    if kind == "norm":
        return fan_in  # RMSNorm: one scale per feature, no bias
    return 0


def count_parameters(cfg) -> int:
    """Parameters of the model `cfg` describes, counted the way `model.num_parameters()` does (a tied
    lm_head shares the embedding matrix, so it is counted once)."""
    tied = sizes(cfg)["tied"]
    return sum(_module_params(*m) for name, m in modules(cfg).items() if not (tied and name == "lm_head"))


def quantized_parameters(cfg) -> int:
    """Parameters in the linear layers of the blocks: the ones 4-bit loading quantizes (transformers keeps
    lm_head, embeddings and norms in 16 bits). Biases stay in 16 bits and are not counted here."""
    return sum(m[1] * m[2] for name, m in modules(cfg).items() if m[0] == "linear" and name != "lm_head")


def packed_parameter_count(cfg, r: int = 0, target_modules=None) -> int:
    """The parameter count of a 4-bit model whose tensors are counted element by element, as peft before
    0.5 did in `print_trainable_parameters` ("all params"): each quantized linear weight counts as its packed
    uint8 tensor (two 4-bit codes per element, so half its parameters), every other parameter as itself,
    plus the LoRA adapters when `r` > 0. Current peft counts a 4-bit weight at its full size instead."""
    n, nq = count_parameters(cfg), quantized_parameters(cfg)
    return n - nq + nq // 2 + (lora_parameters(cfg, r, target_modules) if r else 0)


def lora_targets(cfg, target_modules=None) -> list[str]:
    """The module names peft would wrap with LoRA for `target_modules`, matched as peft matches them
    (`lorakit.lora.target_matches`): None -> peft's default for the architecture (q_proj, v_proj);
    "all-linear" -> every linear layer but the output layer (lm_head); another string -> a regular
    expression that must match the whole name; a list -> names equal to an entry or ending with "." + entry
    ("o_proj" and "self_attn.o_proj" alike)."""
    mods = modules(cfg)
    if target_modules is None:
        target_modules = list(PEFT_DEFAULT_TARGETS)
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        return [n for n, m in mods.items() if m[0] == "linear" and n != "lm_head"]
    targets = check_target_modules(target_modules)
    hits = [n for n in mods if n and target_matches(n, targets)]
    if isinstance(targets, str) and not hits:
        raise ValueError(f"target_modules {targets!r} matches no module of this {sizes(cfg)['kind']} model; "
                         f"its linear layers are named {_linear_names(mods)}")
    missing = [] if isinstance(targets, str) else unmatched_targets(mods, targets)
    if missing:
        raise ValueError(f"target module(s) {missing} not found in this {sizes(cfg)['kind']} model; "
                         f"its linear layers are named {_linear_names(mods)} (or use 'all-linear')")
    bad = sorted({n.rsplit(".", 1)[-1] for n in hits if mods[n][0] not in ("linear", "embedding")})
    if bad:
        raise ValueError(f"LoRA can wrap linear and embedding layers only; {bad} are "
                         f"{'norms' if all(mods[n][0] == 'norm' for n in hits if n.rsplit('.', 1)[-1] in bad) else 'not layers'}"
                         f" (peft refuses them too). Linear layers: {_linear_names(mods)}")
    return hits


def _linear_names(mods) -> list[str]:
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in mods.items() if m[0] == "linear"))


def lora_params(d_in, d_out, r) -> int:
    """Trainable parameters of LoRA at rank `r` on one d_in -> d_out layer: A is r x d_in and B is d_out x r,
    so r * (d_in + d_out) (lesson 01's exercise; an embedding's A is r x num_embeddings, its B
    embedding_dim x r)."""
    d_in = whole_number(d_in, "d_in", 1, "the layer's input features")
    d_out = whole_number(d_out, "d_out", 1, "the layer's output features")
    return check_rank(r) * (d_in + d_out)


def lora_parameters(cfg, r: int = 8, target_modules=None) -> int:
    """Trainable parameters LoRA adds to the model `cfg` describes: `lora_params` of every targeted layer."""
    r = check_rank(r)
    mods = modules(cfg)
    return sum(lora_params(mods[n][1], mods[n][2], r) for n in lora_targets(cfg, target_modules))


def targets_for_budget(config, r, budget, preference=PREFERENCE) -> list[str]:
    """The longest prefix of `preference` whose LoRA parameters at rank `r` fit in `budget` (lesson 05's
    exercise): [] when not even the first module fits. Counts grow with every module added, so the answer
    is the last prefix that fits."""
    fitting = [k for k in range(1, len(preference) + 1)
               if lora_parameters(config, r, list(preference[:k])) <= budget]
    return list(preference[:max(fitting, default=0)])


# ------------------------------------------------------------------------------------------ memory

def bits_per_param(dtype: str = "nf4", *, double_quant: bool = False, blocksize: int = 64,
                   blocksize2: int = 256) -> float:
    """Bits stored per parameter, quantization constants included. nf4 keeps one fp32 absmax per block of
    64 (4 + 32/64 = 4.5 bits); double quantization stores those absmax values in 8 bits with one fp32
    scale per 256 of them (4 + 8/64 + 32/(64*256) = 4.127 bits)."""
    if dtype not in BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(BYTES)}")
    if dtype == "nf4":
        return nf4.bits_per_param(blocksize, double_quant, blocksize2)
    return BYTES[dtype] * 8


def weights_gb(n_params: int, dtype: str) -> float:
    """GB (1e9 bytes) of `n_params` weights stored in `dtype`, a key of BYTES (lesson 00's exercise): the weights
    alone, nf4 without its quantization constants (`bits_per_param` adds them, `qlora_weights_gb` a whole model)."""
    if dtype not in BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(BYTES)}")
    return whole_number(n_params, "n_params") * BYTES[dtype] / 1e9


def quantization_constant_bytes(cfg, *, double_quant: bool = True, blocksize: int = 64,
                                blocksize2: int = 256) -> int:
    """Bytes of the constants bitsandbytes keeps beside each 4-bit weight (its `quant_state`): absmax per
    block (fp32, or uint8 + a nested fp32 absmax per 256 blocks, an fp32 offset and the 256-entry code
    with double quantization) and the 16-entry fp32 NF4 code."""
    total = 0
    for name, (kind, fan_in, fan_out, _) in modules(cfg).items():
        if kind != "linear" or name == "lm_head":
            continue
        blocks = math.ceil(fan_in * fan_out / blocksize)
        total += 16 * 4  # the NF4 code table
        if double_quant:
            total += blocks + 4 * math.ceil(blocks / blocksize2) + 4 + 256 * 4
        else:
            total += 4 * blocks
    return total


def qlora_weights_gb(cfg) -> float:
    """GB (1e9 bytes) of a QLoRA model's weights: the linear layers of the blocks in NF4 with double
    quantization (`bits_per_param`: 4.127 bits each), everything else (embeddings, norms, lm_head, biases)
    in bf16 (lesson 01's exercise). Per parameter, so a few bytes per tensor below what bitsandbytes
    stores (it rounds each tensor's constants up): `estimate(cfg, "qlora").weights_bytes` counts those."""
    n_quantized = quantized_parameters(cfg)
    n_16bit = count_parameters(cfg) - n_quantized
    return (n_quantized * bits_per_param("nf4", double_quant=True) / 8 + n_16bit * BYTES["bf16"]) / 1e9


def activation_bytes(cfg, batch_size: int = 1, seq_len: int = 512, *, gradient_checkpointing: bool = True,
                     dtype: str = "bf16") -> int:
    """A rough budget (+-50%: measure it, lesson 06 does) for what the backward pass keeps, with a fused
    attention kernel (no seq x seq matrix): per layer about 10 hidden-sized, 4 kv-sized and 4
    intermediate-sized tensors per token in 16 bits; with gradient checkpointing only each layer's input
    plus one layer's worth; plus the logits in fp32 and their gradient."""
    s = sizes(cfg)
    tokens = (whole_number(batch_size, "batch_size", 1, "the number of sequences per device")
              * whole_number(seq_len, "seq_len", 1, "the number of tokens per sequence"))
    per_layer = tokens * (10 * s["h"] + 4 * s["kv"] + 4 * s["i"]) * BYTES[dtype]
    if gradient_checkpointing:
        kept = s["layers"] * tokens * s["h"] * BYTES[dtype] + per_layer
    else:
        kept = s["layers"] * per_layer
    return int(kept + tokens * s["vocab"] * 4 * 2)


@dataclass
class MemoryEstimate:
    """Bytes per part of a fine-tuning run on one device; `total_bytes` adds them up. `offloaded` holds what
    a sharded run with CPU offload keeps in host memory instead (per process)."""
    method: str
    parts: dict[str, int]
    params: int
    trainable: int
    notes: dict = field(default_factory=dict)
    offloaded: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def gb(self) -> float:
        return self.total_bytes / 1e9

    @property
    def weights_bytes(self) -> int:
        """What the loaded model holds: weights plus their quantization constants."""
        return self.parts.get("weights", 0) + self.parts.get("quantization constants", 0)

    @property
    def offloaded_bytes(self) -> int:
        return sum(self.offloaded.values())

    def table(self) -> str:
        where = "" if self.notes.get("world_size", 1) == 1 else ", per device"
        total = f"total ({self.method}{where})"
        w = max(24, 1 + max(len(name) for name in [*self.parts, total, *(k + " (CPU)" for k in self.offloaded)]))
        rows = [f"{k:<{w}}{v / 1e9:>10.2f} GB" for k, v in self.parts.items()]
        rows.append(f"{total:<{w}}{self.gb:>10.2f} GB")
        rows += [f"{k + ' (CPU)':<{w}}{v / 1e9:>10.2f} GB" for k, v in self.offloaded.items()]
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def _unit_bytes(cfg, method: str, wb: int) -> tuple[int, int]:
    """Bytes of the units FSDP wraps in a decoder: the root (embeddings, final norm, lm_head) and one decoder
    layer, with the 4-bit layers of "qlora" at their packed size plus their share of the constants."""
    mods = modules(cfg)
    tied = sizes(cfg)["tied"]
    layer = {n: m for n, m in mods.items() if n.startswith("model.layers.0.")}
    if method == "qlora":
        linear = sum(m[1] * m[2] for m in layer.values() if m[0] == "linear")
        rest = sum(_module_params(*m) for m in layer.values()) - linear
        n_layers = sizes(cfg)["layers"]
        per_layer = int(linear * BYTES["nf4"] + rest * wb) + quantization_constant_bytes(cfg) // n_layers
    else:
        per_layer = sum(_module_params(*m) for m in layer.values()) * wb
    root = sum(_module_params(*m) for n, m in mods.items()
               if not n.startswith("model.layers.") and not (tied and n == "lm_head")) * wb
    return root, per_layer


def estimate(cfg, method: str, r: int = 8, target_modules=None, batch_size: int = 1, seq_len: int = 512, *,
             weight_dtype: str = "bf16", optimizer: str = "adamw", master_weights: bool = True,
             double_quant: bool = True, blocksize: int = 64, gradient_checkpointing: bool = True,
             activations: bool = True, world_size: int = 1, sharding="none", cpu_offload: bool = False,
             quant_storage: str = "uint8") -> MemoryEstimate:
    """Memory to fine-tune the model `cfg` describes, per part, in bytes, on one device.

    - "full": every parameter trains: weights and gradients in `weight_dtype`, fp32 master weights
      (mixed precision, unless master_weights=False or the weights are fp32) and optimizer states
      (AdamW: 8 bytes) -> 16 bytes per parameter with the defaults. `cfg` may also be a bare parameter
      count here (with activations=False), as in the ZeRO paper.
    - "lora": frozen weights in `weight_dtype`; adapters (peft keeps them in fp32) with fp32 gradients and
      optimizer states: 16 bytes per trainable parameter.
    - "qlora": like "lora", but the linear layers of the blocks are stored in NF4 with their quantization
      constants (double quantization by default); embeddings, norms and lm_head stay in `weight_dtype`.
    `activations` adds `activation_bytes` for `batch_size` sequences per device (a rough budget); CUDA
    context and allocator slack are not counted.

    Data parallel over `world_size` devices (per device; `sharding` is a ZeRO stage, see
    `lorakit.sharding.ZERO_STAGES`, or an FSDP strategy): "none" (DDP) keeps everything on every device;
    "zero1" divides the optimizer states and fp32 master weights by world_size, "zero2" the gradients too,
    "zero3" (FSDP FULL_SHARD) the weights (adapters included) too, and then adds the layers a device
    gathers while it computes (`lorakit.sharding.gathered_bytes`). `cpu_offload` moves the sharded optimizer
    states and master weights to the host (ZeRO-Offload), with "zero3" the sharded weights and gradients
    too (FSDP's CPUOffload); they are listed in `offloaded`. QLoRA under FSDP needs the 4-bit weights
    stored in a float dtype (`quant_storage`, bitsandbytes' `bnb_4bit_quant_storage`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if weight_dtype not in BYTES or weight_dtype in ("nf4", "int8"):
        raise ValueError(f"weight_dtype must be fp32, fp16 or bf16 (use method='qlora' for 4-bit); found {weight_dtype!r}")
    if optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZER_BYTES)}")
    world_size = whole_number(world_size, "world_size", 1, "the number of devices (processes)")
    if activations:
        batch_size = whole_number(batch_size, "batch_size", 1, "the number of sequences per device")
        seq_len = whole_number(seq_len, "seq_len", 1, "the number of tokens per sequence")
    stage = check_sharding(method, sharding, cpu_offload, quant_storage)
    bare = not isinstance(cfg, (bool, str, dict)) and hasattr(cfg, "__index__")
    if bare:
        cfg = operator.index(cfg)
    if bare:
        if method != "full":
            raise ValueError(f"a bare parameter count has no layers to put LoRA adapters on: pass a config for "
                             f"method={method!r} (or use method='full')")
        if activations:
            raise ValueError("a bare parameter count has no architecture to size activations from: pass "
                             "activations=False (the ZeRO paper counts model states only) or a config")
        if cfg <= 0:
            raise ValueError(f"the parameter count must be positive; found {cfg:,}")
    n = cfg if bare else count_parameters(cfg)
    wb = BYTES[weight_dtype]
    parts: dict[str, int] = {}
    if method == "full":
        trainable = n
        parts["weights"] = n * wb
        parts["gradients"] = n * wb
        if master_weights and wb < 4:
            parts["fp32 master weights"] = n * 4
        parts["optimizer states"] = n * OPTIMIZER_BYTES[optimizer]
    else:
        trainable = lora_parameters(cfg, r, target_modules)
        if method == "lora":
            parts["weights"] = n * wb
        else:
            nq = quantized_parameters(cfg)
            parts["weights"] = int(nq * BYTES["nf4"] + (n - nq) * wb)
            parts["quantization constants"] = quantization_constant_bytes(cfg, double_quant=double_quant,
                                                                          blocksize=blocksize)
        parts["adapters"] = trainable * 4
        parts["gradients"] = trainable * 4
        parts["optimizer states"] = trainable * OPTIMIZER_BYTES[optimizer]
    parts, offloaded = device_share(parts, world_size, stage, cpu_offload)
    if stage == 3 and not bare and (world_size > 1 or cpu_offload):
        parts["gathered layers"] = gathered_bytes(*_unit_bytes(cfg, method, wb))
    if activations:
        parts["activations"] = activation_bytes(cfg, batch_size, seq_len, gradient_checkpointing=gradient_checkpointing,
                                                dtype="bf16" if weight_dtype != "fp32" else "fp32")
    notes = dict(r=r, target_modules=target_modules, batch_size=batch_size, seq_len=seq_len)
    if world_size > 1 or stage or cpu_offload:
        notes.update(world_size=world_size, sharding=ZERO_STAGES[stage], cpu_offload=cpu_offload)
    return MemoryEstimate(method, parts, n, trainable, notes, offloaded)
