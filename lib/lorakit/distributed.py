"""Data-parallel fine-tuning past one device: the pieces lesson 08 builds, and the training step each rank runs.

Data parallelism gives every process (one per device) a slice of each batch. Each computes gradients on
its slice; an all-reduce averages them, so every process takes the same optimizer step and the model stays
the same everywhere. Done right, N processes on N slices step exactly like one process on the combined
batch. "Done right" has one trap for language models with label masking: the loss is a mean over answer
tokens, and the slices hold different numbers of them, so averaging the slices' means is not the mean of
the batch. `rank_loss` sums the slice's token losses and divides by the token count of the whole batch
(times the world size, because the all-reduce averages): the gradient is then the combined batch's.

- `rank_loss(logits, labels, n_label_tokens, world_size)`: that loss, the reference of lesson 08's exercise.
- `split_batch(global_batch_size, world_size)`: the per-process batch, refusing sizes that do not divide.
- `require_backend(backend, nproc)`: gloo (CPU) or nccl (NVIDIA GPUs) present, or a message naming the fix.
- `RunConfig`, `train(config)`: LoRA fine-tuning of the embedded model in every process a launcher started
  (DDP, or torch's FSDP2 `fully_shard` with `sharding="fsdp"`), on CPU with gloo, one torch thread per process; rank 0
  alone writes the adapter; each rank writes `rank<N>.json` with its losses, tokens, seconds and shard size
  (`record_file`), or its error (`error_file`).
- `fsdp_qlora_files()`: the accelerate config, training script and launch script for FSDP + QLoRA on GPUs
  (lorakit/assets/fsdp_qlora/; bitsandbytes runs 4-bit layers under FSDP on CUDA only), and `check_fsdp_qlora`,
  which refuses a setup FSDP cannot shard.

Starting the processes (accelerate's notebook_launcher, `accelerate launch`, timeouts, reading the ranks'
records back) is `lorakit.launch`; per-device memory under ZeRO / FSDP is `lorakit.sharding`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.models import TINY

__all__ = ["RUN_SHARDINGS", "rank_loss", "split_batch", "require_backend", "RunConfig", "as_run_config",
           "record_file", "error_file", "train", "fsdp_qlora_files", "check_fsdp_qlora"]

ASSETS = Path(__file__).parent / "assets"
FSDP_QLORA = ASSETS / "fsdp_qlora"
# What `train` runs: "none" is DDP (a full replica per process), "fsdp" FSDP2 FULL_SHARD of every decoder
# layer. (lorakit.sharding.ZERO_STAGES names the stages a memory estimate covers, a different set.)
RUN_SHARDINGS = ("none", "fsdp")
LOSSES = ("rank_loss", "mean_per_rank")


# ------------------------------------------------------------------------------------------------ the step

def rank_loss(logits: torch.Tensor, labels: torch.Tensor, n_label_tokens, world_size: int) -> torch.Tensor:
    """This process's share of the batch loss, such that averaging the gradients over `world_size`
    processes (what DDP's all-reduce does) gives the gradient of the whole batch's mean token loss.

    logits (b, t, vocab) and labels (b, t) of this process's slice; label -100 marks positions without loss
    (prompt, padding); as in transformers' causal LMs, position i predicts label i + 1. `n_label_tokens` is
    the number of labelled positions in the whole batch (all processes). Returns
    sum of this slice's token cross-entropies * world_size / n_label_tokens."""
    logits = logits[:, :-1].float()  # (b, t-1, vocab): position i predicts token i+1
    targets = labels[:, 1:]          # (b, t-1)
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                              ignore_index=-100, reduction="sum")
    return total * world_size / n_label_tokens


def split_batch(global_batch_size: int, world_size: int) -> int:
    """Examples per process when `global_batch_size` examples are split over `world_size` processes."""
    from lorakit.validate import whole_number
    global_batch_size = whole_number(global_batch_size, "global_batch_size")
    world_size = whole_number(world_size, "world_size")
    if global_batch_size % world_size:
        lower = global_batch_size - global_batch_size % world_size
        options = " or ".join(str(x) for x in (lower, lower + world_size) if x > 0)
        raise ValueError(f"a global batch of {global_batch_size} does not split evenly over {world_size} processes: "
                         f"use a multiple of {world_size} ({options}), or a number of processes that divides "
                         f"{global_batch_size}")
    return global_batch_size // world_size


