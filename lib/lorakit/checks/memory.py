"""Checks for lesson 01 (memory and parameter counting), judged (see lorakit.checks.judged): the learner's
functions are called on configs and numbers drawn from a seed, and the answers are compared with
lorakit.memory and with transformers' own count on the meta device."""

from __future__ import annotations

from lorakit.checks import close, expect
from lorakit.checks.judged import data_or_repr, expect_callable, judged_check

ADAMW_PARTS = {"weights": 2, "gradients": 2, "master weights": 4, "adam m": 4, "adam v": 4}
ADAMW_HINTS = {"weights": "the model itself is kept in bf16.", "gradients": "gradients have the dtype of the weights: bf16.",
               "master weights": "the optimizer updates an fp32 copy of every weight (small updates vanish in bf16).",
               "adam m": "Adam's first moment is kept in fp32.", "adam v": "Adam's second moment is kept in fp32."}
# Configs the parameter counter is checked on: plain multi-head (Llama-2), grouped-query (Mistral,
# Llama-2-70B), biases on q/k/v and tied embeddings (Qwen2.5), tied embeddings in a Llama (SmolLM2).
COUNT_CHECKS = ("llama-2-7b", "mistral-7b", "qwen2.5-0.5b", "smollm2-135m", "llama-2-70b")
HIDDEN_COUNT_CHECKS = ("llama-2-13b", "llama-33b", "qwen2.5-7b", "llama-3.2-1b")
QLORA_CHECKS = COUNT_CHECKS + HIDDEN_COUNT_CHECKS + ("qwen2.5-1.5b",)


def _config(spec):
    from lorakit import memory
    return memory.config(spec)


def random_config(rng, max_layers: int = 6) -> dict:
    """A made-up Llama, Mistral or Qwen2 architecture (a dict for lorakit.memory.config): grouped-query or
    not, tied embeddings or not, sometimes a head_dim that is not hidden / heads."""
    kind = rng.choice(["llama", "mistral", "qwen2"])
    heads = rng.choice([2, 4, 6, 8, 12, 16])
    head_dim = rng.choice([16, 32, 64, 128])
    d = dict(model_type=kind, num_attention_heads=heads, hidden_size=heads * head_dim,
             num_key_value_heads=rng.choice([k for k in (1, 2, 3, 4, heads) if heads % k == 0]),
             intermediate_size=64 * rng.integer(2, 48), num_hidden_layers=rng.integer(1, max_layers),
             vocab_size=rng.integer(500, 60_000), tie_word_embeddings=rng.choice([True, False]),
             max_position_embeddings=2048)
    if kind == "llama" and rng.integer(0, 2) == 0:
        d["head_dim"] = rng.choice([16, 32, 64])
    return d


def _number(x):
    return data_or_repr(x)


@judged_check
class nf4_bits:
    """`nf4_bits(double_quant)`: bits stored per NF4 parameter, with and without double quantization."""
    answer = {"bits": [object]}
    reference = ("lorakit.memory.bits_per_param", "lorakit.nf4.bits_per_param")

    def draw(rng):
        return {"double_quant": rng.sample([False, True], 2) if rng.grading else [False, True]}

    def probe(inputs, fn):
        expect_callable(fn, "nf4_bits", "a function of double_quant (True or False)")
        return {"bits": [_number(fn(dq)) for dq in inputs["double_quant"]]}

    def judge(inputs, answer):
        from lorakit import memory
        got = dict(zip(inputs["double_quant"], answer["bits"]))
        expect(len(got) == 2, "`nf4_bits` should return one number per call.")
        plain, dq = got[False], got[True]
        expect(close(plain, memory.bits_per_param("nf4")),
               f"NF4 without double quantization: expected 4.5 bits per parameter, found {plain!r}.",
               "4 bits for the code, plus one fp32 absmax (32 bits) shared by a block of 64 parameters.")
        expect(close(dq, memory.bits_per_param("nf4", double_quant=True)),
               f"NF4 with double quantization: expected 4.127 bits per parameter (4.126953125), found {dq!r}.",
               "the absmax of each block of 64 is stored in 8 bits, and each group of 256 absmax values "
               "shares one fp32 scale: 4 + 8/64 + 32/(64*256).")
        return f"NF4 stores {plain} bits per parameter, {dq:.4f} with double quantization"


