"""Base models: the embedded tiny model, presets for hub models on a GPU, and `load_base`.

Every lesson loads its model with `load_base(MODEL_ID, quantization=...)`. On the course machines (no
GPU, no downloads) `MODEL_ID` is `TINY`, a ~2M-parameter Llama pretrained by `lorakit.pretrain` and
shipped inside the package in Hugging Face format; on a GPU machine it is any hub id, for example one of
`PRESETS`. Both go through the same `from_pretrained` calls, so what a lesson teaches about
`BitsAndBytesConfig`, `target_modules` or `prepare_model_for_kbit_training` holds for either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.env import compute_dtype, pick_device

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
    """A hub model the course's notebooks suit, with the sizes that decide its memory needs.

    The memory numbers are estimates from the architecture (see `memory_gb`), not GPU measurements."""
    model_id: str
    params: int                 # total, embeddings counted once when tied
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int                 # num_key_value_heads * head_dim
    vocab: int
    tied: bool
    note: str = ""

    @property
    def linear_params(self) -> int:
        """Parameters in the q/k/v/o/gate/up/down projections: the ones 4-bit quantization packs."""
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_dim + 3 * self.hidden * self.intermediate
        return self.layers * per_layer

    def lora_params(self, r: int = 16) -> int:
        """Adapter parameters, r on all seven projections: r * (in + out) each."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
        return self.layers * per_layer

    def activations_gb(self, batch: int = 8, seq: int = 512) -> float:
        """A rough activation budget with gradient checkpointing: fp32 logits and their gradient (the big
        vocabularies make this the largest part), one bf16 hidden state kept per layer, one layer's
        recomputed activations, and about 0.5 GB of CUDA context."""
        tokens = batch * seq
        logits = tokens * self.vocab * 4 * 2
        checkpoints = tokens * self.hidden * 2 * self.layers
        one_layer = tokens * (10 * self.hidden + 3 * self.intermediate) * 2
        return (logits + checkpoints + one_layer) / 1e9 + 0.5

    def memory_gb(self, method: str = "qlora", r: int = 16, batch: int = 8, seq: int = 512) -> float:
        """Estimated GB to fine-tune with batch x seq tokens: 'qlora' (nf4 + double quant: 4.127 bits
        per linear parameter, the rest bf16; LoRA r on all linear layers), 'lora' (bf16 weights, same
        adapters) or 'full' (16 bytes per parameter, mixed-precision AdamW)."""
        if method == "full":
            return self.params * 16 / 1e9 + self.activations_gb(batch, seq)
        if method == "lora":
            weights = self.params * 2
        elif method == "qlora":
            weights = self.linear_params * 4.127 / 8 + (self.params - self.linear_params) * 2
        else:
            raise ValueError(f"unknown method {method!r}: use 'qlora', 'lora' or 'full'")
        adapters = self.lora_params(r) * 16  # bf16 weight + grad, fp32 master + Adam m, v
        return (weights + adapters) / 1e9 + self.activations_gb(batch, seq)


PRESETS = {
    "smollm2-135m": Preset("HuggingFaceTB/SmolLM2-135M", 134_515_008, 576, 1536, 30, 192, 49152, True,
                           "the quickest: every lesson runs in minutes on a free Colab T4"),
    "qwen2.5-0.5b": Preset("Qwen/Qwen2.5-0.5B", 494_032_768, 896, 4864, 24, 128, 151936, True,
                           "q/k/v have biases (peft adapts them the same way)"),
    "llama-3.2-1b": Preset("meta-llama/Llama-3.2-1B", 1_235_814_400, 2048, 8192, 16, 512, 128256, True,
                           "gated on the hub: accept the licence and log in first"),
    "qwen2.5-1.5b": Preset("Qwen/Qwen2.5-1.5B", 1_543_714_304, 1536, 8960, 28, 256, 151936, True,
                           "T4 has no bf16: load_base picks fp16 there"),
}


def presets_table() -> str:
    """PRESETS as a Markdown table of estimated memory needs (GB; batch 8 x 512 tokens, gradient
    checkpointing) for QLoRA, LoRA and full fine-tuning. Estimates from the architecture, not measured."""
    rows = ["| preset | hub id | parameters | QLoRA r=16 | LoRA r=16 (bf16) | full FT (AdamW) | note |",
            "|---|---|---|---|---|---|---|"]
    for name, p in PRESETS.items():
        rows.append(f"| {name} | `{p.model_id}` | {p.params / 1e6:,.0f}M | {p.memory_gb('qlora'):.1f} GB "
                    f"| {p.memory_gb('lora'):.1f} GB | {p.memory_gb('full'):.1f} GB | {p.note} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------
# bitsandbytes on a CPU
# --------------------------------------------------------------------------------------------------

def _import_bitsandbytes():
    # Silence "Failed to load CPU gemm_4bit_forward from kernels-community" (harmless, printed at import).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes
    return bitsandbytes


def disable_cpu_inference_repack(model) -> int:
    """Switch off bitsandbytes' CPU inference repack on every `Linear4bit` of `model`; returns how many.

    bitsandbytes 0.50 trap 1 (FACTS.md): a 4-bit layer that runs in eval() mode under no_grad on a CPU
    with AVX512-BF16 repacks its weight for a fused inference kernel. After that, LoRA adapters on top of
    it silently get no gradients and the loss stays flat. `load_base` calls this for 4-bit models on CPU,
    so that "evaluate the base model, then train" works as it does on a GPU.
    """
    bnb = _import_bitsandbytes()
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def quantization_config(quantization, dtype: torch.dtype | None = None):
    """The `BitsAndBytesConfig` for "nf4" (QLoRA's choice: NF4 + double quantization), "fp4", "int8",
    or a `BitsAndBytesConfig` passed through unchanged. None stays None."""
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if isinstance(quantization, BitsAndBytesConfig):
        return quantization
    if isinstance(quantization, str) and quantization.lower() in ("nf4", "fp4"):
        _import_bitsandbytes()
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization.lower(),
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype or torch.bfloat16)
    if isinstance(quantization, str) and quantization.lower() == "int8":
        _import_bitsandbytes()
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
    dtype         dtype of the weights that stay unquantized; default float32 on a CPU (bf16 compute
                  comes from autocast) and `lorakit.env.compute_dtype` on a GPU (bf16 from compute
                  capability 8.0, fp16 before). 4-bit layers compute in `compute_dtype(device)`.
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
