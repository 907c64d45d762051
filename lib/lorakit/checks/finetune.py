"""Self-checks for lesson 05 (QLoRA fine-tuning with transformers, peft and bitsandbytes).

Two kinds of helpers live here:

- *readiness checks* the lesson runs before it loads anything (`compute_dtype_for`, `require_four_bit`):
  bad input stops early with a message that says what to change;
- *self-checks* behind the graded test cells (`trainable_count`, `targets`, `masking`, `exact_match`,
  `before_eval`, `improvement`) and the two proofs the lesson shows on the way (`adapters_get_gradients`
  after the evaluation before training, `same_outputs` after reloading the adapter).
"""

from __future__ import annotations

import torch

from . import CheckFailed, expect, passed

# QLoRA's order of preference when a budget allows only some layers: attention first (the LoRA paper's
# q and v, then k and o), then the MLP. The exercise picks the longest prefix that fits.
PREFERENCE = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
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

def _shapes(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection of a Llama-style block."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv *= head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _lora_count(config, r: int, target_modules) -> int:
    shapes = _shapes(config)
    return config.num_hidden_layers * sum(r * sum(shapes[m]) for m in target_modules)


def _call(fn, *args, what: str):
    try:
        return fn(*args)
    except NotImplementedError:
        raise CheckFailed(f"`{what}` still raises NotImplementedError.",) from None


def trainable_count(predict_trainable, config, r: int, target_modules, peft_model=None) -> None:
    """The learner's `predict_trainable(config, r, target_modules)` against peft's count on the real
    model and lorakit.memory.lora_parameters, for the lesson's recipe and for all linear layers."""
    expect(callable(predict_trainable), "`predict_trainable` should be a function of (config, r, target_modules).")
    target_modules = list(target_modules)
    got = _call(predict_trainable, config, r, target_modules, what="predict_trainable")
    expected = _lora_count(config, r, target_modules)
    expect(isinstance(got, int) or (hasattr(got, "__int__") and float(got).is_integer()),
           f"`predict_trainable` should return a whole number of parameters, found {got!r}.")
    per_layer = {m: r * sum(_shapes(config)[m]) for m in target_modules}
    expect(int(got) == expected,
           f"r={r} on {target_modules}: expected {expected:,} trainable parameters, found {int(got):,}.",
           f"each adapted layer adds A (r x in) and B (out x r), that is r * (in + out) parameters; per block "
           f"that is {per_layer}, times {config.num_hidden_layers} blocks.")
    if peft_model is not None:
        counted = peft_model.get_nb_trainable_parameters()[0]
        expect(int(got) == counted, f"peft counts {counted:,} trainable parameters on the model, you predicted {int(got):,}.",
               "did the peft model get the same r and target_modules?")
    try:
        from lorakit.memory import lora_parameters
    except ImportError:  # the library reference is optional for this check
        lora_parameters = None
    if lora_parameters is not None:
        for targets in (target_modules, PREFERENCE):
            ref = int(lora_parameters(config, r, targets))
            mine = int(_call(predict_trainable, config, r, list(targets), what="predict_trainable"))
            expect(mine == ref, f"r={r} on {targets}: lorakit.memory.lora_parameters says {ref:,}, you say {mine:,}.",
                   "every projection has its own in and out sizes: k_proj and v_proj are smaller when the model "
                   "uses grouped-query attention (num_key_value_heads < num_attention_heads).")
    all_linear = int(_call(predict_trainable, config, r, PREFERENCE, what="predict_trainable"))
    expect(all_linear == _lora_count(config, r, PREFERENCE),
           f"r={r} on all seven projections: expected {_lora_count(config, r, PREFERENCE):,}, found {all_linear:,}.",
           "gate_proj and up_proj map hidden -> intermediate, down_proj intermediate -> hidden.")
    passed(f"trainable parameters predicted: {int(got):,} (r={r} on {', '.join(target_modules)}), "
           f"{all_linear:,} on all linear layers")


def llama2_7b_config():
    """Llama-2-7B's shapes (no download): 32 blocks, hidden 4096, intermediate 11008, 32 heads."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)


# --------------------------------------------------------------------------------------------------
# Exercise: target modules for a budget
# --------------------------------------------------------------------------------------------------

def _targets_for_budget(config, r, budget, preference=PREFERENCE):
    chosen = []
    for name in preference:
        if _lora_count(config, r, chosen + [name]) > budget:
            break
        chosen.append(name)
    return chosen


def targets(targets_for_budget, config, cases=None) -> None:
    """The learner's `targets_for_budget(config, r, budget)`: the longest prefix of PREFERENCE that fits."""
    expect(callable(targets_for_budget), "`targets_for_budget` should be a function of (config, r, budget).")
    source_budget = _lora_count(config, 8, ["q_proj", "v_proj"])
    cases = cases or [(8, source_budget), (2, source_budget), (1, source_budget), (4, 10**12), (8, 0)]
    for r, budget in cases:
        got = _call(targets_for_budget, config, r, budget, what="targets_for_budget")
        expected = _targets_for_budget(config, r, budget)
        expect(isinstance(got, (list, tuple)), f"`targets_for_budget` should return a list of module names, found {got!r}.")
        got = list(got)
        over = _lora_count(config, r, [m for m in got if m in PREFERENCE])
        expect(over <= budget or not got,
               f"r={r}, budget {budget:,}: your choice {got} costs {over:,} trainable parameters, over the budget.",
               "stop before the first module that would take the total over the budget.")
        expect(got == expected, f"r={r}, budget {budget:,}: expected {expected}, found {got}.",
               "walk PREFERENCE in order and keep adding modules while the total still fits; return the list "
               "(empty when not even the first fits).")
    passed(f"targets for a budget of {source_budget:,} (what r=8 on q_proj, v_proj costs): "
           + "; ".join(f"r={r}: {len(_targets_for_budget(config, r, source_budget))} kinds" for r in (8, 4, 2, 1)))


# --------------------------------------------------------------------------------------------------
# Exercise: tokenization with label masking
# --------------------------------------------------------------------------------------------------

def _reference(example, tokenizer, max_length, padding):
    """The exercise's answer: lorakit.data.tokenize_with_masking without the BOS token that the library
    adds for tokenizers that ask for one (the embedded model's and SmolLM2's do not; tests prove the two
    agree there)."""
    from lorakit.data import format_answer, format_prompt

    prompt_ids = tokenizer(format_prompt(example), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(format_answer(example), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - max(0, max_length - len(answer_ids))):]
    input_ids = prompt_ids + answer_ids
    labels = [-100] * len(prompt_ids) + answer_ids
    attention_mask = [1] * len(input_ids)
    if padding:
        n_pad = max_length - len(input_ids)
        input_ids += [tokenizer.pad_token_id] * n_pad
        labels += [-100] * n_pad
        attention_mask += [0] * n_pad
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _where(i, ref):
    if ref["attention_mask"][i] == 0:
        return "padding"
    return "prompt" if ref["labels"][i] == -100 else "answer/EOS"


def _compare(got, ref, label):
    for key in ("input_ids", "attention_mask", "labels"):
        expect(key in got, f"{label}: the result has no {key!r} (keys found: {sorted(got)}).",
               "return a dict with input_ids, attention_mask and labels.")
        g, e = list(got[key]), list(ref[key])
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


def masking(tokenize_with_masking, tokenizer, dataset, max_length: int = 256, n: int = 3) -> None:
    """The learner's `tokenize_with_masking(example, tokenizer, max_length, padding)` against
    lorakit.data.tokenize_with_masking on a few examples, padded and unpadded; prints what the loss sees."""
    expect(callable(tokenize_with_masking), "`tokenize_with_masking` should be a function.")
    for k in range(min(n, len(dataset))):
        ex = dataset[k]
        for padding in (True, False):
            got = _call(tokenize_with_masking, ex, tokenizer, max_length, padding, what="tokenize_with_masking")
            expect(isinstance(got, dict), f"`tokenize_with_masking` should return a dict, found {type(got).__name__}.")
            _compare(got, _reference(ex, tokenizer, max_length, padding), f"example {k} (padding={padding})")
    got = tokenize_with_masking(dataset[0], tokenizer, max_length, True)
    seen = [t for t in got["labels"] if t != -100]
    n_prompt = sum(1 for t, m in zip(got["labels"], got["attention_mask"]) if t == -100 and m == 1)
    n_pad = sum(1 for m in got["attention_mask"] if m == 0)
    passed(f"masking: {n_prompt} prompt and {n_pad} padding tokens masked with -100; the loss sees only "
           f"{tokenizer.decode(seen)!r} (expected answer {dataset[0]['output']!r})")


def truncation(tokenize_with_masking, tokenizer, dataset) -> None:
    """A max_length too short for the example: the prompt loses its start, the answer stays whole."""
    ex = dataset[0]
    answer = len(tokenizer(" " + ex["output"].strip(), add_special_tokens=False)["input_ids"]) + 1
    for max_length in (answer + 3, answer + 12):
        for padding in (True, False):
            got = _call(tokenize_with_masking, ex, tokenizer, max_length, padding, what="tokenize_with_masking")
            _compare(got, _reference(ex, tokenizer, max_length, padding), f"max_length={max_length} (padding={padding})")
    passed("truncation keeps the whole answer and cuts the start of the prompt")


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


def exact_match(exact_match_score) -> None:
    """The learner's `exact_match_score(answers, dataset)` on small hand-made cases."""
    expect(callable(exact_match_score), "`exact_match_score` should be a function of (answers, dataset).")
    for answers, outputs, expected in _CASES:
        rows = [{"instruction": "", "input": "", "output": o} for o in outputs]
        got = _call(exact_match_score, answers, rows, what="exact_match_score")
        expect(isinstance(got, (int, float)) and abs(float(got) - expected) < 1e-9,
               f"answers {answers} for expected outputs {outputs}: expected a score of {expected}, found {got!r}.",
               "count an answer as right when it equals the example's output after .strip() on both (case "
               "matters, and an answer that goes on after the right words is wrong); divide by the number of examples.")
    passed("exact_match_score agrees on hand-made cases (stripped, case-sensitive, no extra words)")


def before_eval(before, answers, dataset) -> None:
    """`before` is the share of `answers` that match the dataset (lorakit.data.exact_match's rule)."""
    expect(isinstance(before, (int, float)), f"`before` should be a number between 0 and 1, found {before!r}.")
    ref = sum(a.strip() == ex["output"].strip() for a, ex in zip(answers, dataset)) / len(answers)
    expect(abs(before - ref) < 1e-9, f"`before` is {before}, but {ref:.3f} of the base model's answers match.",
           "compute before = exact_match_score(before_answers, eval_ds).")
    passed(f"before fine-tuning: exact match {before:.1%} on {len(answers)} held-out examples")


def improvement(before, after, min_gain: float = 0.0) -> None:
    """The fine-tuned model beats the base on held-out exact match by at least `min_gain`."""
    for name, value in (("before", before), ("after", after)):
        expect(isinstance(value, (int, float)) and 0 <= value <= 1,
               f"`{name}` should be an exact-match share between 0 and 1, found {value!r}.")
    expect(after - before > min_gain,
           f"exact match went from {before:.1%} to {after:.1%}: expected a gain of more than {min_gain:.0%}.",
           "train longer (MAX_STEPS), check the learning rate, and check that the adapters get gradients "
           "(the check after the evaluation before training).")
    passed(f"fine-tuning gain: exact match {before:.1%} -> {after:.1%} (+{after - before:.1%})")


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