def require_backend(backend: str, nproc: int = 1) -> str:
    """Check that torch.distributed's `backend` works on this machine for `nproc` processes; return a line
    saying what was found, or raise RuntimeError saying what to do instead."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed: install the standard torch wheel "
                           "(pip install torch) to run several processes")
    if backend == "gloo":
        if not dist.is_gloo_available():
            raise RuntimeError("this torch build has no gloo backend (CPU collectives): install the standard "
                               "torch wheel, or use nccl on NVIDIA GPUs")
        return f"gloo: CPU collectives available for {nproc} process(es)"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'nccl' needs NVIDIA GPUs and this machine has none: run the CPU version "
                               "with backend 'gloo' (accelerate: use_cpu: true), or launch on a GPU machine")
        if not dist.is_nccl_available():
            raise RuntimeError("this torch build has no NCCL: install a CUDA build of torch")
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise RuntimeError(f"{nproc} processes on nccl need {nproc} GPUs and this machine has {gpus}: launch "
                               f"{gpus} processes per machine (--num_processes / --nproc_per_node {gpus})")
        return f"nccl: {gpus} GPU(s) for {nproc} process(es)"
    raise ValueError(f"unknown backend {backend!r}: use 'gloo' (CPU) or 'nccl' (NVIDIA GPUs)")


# ------------------------------------------------------------------------------------------------ the run

@dataclass
class RunConfig:
    """One data-parallel LoRA run of `train`. `global_batch_size` examples per optimizer step in total,
    split evenly over the processes (so any number of processes sees the same batches)."""
    out_dir: str
    model_id: str = TINY
    tasks: list = field(default_factory=lambda: ["who_found", "where_found"])  # mixed: a name, or a place of several tokens
    max_steps: int = 20
    global_batch_size: int = 8
    learning_rate: float = 2e-3
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    max_length: int = 256
    n_train: int = 512               # training examples, shared equally by the tasks
    seed: int = 0
    sharding: str = "none"           # "none": DDP; "fsdp": FSDP2 FULL_SHARD of every decoder layer
    loss: str = "rank_loss"          # or "mean_per_rank": each rank's own mean token loss (the trap)
    threads: int = 1                 # torch threads per process
    timeout_s: int = 120             # a collective waiting longer than this fails instead of hanging
    crash_rank: int | None = None    # a rank that raises after its first step (the lesson's failure drill)

    def __post_init__(self):
        if self.sharding not in RUN_SHARDINGS:
            raise ValueError(f"sharding={self.sharding!r}: use one of {', '.join(RUN_SHARDINGS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: use one of {', '.join(LOSSES)}")
        if self.max_steps < 1 or self.threads < 1 or self.timeout_s < 1:
            raise ValueError("max_steps, threads and timeout_s must be >= 1")
        split_batch(self.global_batch_size, 1)


def as_run_config(config) -> RunConfig:
    """`config` as a RunConfig: a RunConfig itself, or its dict (what a launcher hands to each process)."""
    return config if isinstance(config, RunConfig) else RunConfig(**config)


def record_file(out_dir, rank) -> Path:
    """Where rank `rank` writes its record of a finished run."""
    return Path(out_dir) / f"rank{rank}.json"


def error_file(out_dir, rank) -> Path:
    """Where rank `rank` writes the error that ended its run."""
    return Path(out_dir) / f"rank{rank}.error.json"


def _records_errors(run):
    """Write an exception of this rank to out_dir/rank<N>.error.json before it propagates, so that the launcher
    can say which rank failed and why."""
    @functools.wraps(run)
    def wrapper(config):
        cfg = as_run_config(config)
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        try:
            return run(cfg)
        except BaseException as e:
            import traceback
            rank = int(os.environ.get("RANK", 0))
            error_file(cfg.out_dir, rank).write_text(json.dumps({
                "rank": rank, "type": type(e).__name__, "message": str(e)[:2000],
                "traceback": traceback.format_exc()[-4000:]}))
            raise
    return wrapper


@_records_errors
def train(cfg: RunConfig) -> dict:
    """Run `cfg` (a RunConfig or its dict) in this process as one rank of however many processes the launcher
    started (RANK / WORLD_SIZE in the environment, set by accelerate and torchrun; none: one process). Writes
    out_dir/rank<N>.json and, on rank 0 only, out_dir/adapter/; returns this rank's record."""
    import random
    import warnings
    from datetime import timedelta

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft calls a renamed method
    torch.set_num_threads(cfg.threads)
    require_backend("gloo", int(os.environ.get("WORLD_SIZE", 1)))
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    accelerator = Accelerator(cpu=True, kwargs_handlers=[
        InitProcessGroupKwargs(backend="gloo", timeout=timedelta(seconds=cfg.timeout_s))])
    rank, world = accelerator.process_index, accelerator.num_processes
    per_rank = split_batch(cfg.global_batch_size, world)
    if cfg.sharding == "fsdp" and world < 2:
        raise ValueError("sharding='fsdp' shards over the launched processes: launch at least 2 (there is 1), "
                         "or use sharding='none'")

    from peft import LoraConfig, get_peft_model
    from transformers.utils import logging as transformers_logging

    from lorakit import data, models

    # No progress bars in a worker: forked from a notebook, tqdm's widgets would write to the notebook's channel.
    transformers_logging.disable_progress_bar()
    set_seed(cfg.seed)  # the same adapter initialisation in every process
    model, tokenizer = models.load_base(cfg.model_id, device="cpu")
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                             target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
    per_task = cfg.n_train // len(cfg.tasks)
    examples = [data.tokenize_with_masking(ex, tokenizer, cfg.max_length, padding=False)
                for task in cfg.tasks for ex in data.load_task(task)["train"].select(range(per_task))]
    pad_id = tokenizer.pad_token_id
    if cfg.sharding == "fsdp":
        # accelerate's FSDP plugin is for accelerator devices: with cpu=True it silently runs DDP instead. So
        # on the CPU we shard with torch's FSDP2 ourselves: each decoder layer, then the rest (embeddings,
        # norm, lm_head) with the root. Every parameter becomes a DTensor holding 1/world of it.
        from torch.distributed.fsdp import fully_shard
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        model = accelerator.prepare(model)  # DDP: a full replica, gradients all-reduced in backward
    optimizer = accelerator.prepare(
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate))
    local_param_bytes = sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())

    order, rng = [], random.Random(cfg.seed)
    losses, tokens = [], 0
    accelerator.wait_for_everyone()
    t0 = time.perf_counter()
    for step in range(cfg.max_steps):
        batch = []
        while len(batch) < cfg.global_batch_size:  # the global batch: the same in every process
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch.append(examples[order.pop()])
        length = max(len(ex["input_ids"]) for ex in batch)  # pad to the global batch's longest
        mine = data.collate(batch[rank * per_rank:(rank + 1) * per_rank] + [_pad_row(length)], pad_id)
        mine = {k: v[:-1] for k, v in mine.items()}  # the pad row only fixed the length
        n_label = accelerator.reduce(torch.tensor((mine["labels"][:, 1:] != -100).sum().item()), "sum")
        logits = model(input_ids=mine["input_ids"], attention_mask=mine["attention_mask"]).logits
        if cfg.loss == "rank_loss":
            loss = rank_loss(logits, mine["labels"], n_label, world)
        else:  # this rank's mean: right only when every rank's slice holds as many answer tokens
            loss = rank_loss(logits, mine["labels"], (mine["labels"][:, 1:] != -100).sum(), 1)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
        tokens += int(mine["attention_mask"].sum())
        if cfg.crash_rank == rank:
            raise RuntimeError(f"rank {rank} was told to crash after step {step} (RunConfig.crash_rank)")
    seconds = time.perf_counter() - t0

    if cfg.sharding == "fsdp":  # every rank takes part in gathering the full weights; rank 0 receives them
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = accelerator.get_state_dict(model)
    wrote = False
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(Path(cfg.out_dir) / "adapter", state_dict=state)
        wrote = True
    record = {"rank": rank, "world_size": world, "sharding": cfg.sharding, "backend": accelerator.state.backend,
              "distributed_type": str(accelerator.distributed_type).rsplit(".", 1)[-1], "losses": losses,
              "tokens": tokens, "seconds": seconds, "wrote_adapter": wrote, "local_param_bytes": local_param_bytes,
              "threads": torch.get_num_threads(), "pid": os.getpid()}
    record_file(cfg.out_dir, rank).write_text(json.dumps(record))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return record


