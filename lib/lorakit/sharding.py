"""Sharding: what ONE device of a data-parallel run holds, stage by stage (lesson 08).

Plain data parallelism (DDP) keeps a full copy of the model states on every device: weights, gradients and
optimizer states. ZeRO (Rajbhandari et al. 2019, arXiv 1910.02054) removes that redundancy in three stages:
stage 1 (P_os) shards the optimizer states (and the fp32 master weights that belong to them) over the
devices, stage 2 (P_os+g) the gradients too, stage 3 (P_os+g+p) the weights too, at the price of gathering
each layer's weights while it computes. PyTorch FSDP's strategies are the same stages by other names.

- `ZERO_STAGES`, `FSDP_SHARDING`, `sharding_stage(sharding)`: the stages and the names they go by.
- `per_device_bytes(n_params, world_size, stage, k=12)`: the reference of lesson 08's exercise, the ZeRO
  paper's count of model states on one device (2 + 2 + K bytes per parameter in mixed precision).
- `device_share(parts, world_size, stage, cpu_offload)`: the same rule applied to any breakdown of bytes by
  part; `lorakit.memory.estimate(world_size=..., sharding=...)` uses it for its parts.
- `gathered_bytes(root_bytes, layer_bytes)`: what a stage-3 device holds unsharded while it computes.
- `check_sharding(...)`: the setups that cannot run, refused with the fix (CPU offload without sharding,
  4-bit weights FSDP cannot shard).
"""

from __future__ import annotations

import operator

from lorakit.validate import whole_number

__all__ = ["ZERO_STAGES", "FSDP_SHARDING", "QUANT_STORAGE", "SHARDED_FROM", "sharding_stage", "device_share",
           "per_device_bytes", "gathered_bytes", "check_sharding"]

# By ZeRO stage: "none" is DDP (every device holds all model states), "zero1" shards the optimizer states,
# "zero2" the gradients too, "zero3" the weights too. (lorakit.distributed.RUN_SHARDINGS names what its
# training runs do, a different set.)
ZERO_STAGES = ("none", "zero1", "zero2", "zero3")
# PyTorch FSDP's strategies keep the same per-device memory as these stages.
FSDP_SHARDING = {"NO_SHARD": "none", "SHARD_GRAD_OP": "zero2", "FULL_SHARD": "zero3"}
# dtypes bitsandbytes can pack 4-bit weights into (`bnb_4bit_quant_storage`): the bytes are the same, but
# FSDP shards only floating-point tensors.
QUANT_STORAGE = ("uint8", "bf16", "fp16", "fp32")
# The first stage that shards each part of a memory breakdown (the keys of lorakit.memory.estimate's parts).
# A part not listed (activations, gathered layers) is never sharded: each device computes its own.
SHARDED_FROM = {"fp32 master weights": 1, "optimizer states": 1, "gradients": 2, "weights": 3,
                "quantization constants": 3, "adapters": 3}


def sharding_stage(sharding) -> int:
    """The ZeRO stage (0 = none, DDP) of `sharding`: a stage number 0 to 3, None, "none", "ddp", "zero0" to
    "zero3", or one of FSDP's strategy names ("NO_SHARD", "SHARD_GRAD_OP", "FULL_SHARD", any case)."""
    if not isinstance(sharding, (bool, str)) and hasattr(sharding, "__index__") and 0 <= operator.index(sharding) <= 3:
        return operator.index(sharding)
    name = "none" if sharding is None else str(sharding)
    name = FSDP_SHARDING.get(name.upper(), name.lower())
    if name in ("ddp", "zero0"):
        name = "none"
    if name in ZERO_STAGES:
        return ZERO_STAGES.index(name)
    if name.upper() in ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"):
        raise ValueError(f"{sharding!r} shards inside each node and replicates across nodes: estimate it as "
                         "'zero3' (or 'zero2') with world_size = the number of devices per node")
    raise ValueError(f"unknown sharding {sharding!r}: use a stage 0 to 3, one of {', '.join(ZERO_STAGES)} or FSDP's "
                     f"{', '.join(FSDP_SHARDING)}")


