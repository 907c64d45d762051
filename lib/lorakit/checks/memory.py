"""Self-checks for lesson 01 (memory and parameter counting)."""

from __future__ import annotations

from . import close, expect, passed

ADAMW_PARTS = {"weights": 2, "gradients": 2, "master weights": 4, "adam m": 4, "adam v": 4}
# Configs the parameter counter is checked on: plain multi-head (Llama-2), grouped-query (Mistral,
# Llama-2-70B), biases on q/k/v and tied embeddings (Qwen2.5), tied embeddings in a Llama (SmolLM2).
COUNT_CHECKS = ("llama-2-7b", "mistral-7b", "qwen2.5-0.5b", "smollm2-135m", "llama-2-70b")


def _callable(fn, name: str, signature: str) -> None:
    expect(callable(fn), f"`{name}` should be a function {signature}, found {type(fn).__name__}.")


def nf4_bits(fn) -> None:
    _callable(fn, "nf4_bits", "of double_quant (True or False)")
    plain, dq = fn(False), fn(True)
    expect(close(plain, 4.5), f"NF4 without double quantization: expected 4.5 bits per parameter, found {plain!r}.",
           "4 bits for the code, plus one fp32 absmax (32 bits) shared by a block of 64 parameters.")
    expect(close(dq, 4 + 8 / 64 + 32 / (64 * 256)),
           f"NF4 with double quantization: expected 4.127 bits per parameter (4.126953125), found {dq!r}.",
           "the absmax of each block of 64 is stored in 8 bits, and each group of 256 absmax values "
           "shares one fp32 scale: 4 + 8/64 + 32/(64*256).")
    passed(f"NF4 stores {plain} bits per parameter, {dq:.4f} with double quantization")


def adamw_bytes(table) -> None:
    expect(isinstance(table, dict), f"`adamw_bytes` should be a dict of part -> bytes per parameter, found {type(table).__name__}.")
    missing = [k for k in ADAMW_PARTS if k not in table]
    expect(not missing, f"`adamw_bytes` is missing {missing}.", f"use exactly these keys: {list(ADAMW_PARTS)}.")
    for k, v in ADAMW_PARTS.items():
        hint = {"weights": "the model itself is kept in bf16.", "gradients": "gradients have the dtype of the weights: bf16.",
                "master weights": "the optimizer updates an fp32 copy of every weight (small updates vanish in bf16).",
                "adam m": "Adam's first moment is kept in fp32.", "adam v": "Adam's second moment is kept in fp32."}[k]
        expect(close(table[k], v), f"{k}: expected {v} bytes per parameter, found {table[k]!r}.", hint)
    total = sum(table[k] for k in ADAMW_PARTS)
    passed(f"mixed-precision AdamW keeps {total} bytes per trained parameter")


def _meta_num_parameters(cfg) -> int:
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):  # the shapes, no memory
        return AutoModelForCausalLM.from_config(cfg).num_parameters()


def _diagnose(diff: int, cfg) -> str:
    """Name the likely missing piece from the size of the difference."""
    from lorakit import memory
    s = memory._sizes(cfg)
    h, v, L = s["h"], s["vocab"], s["layers"]
    guesses = {v * h: "the lm_head (a vocab x hidden matrix, counted separately when the embeddings are NOT tied)",
               -v * h: "the lm_head: with tie_word_embeddings=True it shares the embedding matrix and is counted once",
               L * 2 * h: "the two RMSNorm scales per block (hidden numbers each)",
               h: "the final norm (model.norm: hidden numbers)",
               L * (s["q"] + 2 * s["kv"]): "the q/k/v biases (Qwen2 has a bias on q, k and v)",
               -L * (s["q"] + 2 * s["kv"]): "biases: only Qwen2 has them (on q, k and v)",
               L * 2 * h * (s["q"] - s["kv"]): "grouped-query attention: k and v have num_key_value_heads x head_dim outputs, not hidden",
               -L * 2 * h * (s["q"] - s["kv"]): "grouped-query attention: k and v have num_key_value_heads x head_dim outputs, not hidden"}
    return guesses.get(diff, "compare each part: embeddings, per-block attention (q, k, v, o), MLP (gate, up, down), norms, lm_head")


def count_parameters(fn) -> None:
    _callable(fn, "count_parameters", "of a transformers config")
    from lorakit import memory
    rows = []
    for name in COUNT_CHECKS:
        cfg = memory.config(name)
        truth = _meta_num_parameters(cfg)
        got = fn(cfg)
        diff = truth - (got if isinstance(got, (int, float)) else 0)
        expect(isinstance(got, int) or (isinstance(got, float) and got.is_integer()),
               f"{name}: expected a whole number of parameters, found {got!r}.")
        expect(got == truth, f"{name}: model.num_parameters() on the meta device says {truth:,}; your count is "
               f"{int(got):,} ({'missing' if diff > 0 else 'extra'} {abs(diff):,}).",
               f"check {_diagnose(diff, cfg)}.")
        rows.append(f"{name} {truth:,}")
    passed("count_parameters equals model.num_parameters() for " + ", ".join(rows))


def lora_params(fn) -> None:
    _callable(fn, "lora_params", "of (d_in, d_out, r)")
    got = fn(5000, 4000, 8)
    expect(got == 72_000, f"a 5000 x 4000 layer with r=8: expected 72,000 trainable parameters, found {got!r}.",
           "A is r x d_in and B is d_out x r: r * (d_in + d_out).")
    expect(fn(4096, 4096, 8) == 65_536, f"a 4096 x 4096 layer with r=8: expected 65,536, found {fn(4096, 4096, 8)!r}.")
    expect(fn(10, 20, 1) == 30, f"a 10 x 20 layer with r=1: expected 30, found {fn(10, 20, 1)!r}.",
           "the count must use the arguments, not fixed numbers.")
    passed(f"LoRA r=8 on a 5000 x 4000 layer trains 72,000 of 20,000,000 parameters "
           f"({1 - 72_000 / 20_000_000:.2%} fewer)")


def qlora_weights_gb(fn) -> None:
    _callable(fn, "qlora_weights_gb", "of a transformers config")
    from lorakit import memory
    for name in ("llama-2-7b", "qwen2.5-0.5b", "llama-2-70b"):
        cfg = memory.config(name)
        truth = memory.estimate(cfg, "qlora", activations=False).weights_bytes / 1e9
        got = fn(cfg)
        expect(close(got, truth, rel=2e-3), f"{name}: expected about {truth:.3f} GB of 4-bit weights with their "
               f"constants, found {got!r}.",
               "quantized linear layers at nf4_bits(True) / 8 bytes per parameter, everything else "
               "(embeddings, norms, lm_head) at 2 bytes (bf16); divide bytes by 1e9.")
    passed("QLoRA weights: " + ", ".join(f"{n} {fn(memory.config(n)):.2f} GB" for n in ("llama-2-7b", "llama-2-70b")))
