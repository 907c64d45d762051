"""Base models: the embedded tiny model, presets for hub models on a GPU, and `load_base`.

Every lesson loads its model with `load_base(MODEL_ID, quantization=...)`. On the course machines (no
GPU, no downloads) `MODEL_ID` is `TINY`, a ~2M-parameter Llama pretrained by `lorakit.tooling.pretrain` and
shipped inside the package in Hugging Face format; on a GPU machine it is any hub id, for example one of
`PRESETS`. Both go through the same `from_pretrained` calls, so what a lesson teaches about
`BitsAndBytesConfig`, `target_modules` or `prepare_model_for_kbit_training` holds for either.

Small random Llamas, for the checks, the tests and the benchmarks, come from here too: `tiny_config()` reads
the embedded model's architecture, and `seeded_llama(config, seed)` builds a Llama whose every weight is drawn
from an explicit generator, inside `building()`, so that the same seed gives the same model in every process
and thread (the grader judges many submissions at once in threads, and a verdict must not depend on that).
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.env import compute_dtype, import_bitsandbytes, pick_device

__all__ = ["TINY", "TINY_PATH", "ALL_LINEAR", "PRESETS", "ModelNotFoundError", "resolve", "Preset",
           "presets_table", "disable_cpu_inference_repack", "cpu_inference_repack_off", "quantization_config",
           "load_tokenizer", "load_base", "tiny_config", "building", "reseed", "seeded_llama"]

TINY = "lorakit/tiny-stories-llama"
TINY_PATH = Path(__file__).parent / "assets" / "tiny-stories-llama"
QUANTIZATIONS = ("nf4", "fp4", "int8")
# QLoRA's finding: adapt every linear layer of the blocks (the names are the same in Llama, Qwen2, SmolLM2).
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ModelNotFoundError(OSError):
    """A model id that is neither a local folder nor reachable on the Hugging Face hub."""


def resolve(model_id: str) -> str:
    """The path or hub id to hand to `from_pretrained`: `TINY` becomes the packaged folder."""
    if model_id == TINY:
        return str(TINY_PATH)
    return str(model_id)


# --------------------------------------------------------------------------------------------------
# GPU presets
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    """A hub model the course's notebooks suit. Its architecture is written out in
    `lorakit.memory.CONFIGS[name]` (no hub access needed), so its size and memory needs come from
    `lorakit.memory`: estimates from the architecture, not GPU measurements."""
    model_id: str
    note: str = ""


PRESETS = {
    "smollm2-135m": Preset("HuggingFaceTB/SmolLM2-135M", "the quickest: every lesson runs in minutes on a free Colab T4"),
    "qwen2.5-0.5b": Preset("Qwen/Qwen2.5-0.5B", "q/k/v have biases (peft adapts them the same way)"),
    "llama-3.2-1b": Preset("meta-llama/Llama-3.2-1B", "gated on the hub: accept the licence and log in first"),
    "qwen2.5-1.5b": Preset("Qwen/Qwen2.5-1.5B", "T4 has no bf16: load_base picks fp16 there"),
}


def presets_table(r: int = 16, batch_size: int = 8, seq_len: int = 512) -> str:
    """PRESETS as a Markdown table of estimated memory needs (GB; `batch_size` x `seq_len` tokens,
    gradient checkpointing) for QLoRA and LoRA (rank r on all linear layers) and full fine-tuning."""
    from lorakit import memory
    rows = [f"| preset | hub id | parameters | QLoRA r={r} | LoRA r={r} (bf16) | full FT (AdamW) | note |",
            "|---|---|---|---|---|---|---|"]
    for name, p in PRESETS.items():
        gb = {m: memory.estimate(name, m, r=r, target_modules="all-linear", batch_size=batch_size,
                                 seq_len=seq_len).total_bytes / 1e9 for m in ("qlora", "lora", "full")}
        rows.append(f"| {name} | `{p.model_id}` | {memory.count_parameters(name) / 1e6:,.0f}M | {gb['qlora']:.1f} GB "
                    f"| {gb['lora']:.1f} GB | {gb['full']:.1f} GB | {p.note} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------
# bitsandbytes on a CPU
# --------------------------------------------------------------------------------------------------

# bitsandbytes 0.50's switch on `Linear4bit` (`Linear4bit.forward`, CPU branch): a 4-bit layer that runs in
# eval() mode under no_grad on a CPU with AVX512-BF16 repacks its weight for a fused inference kernel. After
# that, LoRA adapters on top of it silently get no gradients and the loss stays flat.
CPU_REPACK_FLAG = "support_avx512bf16_for_cpu"


def _repack_off(model) -> list:
    """Switch the repack off on every layer of `model` that has it on; returns those layers."""
    changed = [m for m in model.modules() if getattr(m, CPU_REPACK_FLAG, False)]
    for m in changed:
        setattr(m, CPU_REPACK_FLAG, False)
    return changed


def disable_cpu_inference_repack(model) -> int:
    """Switch off bitsandbytes' CPU inference repack (see `CPU_REPACK_FLAG`) on every `Linear4bit` of
    `model`, for good; returns how many layers it switched off. `load_base` calls this for 4-bit models on
    CPU, so that "evaluate the base model, then train" works as it does on a GPU."""
    return len(_repack_off(model))


@contextlib.contextmanager
def cpu_inference_repack_off(model):
    """`disable_cpu_inference_repack` for the `with` block only: the layers it switched off are switched
    on again afterwards (the evaluation helpers of `lorakit.data` use it, leaving a model as they found it)."""
    changed = _repack_off(model)
    try:
        yield
    finally:
        for m in changed:
            setattr(m, CPU_REPACK_FLAG, True)


def quantization_config(quantization, dtype: torch.dtype | None = None):
    """The `BitsAndBytesConfig` for "nf4" (QLoRA's choice: NF4 + double quantization), "fp4", "int8",
    or a `BitsAndBytesConfig` passed through unchanged. None stays None. 4-bit layers compute in `dtype`,
    by default `lorakit.env.compute_dtype()` (bf16 where native, fp16 on older GPUs, fp32 on other CPUs)."""
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if isinstance(quantization, BitsAndBytesConfig):
        return quantization
    if isinstance(quantization, str) and quantization.lower() in ("nf4", "fp4"):
        import_bitsandbytes()
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization.lower(),
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype or compute_dtype())
    if isinstance(quantization, str) and quantization.lower() == "int8":
        import_bitsandbytes()
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization={quantization!r} is not one of the accepted values: None, "
                     f"{', '.join(repr(q) for q in QUANTIZATIONS)}, or a transformers.BitsAndBytesConfig")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

def load_tokenizer(model_id: str = TINY):
    """The tokenizer of `model_id`, with a padding token (EOS when the model has none, as for Llama)."""
    from transformers import AutoTokenizer

    tokenizer = _not_found_is_clear(model_id, AutoTokenizer.from_pretrained, resolve(model_id))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(model_id: str = TINY, quantization=None, device="auto", dtype: torch.dtype | None = None):
    """Load a base model and its tokenizer: `(model, tokenizer)`.

    model_id      `TINY` (the embedded model) or anything `from_pretrained` accepts: a hub id such as
                  `PRESETS["smollm2-135m"].model_id`, or a local folder.
    quantization  None, "nf4" (NF4 + double quantization, QLoRA's recipe), "fp4", "int8", or your own
                  `transformers.BitsAndBytesConfig`.
    device        "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1"...
    dtype         dtype of the weights that stay unquantized; default float32 on a CPU (bf16 compute,
                  where the CPU has it natively, comes from autocast) and `lorakit.env.compute_dtype` on a
                  GPU (bf16 from compute capability 8.0, fp16 before). 4-bit layers compute in
                  `compute_dtype(device)`: bf16 on a CPU with bf16 units, float32 on other CPUs.
    """
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    if dtype is None:
        dtype = torch.float32 if dev.type == "cpu" else compute_dtype(dev)
    bnb_config = quantization_config(quantization, compute_dtype(dev))
    kwargs = {"dtype": dtype}
    if bnb_config is not None:
        kwargs["quantization_config"] = bnb_config
        kwargs["device_map"] = {"": str(dev) if dev.type != "cuda" else (dev.index or 0)}
    tokenizer = load_tokenizer(model_id)
    model = _not_found_is_clear(model_id, AutoModelForCausalLM.from_pretrained, resolve(model_id), **kwargs)
    if bnb_config is None:
        model.to(dev)
    elif dev.type == "cpu" and getattr(bnb_config, "load_in_4bit", False):
        disable_cpu_inference_repack(model)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _not_found_is_clear(model_id, load, *args, **kwargs):
    """Call `load`; turn "no such model here, and no network" into an error that says what to do."""
    try:
        return load(*args, **kwargs)
    except OSError as e:  # transformers raises OSError (or a subclass) for a missing local/hub model
        if isinstance(e, ModelNotFoundError) or Path(str(args[0])).is_dir():
            raise
        raise ModelNotFoundError(
            f"Could not find the model {model_id!r} locally or on the Hugging Face hub (offline, no "
            f"network, a typo, or a gated model you have not been granted). The embedded model "
            f"{TINY!r} always works; on a GPU with network use a hub id such as "
            f"{PRESETS['smollm2-135m'].model_id!r}.") from e


# --------------------------------------------------------------------------------------------------
# Small seeded Llamas (checks, tests, benchmarks)
# --------------------------------------------------------------------------------------------------

# The keys of the embedded model's config.json that make its architecture (what `LlamaConfig` needs to
# build the same shapes); the rest (dtype, architectures, transformers_version) describes the file.
ARCHITECTURE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id")


def tiny_config(**overrides) -> dict:
    """The embedded model's architecture as a dict for `transformers.LlamaConfig`, read from its config.json,
    with `overrides` applied: `tiny_config(num_hidden_layers=2, vocab_size=256)` is a smaller model with the
    same layer shapes."""
    on_disk = json.loads((TINY_PATH / "config.json").read_text())
    config = {k: v for k, v in on_disk.items() if k in ARCHITECTURE}
    config.update(overrides)
    return config


@contextlib.contextmanager
def building():
    """The scope in which to build or load torch modules when several threads may do so at once (the grader
    judges submissions in threads). Two things make building process-wide:

    - torch's layers draw their first weights from the global generator. The scope leaves that generator as
      it found it (a notebook's random numbers are the same with or without a check), and every value kept
      is overwritten from an explicit Generator (`reseed`) or a drawn tensor.
    - transformers turns steps of model building off for every thread while it loads a model
      (`from_pretrained`): a small Llama with tied embeddings built meanwhile in another thread came out with
      its lm_head untied, so other weights and other logits. So builds and loads take turns: one lock for the
      process (re-entrant: builds nest).
    """
    with _BUILDING, torch.random.fork_rng(devices=[]):
        yield


_BUILDING = threading.RLock()


def reseed(module, seed: int):
    """`module` (returned) with every floating-point parameter drawn again from a torch Generator seeded with
    `seed`, in `named_parameters()` order: a matrix N(0, 1 / fan_in) (activations stay near unit scale, so
    comparisons of outputs mean something), a vector 1 + N(0, 0.01) (norm scales). The same weights in every
    process and thread, whatever the global generator holds."""
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for _, p in module.named_parameters():
            if p.is_floating_point():
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
                p.copy_(noise / math.sqrt(p.shape[-1]) if p.dim() > 1 else 1 + 0.1 * noise)
    return module


def seeded_llama(config: dict, seed: int = 0):
    """A float32 `LlamaForCausalLM` of `config` (a dict, e.g. `tiny_config(...)`) in eval mode, its weights
    drawn from a Generator seeded with `seed` (`reseed`): the same model in every process and thread."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with building():
        model = LlamaForCausalLM(LlamaConfig(**config))
    return reseed(model, seed).float().eval()
