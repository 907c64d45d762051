"""Checks for lesson 05 (QLoRA fine-tuning with transformers, peft and bitsandbytes).

Three kinds of helpers live here:

- *readiness checks* the lesson runs before it loads anything (`compute_dtype_for`, `require_four_bit`):
  bad input stops early with a message that says what to change;
- *judged checks* behind the graded test cells (`trainable_count`, `targets`, `masking`, `truncation`,
  `exact_match`, `before_eval`, `improvement`; see lorakit.checks.judged). `improvement` never trusts the
  notebook's scores: the probe sends the adapter, and the judge rebuilds the model (lorakit.checks.adapter) and
  evaluates it on questions it draws;
- the two proofs the lesson shows on the way (`adapters_get_gradients` after the evaluation before training,
  `same_outputs` after reloading the adapter).
"""

from __future__ import annotations

import torch

from lorakit.checks import CheckFailed, expect, passed
from lorakit.checks.adapter import adapter_as_data, rebuild
from lorakit.checks.judged import data_or_repr, judged_check
from lorakit.memory import CONFIGS, PREFERENCE
from lorakit.models import tiny_config

# What the fine-tuned model must gain over the base, in held-out exact match, for the graded test.
# Measured on who_found: 0% -> 100% with the CI parameters (40 steps, 50 held-out examples) and with
# the defaults (100 steps), so 0.6 leaves room for another CPU or seed and still catches a model that
# learned the format but not the task (a guess among the children gets about a third).
MIN_GAIN = 0.60


# --------------------------------------------------------------------------------------------------
# Readiness: stop early, say what to change
# --------------------------------------------------------------------------------------------------

def compute_dtype_for(name: str, device) -> torch.dtype:
    """The compute dtype for `COMPUTE_DTYPE` ("auto", "bfloat16", "float16", "float32") on `device`,
    refusing bf16 on a GPU without native bf16 (lorakit.env.check_dtype says what to use instead)."""
    from lorakit import env

    if name == "auto":
        return env.compute_dtype(device)
    allowed = ("bfloat16", "float16", "float32")
    if name not in allowed:
        raise ValueError(f"COMPUTE_DTYPE={name!r} is not one of 'auto', {', '.join(map(repr, allowed))}: "
                         f"change it in the parameters cell ('auto' picks the right one for this device)")
    return env.check_dtype(getattr(torch, name), device)


def require_four_bit(device) -> str:
    """Quantize and dequantize a small tensor with bitsandbytes on `device`; raise a RuntimeError that
    says what to change when 4-bit does not work here. Returns the detail line when it does."""
    from lorakit import env

    ok, detail = env.four_bit_works(device)
    if not ok:
        raise RuntimeError(
            f"4-bit quantization does not work on {device} here ({detail}). QLoRA needs bitsandbytes: "
            "install the kit's tested version (`pip install -e .` in the repository, or the Colab setup cell), "
            "or on an unsupported platform (e.g. Apple MPS) run this lesson with DEVICE='cpu'.")
    return detail


# --------------------------------------------------------------------------------------------------
# Exercise: predict the trainable count
# --------------------------------------------------------------------------------------------------

def _lora_count(config, r: int, target_modules) -> int:
    """lorakit.memory.lora_parameters, with no module chosen costing nothing."""
    from lorakit.memory import lora_parameters
    return lora_parameters(config, r, list(target_modules)) if target_modules else 0


def _architecture(name: str) -> dict:
    """A published architecture of `lorakit.memory.CONFIGS` as `LlamaConfig`'s keyword arguments (a dict: it
    travels as data)."""
    return {k: v for k, v in CONFIGS[name].items() if k != "model_type"}


LLAMA2_7B = _architecture("llama-2-7b")
SMOLLM2_135M = _architecture("smollm2-135m")


def _config(d: dict):
    from transformers import LlamaConfig
    return LlamaConfig(**d)