def device_share(parts: dict[str, int], world_size: int, stage: int,
                 cpu_offload: bool = False) -> tuple[dict[str, int], dict[str, int]]:
    """Split `parts` (part -> bytes of the whole run's copy) into what one of `world_size` devices holds at
    ZeRO `stage` and what it offloads to the host; returns (on the device, on the host), in the order of `parts`.

    A part the stage shards (`SHARDED_FROM`) is divided by world_size, rounded up. `cpu_offload` moves the
    sharded optimizer states and master weights to the host (DeepSpeed's ZeRO-Offload), and at stage 3 every
    sharded part (FSDP's CPUOffload: weights and gradients too)."""
    world_size = whole_number(world_size, "world_size", 1, "the number of devices (processes)")
    stage = sharding_stage(stage)
    on_device: dict[str, int] = {}
    on_host: dict[str, int] = {}
    for part, nbytes in parts.items():
        sharded = stage >= SHARDED_FROM.get(part, 4)
        share = -(-nbytes // world_size) if sharded else nbytes  # a device's share, rounded up
        if cpu_offload and sharded and (stage == 3 or SHARDED_FROM[part] == 1):
            on_host[part] = share
        else:
            on_device[part] = share
    return on_device, on_host


def per_device_bytes(n_params, world_size, stage, k=12):
    """Bytes of model states on one device of `world_size` with ZeRO `stage` (0 = DDP), as the ZeRO paper
    counts them: bf16 weights (2 bytes per parameter), bf16 gradients (2) and K bytes of optimizer state per
    parameter (12 for mixed-precision Adam: the fp32 master copy, m and v). Lesson 08's exercise; the paper's
    7.5B parameters on 64 devices give 120, 31.4, 16.6 and 1.9 GB at stages 0 to 3."""
    model_states = {"weights": 2 * n_params, "gradients": 2 * n_params, "optimizer states": k * n_params}
    on_device, _ = device_share(model_states, world_size, stage)
    return sum(on_device.values())


def gathered_bytes(root_bytes: int, layer_bytes: int) -> int:
    """What a stage-3 (FSDP FULL_SHARD) device holds unsharded while it computes, as FSDP wraps a decoder: the
    root unit (embeddings, final norm, lm_head: gathered for the whole forward and backward) plus two decoder
    layers (the one computing and the next one, prefetched)."""
    return root_bytes + 2 * layer_bytes


def check_sharding(method: str, sharding, cpu_offload: bool = False, quant_storage: str = "uint8") -> int:
    """The ZeRO stage of `sharding` for fine-tuning with `method` ("full", "lora" or "qlora"), or a ValueError
    saying why the setup cannot run and what to do instead."""
    stage = sharding_stage(sharding)
    fsdp = str(sharding).upper() in FSDP_SHARDING
    if cpu_offload and stage == 0:
        raise ValueError("cpu_offload needs sharded states: DDP keeps a full copy on every device. Use "
                         "sharding='zero2' (DeepSpeed ZeRO-Offload) or 'zero3' (FSDP FULL_SHARD with CPUOffload), "
                         "which work with world_size=1 too")
    if quant_storage not in QUANT_STORAGE:
        raise ValueError(f"quant_storage must be one of {', '.join(QUANT_STORAGE)}; found {quant_storage!r}")
    if quant_storage != "uint8" and method != "qlora":
        raise ValueError(f"quant_storage={quant_storage!r} is the storage of 4-bit weights: it applies to "
                         "method='qlora' only")
    if method == "qlora" and quant_storage == "uint8" and (stage == 3 or (fsdp and stage > 0)):
        raise ValueError(f"sharding={sharding!r} shards the frozen 4-bit weights, and FSDP (like DeepSpeed ZeRO-3) "
                         "shards only floating-point tensors: bitsandbytes packs them as uint8 by default. Load "
                         "with BitsAndBytesConfig(bnb_4bit_quant_storage=torch.bfloat16) and pass quant_storage='bf16' "
                         "(same bytes), or shard less (sharding='zero2' keeps the frozen weights whole)")
    return stage