@judged_check
class adamw_bytes:
    """The learner's dict `adamw_bytes`: bytes per trained parameter of each part of mixed-precision AdamW."""
    answer = {"is_dict": bool, "keys": [str], "values": dict}
    reported = {"is_dict": "whether the learner's object is a dict", "keys": "the names of its keys"}

    def draw(rng):
        parts = list(ADAMW_PARTS)
        return {"parts": rng.sample(parts, len(parts)) if rng.grading else parts}

    def probe(inputs, table):
        if not isinstance(table, dict):
            return {"is_dict": False, "keys": [type(table).__name__], "values": {}}
        return {"is_dict": True, "keys": [str(k) for k in table],
                "values": {k: _number(table[k]) for k in inputs["parts"] if k in table}}

    def judge(inputs, answer):
        expect(answer["is_dict"], f"`adamw_bytes` should be a dict of part -> bytes per parameter, found "
                                  f"{answer['keys'][0] if answer['keys'] else 'something else'}.")
        missing = [k for k in ADAMW_PARTS if k not in answer["values"]]
        expect(not missing, f"`adamw_bytes` is missing {missing}.", f"use exactly these keys: {list(ADAMW_PARTS)}.")
        for k in inputs["parts"]:
            found = answer["values"][k]
            expect(type(found) in (int, float) and close(found, ADAMW_PARTS[k]),
                   f"{k}: expected {ADAMW_PARTS[k]} bytes per parameter, found {found!r}.", ADAMW_HINTS[k])
        return f"mixed-precision AdamW keeps {sum(answer['values'][k] for k in ADAMW_PARTS)} bytes per trained parameter"


def _meta_num_parameters(cfg) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit.models import building
    with building(), torch.device("meta"):  # the shapes, no memory
        return AutoModelForCausalLM.from_config(cfg).num_parameters()


def _diagnose(diff: int, cfg) -> str:
    """Name the likely missing piece from the size of the difference."""
    from lorakit import memory
    s = memory.sizes(cfg)
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


def _named(names, rng, n: int) -> list:
    """Published configs by name, then `n` made-up ones: [label, spec]."""
    return [[name, name] for name in names] + [[f"made-up {d['model_type']} #{i + 1}", d]
                                               for i, d in enumerate(random_config(rng) for _ in range(n))]


@judged_check
class count_parameters:
    """`count_parameters(cfg)`: parameters of a Llama-family model from its config alone."""
    answer = {"counts": [object]}
    reference = ("lorakit.memory.count_parameters",)

    def draw(rng):
        if rng.grading:
            configs = _named(rng.sample(HIDDEN_COUNT_CHECKS + COUNT_CHECKS, 4), rng, 4)
            # one made-up Qwen2 at least: its q/k/v biases must be counted
            configs.append(["made-up qwen2", dict(random_config(rng), model_type="qwen2")])
            # and always one whose head_dim is not hidden / heads (Llama allows it): a count must read head_dim
            odd = dict(random_config(rng), model_type="llama")
            odd["head_dim"] = rng.choice([d for d in (16, 32, 64, 128) if d * odd["num_attention_heads"] != odd["hidden_size"]])
            return {"configs": configs + [["made-up llama with its own head_dim", odd]]}
        return {"configs": _named(COUNT_CHECKS, rng, 0)}

    def probe(inputs, fn):
        expect_callable(fn, "count_parameters", "a function of a transformers config")
        return {"counts": [_number(fn(_config(spec))) for _, spec in inputs["configs"]]}

    def judge(inputs, answer):
        expect(len(answer["counts"]) == len(inputs["configs"]), "`count_parameters` should return one number per config.")
        rows = []
        for (name, spec), got in zip(inputs["configs"], answer["counts"]):
            cfg = _config(spec)
            truth = _meta_num_parameters(cfg)
            whole = type(got) is int or (type(got) is float and got.is_integer())
            expect(whole, f"{name}: expected a whole number of parameters, found {got!r}.")
            diff = truth - int(got)
            expect(int(got) == truth, f"{name}: model.num_parameters() on the meta device says {truth:,}; your count is "
                   f"{int(got):,} ({'missing' if diff > 0 else 'extra'} {abs(diff):,}).", f"check {_diagnose(diff, cfg)}.")
            rows.append(f"{name} {truth:,}")
        return "count_parameters equals model.num_parameters() for " + ", ".join(rows)


