"""The architectures the course counts without downloading anything: published Llama-family configs written out
as dicts (Llama-2 7B/13B/70B, LLaMA 33B, Mistral-7B, Qwen2.5, SmolLM2, Llama-3.x), their published parameter
counts, and `config(spec)`, which turns a name, a dict, a config object or a local folder into a transformers
config. `lorakit.memory` counts parameters and bytes from these configs.
"""

from __future__ import annotations

__all__ = ["SUPPORTED", "CONFIGS", "PUBLISHED", "config"]

SUPPORTED = ("llama", "mistral", "qwen2")
_LLAMA2 = dict(model_type="llama", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
               tie_word_embeddings=False)
CONFIGS: dict[str, dict] = {
    # meta-llama/Llama-2-*-hf (config.json on the hub)
    "llama-2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "llama-2-13b": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40),
    "llama-2-70b": dict(_LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8),
    # LLaMA-1 "30B" (huggyllama/llama-30b), the 33B model of the QLoRA paper
    "llama-33b": dict(_LLAMA2, hidden_size=6656, intermediate_size=17920, num_hidden_layers=60,
                      num_attention_heads=52, num_key_value_heads=52, max_position_embeddings=2048,
                      rms_norm_eps=1e-6),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                       sliding_window=4096, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       tie_word_embeddings=False),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True),
    # meta-llama/Meta-Llama-3-8B: 8.03B parameters, often quoted as "a 7B model"
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                       tie_word_embeddings=False),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         tie_word_embeddings=True),
}
# Published parameter counts (model cards / num_parameters() of the real checkpoints), for the tests and
# the lesson's comparison.
PUBLISHED = {"llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
             "llama-33b": 32_528_943_616, "mistral-7b": 7_241_732_096, "qwen2.5-0.5b": 494_032_768,
             "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512, "smollm2-135m": 134_515_008,
             "llama-3-8b": 8_030_261_248, "llama-3.2-1b": 1_235_814_400}


def config(spec):
    """A transformers config from a `CONFIGS` name, a dict with `model_type`, a config object (returned
    as is), or a local folder / hub id (read with `AutoConfig.from_pretrained`)."""
    import transformers
    if hasattr(spec, "model_type") and hasattr(spec, "to_dict"):
        return spec
    if isinstance(spec, str) and spec.lower() in CONFIGS:
        spec = CONFIGS[spec.lower()]
    if isinstance(spec, dict):
        d = dict(spec)
        kind = d.pop("model_type", None)
        if kind not in SUPPORTED:
            raise ValueError(f"unsupported architecture {kind!r}: lorakit counts {', '.join(SUPPORTED)} "
                             "(put model_type in the dict)")
        return transformers.CONFIG_MAPPING[kind](**d)
    if isinstance(spec, str):
        try:
            return transformers.AutoConfig.from_pretrained(spec)
        except OSError as e:
            raise ValueError(f"{spec!r} is not one of the configs lorakit knows ({', '.join(CONFIGS)}), and no "
                             f"model folder or hub id of that name could be read ({type(e).__name__}; offline, a "
                             f"typo, or a gated model). Use one of those names, a dict with model_type, or a "
                             f"transformers config.") from e
    raise TypeError(f"expected a config, a dict, or one of {sorted(CONFIGS)}; found {type(spec).__name__}")