def _local(p):
    """A parameter's local tensor (FSDP2 keeps each process's shard in a DTensor)."""
    return p.to_local() if hasattr(p, "to_local") else p


def _pad_row(length: int) -> dict:
    return {"input_ids": [0] * length, "attention_mask": [0] * length, "labels": [-100] * length}


# ------------------------------------------------------------------------------------- FSDP + QLoRA (GPU)

def fsdp_qlora_files() -> dict[str, Path]:
    """The shipped FSDP + QLoRA files: "accelerate_config" (two GPUs, FULL_SHARD, CPU offload), "script" (the
    training script) and "launch" (the two-GPU `accelerate launch` and the multi-node `torchrun` commands)."""
    return {"accelerate_config": FSDP_QLORA / "fsdp_qlora.yaml", "script": FSDP_QLORA / "train_fsdp_qlora.py",
            "launch": FSDP_QLORA / "launch.sh"}


FLOAT_STORAGE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def check_fsdp_qlora(accelerate_config: dict, quant_storage, torch_dtype, *, mixed_precision=None,
                     trainer: bool = True) -> str:
    """Refuse an FSDP + QLoRA setup FSDP cannot train; return a one-line summary when it can.

    accelerate_config: the parsed accelerate YAML; quant_storage: `BitsAndBytesConfig.bnb_4bit_quant_storage`
    (a torch dtype or its name); torch_dtype: the dtype the model is loaded in (`from_pretrained(dtype=...)`);
    mixed_precision: the run's "no", "bf16" or "fp16" (under transformers' Trainer its bf16/fp16 arguments; by
    default the config's `mixed_precision`); trainer: whether transformers' Trainer runs the training.

    FSDP flattens and shards parameters only in a floating-point dtype, one dtype per unit: bitsandbytes' default
    uint8 storage cannot be sharded, and the storage must equal the dtype of the layers beside it.

    Mixed precision: FSDP casts every parameter of a unit to its `MixedPrecision.param_dtype` before the unit
    computes, and bitsandbytes reads the packed 4-bit weights as raw bytes, so a cast to any dtype but their storage
    dtype rewrites them into other weights. accelerate sets `param_dtype` to the run's mixed precision. transformers'
    Trainer under FSDP1 then resets it to the storage dtype for a peft model on 4-bit weights stored in a float dtype
    (`update_fsdp_plugin_peft` in transformers/distributed/fsdp.py): FSDP casts nothing, and autocast computes in the
    16-bit dtype. There bf16 or fp32 storage works with either mixed precision (peft's FSDP + QLoRA guide: fp32 "for
    automatic mixed precision", at more memory). Trainer does not reset it under FSDP2 (it cannot delay creating the
    optimizer there), and a loop of your own over `accelerator.prepare` does not either: there the mixed precision
    must be "no" or the storage dtype itself."""
    storage = str(quant_storage).removeprefix("torch.")
    dtype = str(torch_dtype).removeprefix("torch.")
    if accelerate_config.get("distributed_type") != "FSDP":
        raise ValueError(f"distributed_type is {accelerate_config.get('distributed_type')!r}: FSDP + QLoRA needs "
                         "distributed_type: FSDP")
    fsdp = accelerate_config.get("fsdp_config") or {}
    strategy = str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD"))
    if storage not in FLOAT_STORAGE:
        raise ValueError(f"bnb_4bit_quant_storage={storage}: FSDP shards only floating-point tensors and bitsandbytes "
                         "packs 4-bit weights as uint8 by default. Set BitsAndBytesConfig(bnb_4bit_quant_storage="
                         "torch.bfloat16) and load the model with dtype=torch.bfloat16")
    if storage != dtype:
        raise ValueError(f"bnb_4bit_quant_storage={storage} but the model is loaded in {dtype}: FSDP needs one dtype per "
                         f"sharded unit, so load with dtype=torch.{storage} (or store the 4-bit weights as {dtype})")
    mixed = str(accelerate_config.get("mixed_precision", "no") if mixed_precision is None else mixed_precision)
    if mixed not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed precision {mixed!r}: FSDP + QLoRA runs with 'no', 'bf16' or 'fp16'")
    cast_to = {"bf16": "bfloat16", "fp16": "float16"}.get(mixed)
    version = int(fsdp.get("fsdp_version", 1))
    resets = trainer and version == 1  # Trainer sets FSDP's param_dtype to the storage dtype
    if cast_to and cast_to != storage and not resets:
        who = "under FSDP2 Trainer does not stop it" if trainer else "without transformers' Trainer nothing stops it"
        raise ValueError(f"mixed precision {mixed} makes FSDP cast every parameter to {cast_to} before it computes, "
                         f"the 4-bit weights packed as {storage} too, and that turns their bytes into other weights "
                         f"({who}). Store the 4-bit weights as {cast_to} and load the model in it, set mixed precision "
                         f"'no' and autocast yourself, or train with Trainer under fsdp_version: 1")
    how = ("FSDP keeps them as they are" if not cast_to or cast_to == storage
           else f"Trainer keeps FSDP from casting them, autocast computes in {cast_to}")
    return (f"FSDP {strategy} over {accelerate_config.get('num_processes')} processes, 4-bit weights stored as "
            f"{storage} beside {dtype} layers, mixed precision {mixed} ({how}), CPU offload "
            f"{bool(fsdp.get('fsdp_offload_params'))}")