@judged_check
class lora_params:
    """`lora_params(d_in, d_out, r)`: trainable parameters of LoRA on one d_in -> d_out layer."""
    answer = {"counts": [object]}
    reference = ("lorakit.memory.lora_params",)

    def draw(rng):
        cases = [[5000, 4000, 8], [4096, 4096, 8], [10, 20, 1]]
        if rng.grading:
            cases = [cases[0]] + [[rng.integer(1, 20_000), rng.integer(1, 20_000), rng.choice([1, 2, 4, 8, 16, 64, 256])]
                                  for _ in range(5)]
        return {"cases": cases}

    def probe(inputs, fn):
        expect_callable(fn, "lora_params", "a function of (d_in, d_out, r)")
        return {"counts": [_number(fn(*case)) for case in inputs["cases"]]}

    def judge(inputs, answer):
        from lorakit import memory
        expect(len(answer["counts"]) == len(inputs["cases"]), "`lora_params` should return one number per call.")
        for i, ((d_in, d_out, r), got) in enumerate(zip(inputs["cases"], answer["counts"])):
            want = memory.lora_params(d_in, d_out, r)
            hint = ("A is r x d_in and B is d_out x r: r * (d_in + d_out)." if i == 0 else
                    "the count must use the arguments, not fixed numbers.")
            expect(type(got) in (int, float) and got == want,
                   f"a {d_in} x {d_out} layer with r={r}: expected {want:,} trainable parameters, found {got!r}.", hint)
        return (f"LoRA r=8 on a 5000 x 4000 layer trains 72,000 of 20,000,000 parameters "
                f"({1 - 72_000 / 20_000_000:.2%} fewer)")


@judged_check
class qlora_weights_gb:
    """`qlora_weights_gb(cfg)`: GB of a QLoRA model's weights (NF4 + double quantization, the rest bf16)."""
    answer = {"sizes": [object]}
    reference = ("lorakit.memory.qlora_weights_gb",)

    def draw(rng):
        if rng.grading:
            # published models of 0.5B and up: below that, rounding the constants up per tensor (which
            # bitsandbytes does and the per-parameter arithmetic leaves out) exceeds the tolerance
            return {"configs": _named(rng.sample(sorted(set(QLORA_CHECKS) - {"smollm2-135m"}), 4), rng, 0)}
        return {"configs": _named(("llama-2-7b", "qwen2.5-0.5b", "llama-2-70b"), rng, 0)}

    def probe(inputs, fn):
        expect_callable(fn, "qlora_weights_gb", "a function of a transformers config")
        return {"sizes": [_number(fn(_config(spec))) for _, spec in inputs["configs"]]}

    def judge(inputs, answer):
        from lorakit import memory
        expect(len(answer["sizes"]) == len(inputs["configs"]), "`qlora_weights_gb` should return one number per config.")
        shown = []
        for (name, spec), got in zip(inputs["configs"], answer["sizes"]):
            truth = memory.qlora_weights_gb(_config(spec))
            expect(type(got) in (int, float) and close(got, truth, rel=2e-3),
                   f"{name}: expected about {truth:.3f} GB of 4-bit weights with their constants, found {got!r}.",
                   "quantized linear layers at nf4_bits(True) / 8 bytes per parameter, everything else "
                   "(embeddings, norms, lm_head) at 2 bytes (bf16); divide bytes by 1e9.")
            if name in ("llama-2-7b", "llama-2-70b"):
                shown.append(f"{name} {got:.2f} GB")
        return "QLoRA weights: " + ", ".join(shown or [f"{n} {g:.2f} GB" for (n, _), g in zip(inputs["configs"], answer["sizes"])])