def _made_up(rng, own_head_dim: bool = False) -> dict:
    """A made-up Llama config (a dict); with `own_head_dim`, a head_dim that is not hidden / heads."""
    heads = rng.choice([4, 8, 12, 16, 32])
    head_dim = rng.choice([32, 64, 128])
    d = dict(hidden_size=heads * head_dim, intermediate_size=64 * rng.integer(4, 200),
             num_hidden_layers=rng.integer(1, 48), num_attention_heads=heads,
             num_key_value_heads=rng.choice([k for k in (1, 2, 4, 8, heads) if heads % k == 0]), vocab_size=32000)
    if own_head_dim:
        d["head_dim"] = rng.choice([h for h in (32, 64, 128) if h != head_dim])
    return d


def _call(fn, *args, what: str):
    try:
        return fn(*args)
    except NotImplementedError:
        raise CheckFailed(f"`{what}` still raises NotImplementedError.",) from None


@judged_check
class trainable_count:
    """`predict_trainable(config, r, target_modules)` against lorakit.memory.lora_parameters and peft's count,
    for the lesson's recipe and for all linear layers."""
    answer = {"counts": [object]}
    reference = ("lorakit.memory.lora_parameters",)

    def draw(rng):
        from lorakit.models import ALL_LINEAR
        if rng.grading:
            cases = [["Llama-2-7B", LLAMA2_7B, 8, ["q_proj", "v_proj"]], ["Llama-2-7B", LLAMA2_7B, 64, list(PREFERENCE)],
                     ["SmolLM2-135M", SMOLLM2_135M, 16, list(PREFERENCE)]]
            cases += [[f"made-up model #{i + 1}", _made_up(rng, own_head_dim=i == 0), rng.choice([1, 4, 8, 16, 64]),
                       rng.sample(PREFERENCE, rng.integer(1, 7))] for i in range(3)]
        else:
            tiny = tiny_config()
            cases = [["the embedded model", tiny, 16, list(ALL_LINEAR)], ["the embedded model", tiny, 16, ["q_proj", "v_proj"]],
                     ["Llama-2-7B", LLAMA2_7B, 8, ["q_proj", "v_proj"]]]
        return {"cases": cases}

    def probe(inputs, fn):
        expect(callable(fn), "`predict_trainable` should be a function of (config, r, target_modules).")
        out = []
        for _, cfg, r, targets in inputs["cases"]:
            got = _call(fn, _config(cfg), r, list(targets), what="predict_trainable")
            all_linear = _call(fn, _config(cfg), r, list(PREFERENCE), what="predict_trainable")
            out.append([data_or_repr(got), data_or_repr(all_linear)])
        return {"counts": out}

    def judge(inputs, answer):
        from lorakit.memory import lora_parameters
        expect(len(answer["counts"]) == len(inputs["cases"]), "`predict_trainable` should answer once per call.")
        for (name, d, r, targets), pair in zip(inputs["cases"], answer["counts"]):
            cfg = _config(d)
            got, all_linear = pair if isinstance(pair, list) and len(pair) == 2 else (pair, None)
            expected = lora_parameters(cfg, r, list(targets))
            expect(type(got) is int or (type(got) is float and got.is_integer()),
                   f"`predict_trainable` should return a whole number of parameters, found {got!r}.")
            per_layer = {m: lora_parameters(cfg, r, [m]) // cfg.num_hidden_layers for m in targets}
            expect(int(got) == expected,
                   f"{name}, r={r} on {targets}: expected {expected:,} trainable parameters, found {int(got):,}.",
                   f"each adapted layer adds A (r x in) and B (out x r), that is r * (in + out) parameters; per block "
                   f"that is {per_layer}; times {cfg.num_hidden_layers} blocks. k_proj and v_proj are smaller when the "
                   "model uses grouped-query attention (num_key_value_heads < num_attention_heads).")
            want_all = lora_parameters(cfg, r, PREFERENCE)
            expect(all_linear == want_all, f"{name}, r={r} on all seven projections: expected {want_all:,}, found {all_linear!r}.",
                   "gate_proj and up_proj map hidden -> intermediate, down_proj intermediate -> hidden.")
        name, _, r, targets = inputs["cases"][0]
        got, all_linear = answer["counts"][0]
        return (f"trainable parameters predicted: {int(got):,} (r={r} on {', '.join(targets)}), "
                f"{int(all_linear):,} on all linear layers")


# --------------------------------------------------------------------------------------------------
# Exercise: target modules for a budget
# --------------------------------------------------------------------------------------------------

@judged_check
class targets:
    """`targets_for_budget(config, r, budget)`: the longest prefix of PREFERENCE that fits."""
    answer = {"choices": [object]}
    reference = ("lorakit.memory.targets_for_budget",)

    def draw(rng):
        tiny = tiny_config()
        source_budget = _lora_count(_config(tiny), 8, ["q_proj", "v_proj"])
        if rng.grading:
            cases = [[LLAMA2_7B, r, b] for r, b in [(8, 4_194_304), (64, 4_194_304), (2, 10**9), (16, 50_000_000), (1, 10)]]
            cases += [[d, rng.choice([1, 2, 8, 32]), rng.integer(0, _lora_count(_config(d), 8, PREFERENCE))]
                      for d in (_made_up(rng) for _ in range(3))]
        else:
            cases = [[tiny, r, b] for r, b in [(8, source_budget), (2, source_budget), (1, source_budget), (4, 10**12), (8, 0)]]
        return {"cases": cases, "source_budget": source_budget}

    def probe(inputs, fn):
        expect(callable(fn), "`targets_for_budget` should be a function of (config, r, budget).")
        out = []
        for cfg, r, budget in inputs["cases"]:
            got = _call(fn, _config(cfg), r, budget, what="targets_for_budget")
            out.append(list(got) if isinstance(got, (list, tuple)) else data_or_repr(got))
        return {"choices": [data_or_repr(c) for c in out]}

    def judge(inputs, answer):
        from lorakit.memory import targets_for_budget
        expect(len(answer["choices"]) == len(inputs["cases"]), "`targets_for_budget` should answer once per call.")
        for (d, r, budget), got in zip(inputs["cases"], answer["choices"]):
            cfg = _config(d)
            expected = targets_for_budget(cfg, r, budget, PREFERENCE)
            expect(isinstance(got, list), f"`targets_for_budget` should return a list of module names, found {got!r}.")
            over = _lora_count(cfg, r, [m for m in got if m in PREFERENCE])
            expect(over <= budget or not got,
                   f"r={r}, budget {budget:,}: your choice {got} costs {over:,} trainable parameters, over the budget.",
                   "stop before the first module that would take the total over the budget.")
            expect(got == expected, f"r={r}, budget {budget:,}: expected {expected}, found {got}.",
                   "walk PREFERENCE in order and keep adding modules while the total still fits; return the list "
                   "(empty when not even the first fits).")
        budget, tiny = inputs["source_budget"], _config(tiny_config())
        return (f"targets for a budget of {budget:,} (what r=8 on q_proj, v_proj costs): "
                + "; ".join(f"r={r}: {len(targets_for_budget(tiny, r, budget, PREFERENCE))} kinds" for r in (8, 4, 2, 1)))


# --------------------------------------------------------------------------------------------------
# Exercise: tokenization with label masking
# --------------------------------------------------------------------------------------------------

def _tokenizer():
    """The embedded model's tokenizer: the one both sides of a check agree on (the exercise takes any)."""
    from lorakit.models import load_tokenizer
    return load_tokenizer()


def _reference(example, tokenizer, max_length, padding):
    """The exercise's answer: lorakit.data.tokenize_with_masking, on the embedded model's tokenizer (which adds
    no BOS token, so the exercise need not either)."""
    from lorakit.data import tokenize_with_masking
    return tokenize_with_masking(example, tokenizer, max_length, padding)


def _where(i, ref):
    if ref["attention_mask"][i] == 0:
        return "padding"
    return "prompt" if ref["labels"][i] == -100 else "answer/EOS"


def _compare(got, ref, label):
    expect(isinstance(got, dict), f"{label}: `tokenize_with_masking` should return a dict, found {got!r}.")
    for key in ("input_ids", "attention_mask", "labels"):
        expect(key in got, f"{label}: the result has no {key!r} (keys found: {sorted(got)}).",
               "return a dict with input_ids, attention_mask and labels.")
        g, e = got[key], list(ref[key])
        expect(isinstance(g, list), f"{label}: {key} should be a list of token ids, found {g!r}.")
        expect(len(g) == len(e), f"{label}: {key} has {len(g)} tokens, expected {len(e)}.",
               "with padding=True every sequence is padded to exactly max_length; with padding=False it is "
               "prompt + answer + EOS, nothing more.")
        if g != e:
            i = next(j for j, (a, b) in enumerate(zip(g, e)) if a != b)
            where = _where(i, ref)
            hint = {"labels": {"prompt": "labels must be -100 on every prompt token: the loss should not train the model to write the prompt.",
                               "padding": "padding positions get the label -100 too.",
                               "answer/EOS": "on the answer (and the EOS after it) the label is the token id itself; the model shifts labels internally."},
                    "attention_mask": {"padding": "the attention mask is 0 on padding, 1 on real tokens.",
                                       "prompt": "the attention mask is 1 on every real token.",
                                       "answer/EOS": "the attention mask is 1 on every real token."},
                    "input_ids": {"prompt": "input_ids is the prompt followed by the answer and EOS; a too-long example loses the start of its prompt, never the answer.",
                                  "padding": "pad with tokenizer.pad_token_id at the end (right padding).",
                                  "answer/EOS": "the answer ends with tokenizer.eos_token_id so that the model learns to stop."}}[key][where]
            raise CheckFailed(f"{label}: {key}[{i}] (a {where} position) is {g[i]}, expected {e[i]}.\nHint: {hint}")


def _examples(rng, n: int, split: str = "train") -> list[dict]:
    """Examples of the lesson's task: the shipped split's first ones, or new ones from the seed."""
    from lorakit import data
    if rng.grading:
        import random
        r = random.Random(rng.new_seed())
        return [data.make_example(r, "who_found") for _ in range(n)]
    return data.generate_task("who_found", {split: n})[split]


def _ids(v):
    """Token ids as a list of ints (from a list, a tuple or a tensor), else the value as data or its repr."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, (list, tuple)) and all(type(t) is int for t in v):
        return list(v)
    return data_or_repr(v)


def _tokenized(inputs, fn):
    tokenizer = _tokenizer()
    out = []
    for ex, max_length, padding in inputs["cases"]:
        got = _call(fn, dict(ex), tokenizer, max_length, padding, what="tokenize_with_masking")
        out.append({str(k): _ids(v) for k, v in got.items()} if isinstance(got, dict) else data_or_repr(got))
    return {"results": out}


def _judge_tokenized(inputs, answer):
    tokenizer = _tokenizer()
    expect(len(answer["results"]) == len(inputs["cases"]), "`tokenize_with_masking` should answer once per call.")
    for k, ((ex, max_length, padding), got) in enumerate(zip(inputs["cases"], answer["results"])):
        label = inputs["labels"][k]
        _compare(got, _reference(ex, tokenizer, max_length, padding), label)
    return tokenizer


@judged_check
class masking:
    """`tokenize_with_masking(example, tokenizer, max_length, padding)` against lorakit.data.tokenize_with_masking
    on a few examples, padded and unpadded; says what the loss sees."""
    answer = {"results": [object]}
    reference = ("lorakit.data.tokenize_with_masking",)

    def draw(rng):
        examples = _examples(rng, 5 if rng.grading else 3)
        max_length = 512 if rng.grading else 256
        cases = [[ex, max_length, padding] for ex in examples for padding in (True, False)]
        return {"cases": cases, "labels": [f"example {i // 2} (padding={c[2]})" for i, c in enumerate(cases)]}

    def probe(inputs, fn):
        expect(callable(fn), "`tokenize_with_masking` should be a function.")
        return _tokenized(inputs, fn)

    def judge(inputs, answer):
        tokenizer = _judge_tokenized(inputs, answer)
        got, ex = answer["results"][0], inputs["cases"][0][0]
        seen = [t for t in got["labels"] if t != -100]
        n_prompt = sum(1 for t, m in zip(got["labels"], got["attention_mask"]) if t == -100 and m == 1)
        n_pad = sum(1 for m in got["attention_mask"] if m == 0)
        return (f"masking: {n_prompt} prompt and {n_pad} padding tokens masked with -100; the loss sees only "
                f"{tokenizer.decode(seen)!r} (expected answer {ex['output']!r})")


@judged_check
class truncation:
    """A max_length too short for the example: the prompt loses its start, the answer stays whole."""
    answer = {"results": [object]}
    reference = ("lorakit.data.tokenize_with_masking",)

    def draw(rng):
        from lorakit.data import format_answer
        tokenizer = _tokenizer()
        cases, labels = [], []
        for ex in _examples(rng, 2 if rng.grading else 1):
            answer = len(tokenizer(format_answer(ex), add_special_tokens=False)["input_ids"]) + 1
            for extra in ((rng.integer(1, 4), rng.integer(5, 30)) if rng.grading else (3, 12)):
                for padding in (True, False):
                    cases.append([ex, answer + extra, padding])
                    labels.append(f"max_length={answer + extra} (padding={padding})")
        return {"cases": cases, "labels": labels}

    def probe(inputs, fn):
        expect(callable(fn), "`tokenize_with_masking` should be a function.")
        return _tokenized(inputs, fn)

    def judge(inputs, answer):
        _judge_tokenized(inputs, answer)
        return "truncation keeps the whole answer and cuts the start of the prompt"


# --------------------------------------------------------------------------------------------------
# Exercise: exact match, before and after
# --------------------------------------------------------------------------------------------------

_CASES = [
    (["Mia", "Tom"], ["Mia", "Tom"], 1.0),
    (["Mia", "Ben"], ["Mia", "Tom"], 0.5),
    ([" Mia ", "Tom\n"], ["Mia", "Tom"], 1.0),
    (["Mia found it", "Tom."], ["Mia", "Tom"], 0.0),
    (["mia", ""], ["Mia", "Tom"], 0.0),
    (["Anna", "Sam", "Max", "Zoe"], [" Anna", "Sam ", "Max", "Eli"], 0.75),
]


def _share(answers, outputs) -> float:
    """lorakit.data.exact_match_score of `answers` against bare `outputs`."""
    from lorakit.data import exact_match_score
    return exact_match_score(answers, [{"output": o} for o in outputs])


@judged_check
class exact_match:
    """`exact_match_score(answers, dataset)` on hand-made cases (and made-up ones when graded)."""
    answer = {"scores": [object]}
    reference = ("lorakit.data.exact_match_score",)

    def draw(rng):
        cases = [[a, o] for a, o, _ in _CASES]
        if rng.grading:
            from lorakit.data import NAMES
            for _ in range(6):
                outputs = [rng.choice(NAMES) for _ in range(rng.integer(1, 9))]
                answers = [rng.choice([o, f" {o} ", o.lower(), f"{o} found it", rng.choice(NAMES), f"{o}\n", ""])
                           for o in outputs]
                cases.append([answers, [rng.choice([o, f" {o}", f"{o} "]) for o in outputs]])
        return {"cases": cases}

    def probe(inputs, fn):
        expect(callable(fn), "`exact_match_score` should be a function of (answers, dataset).")
        return {"scores": [data_or_repr(_call(fn, list(answers), [{"instruction": "", "input": "", "output": o}
                                                                   for o in outputs], what="exact_match_score"))
                           for answers, outputs in inputs["cases"]]}

    def judge(inputs, answer):
        expect(len(answer["scores"]) == len(inputs["cases"]), "`exact_match_score` should answer once per call.")
        for (answers, outputs), got in zip(inputs["cases"], answer["scores"]):
            expected = _share(answers, outputs)
            expect(type(got) in (int, float) and abs(float(got) - expected) < 1e-9,
                   f"answers {answers} for expected outputs {outputs}: expected a score of {expected}, found {got!r}.",
                   "count an answer as right when it equals the example's output after .strip() on both (case "
                   "matters, and an answer that goes on after the right words is wrong); divide by the number of examples.")
        return "exact_match_score agrees on hand-made cases (stripped, case-sensitive, no extra words)"


@judged_check
class before_eval:
    """`before` is the share of the base model's answers that match the held-out outputs (the rule of
    lorakit.data.exact_match). Only a consistency check of the notebook's numbers: `improvement` measures
    the model itself."""
    answer = {"before": object, "answers": [object], "outputs": [str]}
    reported = {"before": "the notebook's own score of the base model", "answers": "the base model's answers, as the "
                "notebook generated them", "outputs": "the held-out examples' outputs, as the notebook holds them"}

    def draw(rng):
        return {}

    def probe(inputs, before, answers, dataset):
        return {"before": data_or_repr(before), "answers": [data_or_repr(a) for a in answers],
                "outputs": [str(ex["output"]) for ex in dataset]}

    def judge(inputs, a):
        before = a["before"]
        expect(type(before) in (int, float), f"`before` should be a number between 0 and 1, found {before!r}.",
               "finish exact_match_score above and run its cell again: it scores the base model.")
        expect(a["answers"] and all(type(x) is str for x in a["answers"]),
               "`before_answers` should be the base model's answers, as strings.")
        ref = _share(a["answers"], a["outputs"])
        expect(abs(before - ref) < 1e-9, f"`before` is {before}, but {ref:.3f} of the base model's answers match.",
               "compute before = exact_match_score(before_answers, eval_ds).")
        return f"before fine-tuning: exact match {before:.1%} on {len(a['answers'])} held-out examples"


# --------------------------------------------------------------------------------------------------
# Graded: the fine-tuned adapter, measured by the grader on questions it draws
# --------------------------------------------------------------------------------------------------

N_HELD_OUT = 64            # questions the judge asks the base model and the fine-tuned one
TASK = "who_found"         # the task the graded adapter is measured on (the lesson's default TASK)
@judged_check
class improvement:
    """The fine-tuned model beats its base by more than MIN_GAIN in exact match on held-out questions of the
    lesson's task that the grader draws, measured by the grader: the probe sends the adapter's tensors and
    settings, the judge loads the base model, puts the adapter on it (its size from the tensors' validated
    shapes) and asks both the questions. The visible call asks the same of questions drawn from seed 0."""
    answer = {"adapter": dict, "task": str, "before": object, "after": object}
    reported = {"task": "the TASK the notebook trained on: shown, the task measured is the drawn one",
                "before": "the notebook's own score of the base model: shown only",
                "after": "the notebook's own score after fine-tuning: shown only"}

    def draw(rng):
        return {"seed": rng.new_seed() if rng.grading else 0, "n": N_HELD_OUT, "task": TASK}

    def probe(inputs, model, task, before, after):
        expect(hasattr(model, "peft_config"), f"`model` should be the fine-tuned peft model, found {type(model).__name__}.")
        return {"adapter": adapter_as_data(model), "task": str(task), "before": data_or_repr(before), "after": data_or_repr(after)}

    def judge(inputs, a):
        from lorakit import data
        expect(type(a["before"]) in (int, float) and type(a["after"]) in (int, float),
               f"`before` and `after` should be your exact_match_score's scores of the model before and after "
               f"fine-tuning; found {a['before']!r} and {a['after']!r}.",
               "finish Exercise 4 (exact_match_score), then run its cell and the cells after it again.")
        task = inputs["task"]
        expect(a["task"] == task, f"your notebook trained on TASK={a['task']!r}; the graded adapter is measured on the "
               f"lesson's task, {task!r}.", f"set TASK = {task!r} in the parameters cell.")
        adapter = a["adapter"]
        expect(isinstance(adapter.get("tensors"), dict) and all(isinstance(t, torch.Tensor) for t in adapter["tensors"].values())
               and type(adapter.get("r")) is int and type(adapter.get("alpha")) in (int, float) and adapter["alpha"] > 0
               and type(adapter.get("use_rslora")) is bool and isinstance(adapter.get("quantization"), dict)
               and type(adapter.get("base")) is str, "the adapter could not be read (tensors, r, alpha, use_rslora, "
               "quantization, base).")
        questions = data.generate_task(task, {"test": inputs["n"]}, seed=inputs["seed"])["test"]
        model, tokenizer = rebuild(adapter, PREFERENCE)
        after = data.exact_match(model, tokenizer, questions, progress=False)
        with model.disable_adapter():
            before = data.exact_match(model, tokenizer, questions, progress=False)
        mine = ""
        if type(a["before"]) in (int, float) and type(a["after"]) in (int, float):
            mine = f"; your notebook measured {a['before']:.1%} -> {a['after']:.1%}"
        min_gain = MIN_GAIN
        expect(after - before > min_gain,
               f"on {len(questions)} held-out questions the grader drew, exact match went from {before:.1%} (base model) "
               f"to {after:.1%} (with your adapter): expected a gain of more than {min_gain:.0%}{mine}.",
               "train longer (MAX_STEPS), check the learning rate, and check that the adapters get gradients "
               "(the check after the evaluation before training).")
        return (f"fine-tuning gain: exact match {before:.1%} -> {after:.1%} (+{after - before:.1%}) on {len(questions)} "
                f"held-out questions{mine}")


# --------------------------------------------------------------------------------------------------
# Proofs on the way: gradients after evaluation, identical outputs after reloading
# --------------------------------------------------------------------------------------------------

def adapters_get_gradients(model, batch) -> None:
    """One forward and backward pass in train mode: every LoRA B matrix must receive a nonzero gradient.

    (B starts at zero, so A's gradient is zero on the first step; B's is not.) This is the proof that
    bitsandbytes' CPU inference repack (`Linear4bit.forward` in bitsandbytes 0.50) did not silently cut the adapters off during the
    evaluation before training. Gradients are cleared afterwards."""
    was_training = model.training
    model.train()
    device = next(p.device for p in model.parameters())
    try:
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        names = [n for n, p in model.named_parameters() if "lora_B" in n and p.requires_grad]
        expect(names, "the model has no trainable lora_B parameters.", "wrap it with peft's get_peft_model first.")
        dead = [n for n, p in model.named_parameters()
                if "lora_B" in n and p.requires_grad and (p.grad is None or p.grad.abs().sum().item() == 0)]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    expect(not dead, f"{len(dead)} of {len(names)} LoRA B matrices got no gradient (e.g. {dead[0] if dead else ''}).",
           "on a CPU, bitsandbytes repacks 4-bit weights for inference when a model runs in eval() under no_grad; "
           "after that adapters get no gradients. Call lorakit.models.disable_cpu_inference_repack(model) right "
           "after loading (or evaluate in train() mode).")
    passed(f"after the evaluation, all {len(names)} LoRA B matrices still get gradients (loss {loss.item():.3f})")


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    try:
        return model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    finally:
        model.train(was_training)


def same_outputs(model_a, model_b, batch, what: str = "the reloaded model") -> float:
    """`model_a` and `model_b` give identical logits on `batch` (eval mode); returns the max difference."""
    a, b = logits(model_a, batch), logits(model_b, batch)
    diff = (a - b).abs().max().item()
    expect(torch.equal(a, b), f"{what} differs from the trained model: largest logit difference {diff:.3g}.",
           "load the base exactly as for training (same BitsAndBytesConfig, same dtype, the same "
           "prepare_model_for_kbit_training) and compare both in eval() mode.")
    passed(f"{what} gives identical logits ({a.numel():,} values compared)")
    return diff
