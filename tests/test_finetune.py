"""lorakit.checks.finetune (lesson 05): readiness errors say what to change, each self-check passes on a
right answer and fails with a learner-facing message on a wrong one, and the adapter-gradient check
catches bitsandbytes' CPU trap."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from lorakit import env, memory, models
from lorakit.checks import CheckFailed
from lorakit.checks import finetune as check
from lorakit.checks.adapter import rebuild

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152)


def llama(**kw):
    from transformers import LlamaConfig
    return LlamaConfig(**kw)


# ------------------------------------------------------------------------------------------ readiness

def test_compute_dtype_for_auto_and_explicit():
    assert check.compute_dtype_for("auto", "cpu") == env.compute_dtype("cpu")  # bf16 only with bf16 units
    assert check.compute_dtype_for("float32", "cpu") == torch.float32


def test_compute_dtype_for_rejects_unknown_names():
    with pytest.raises(ValueError, match="COMPUTE_DTYPE='fp8'.*'auto'"):
        check.compute_dtype_for("fp8", "cpu")


def test_bf16_on_a_gpu_without_it_says_what_to_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(ValueError, match="Tesla T4.*float16"):
        check.compute_dtype_for("bfloat16", "cuda")
    assert check.compute_dtype_for("auto", "cuda") == torch.float16


def test_require_four_bit(monkeypatch):
    assert "NF4" in check.require_four_bit("cpu")
    monkeypatch.setattr(env, "four_bit_works", lambda device: (False, "ModuleNotFoundError: bitsandbytes"))
    with pytest.raises(RuntimeError, match="pip install -e .*DEVICE='cpu'"):
        check.require_four_bit("cpu")


def test_unknown_model_id_stops_with_a_message():
    with pytest.raises(models.ModelNotFoundError, match="embedded model"):
        models.load_tokenizer("nobody/no-such-model-anywhere")


# ------------------------------------------------------------------------------- trainable count

def reference_predict(config, r, target_modules):
    return check._lora_count(config, r, target_modules)


def test_grouped_query_attention_shrinks_k_and_v():
    cfg = llama(**SMOLLM2)  # 9 heads of 64, 3 key/value heads: k_proj and v_proj map 576 -> 192
    assert check._lora_count(cfg, 8, ["q_proj", "v_proj"]) == 30 * 8 * ((576 + 576) + (576 + 192))
    assert check._lora_count(cfg, 8, []) == 0


def test_llama2_7b_counts_from_facts():
    cfg = memory.config("llama-2-7b")
    assert check._lora_count(cfg, 8, ["q_proj", "v_proj"]) == 4_194_304
    assert check._lora_count(cfg, 64, check.PREFERENCE) == 159_907_840


def test_trainable_count_check(capsys):
    check.trainable_count(reference_predict)
    check.trainable_count(reference_predict, seed="grading")  # Llama-2-7B, SmolLM2 (GQA), made-up shapes
    assert "✅" in capsys.readouterr().out

    def ignores_gqa(config, r, targets):  # treats k and v as hidden -> hidden
        s = memory.sizes(config)
        h, q, i = s["h"], s["q"], s["i"]
        width = {"q_proj": h + q, "k_proj": 2 * h, "v_proj": 2 * h, "o_proj": q + h, "gate_proj": h + i,
                 "up_proj": h + i, "down_proj": i + h}
        return config.num_hidden_layers * sum(r * width[m] for m in targets)
    check.trainable_count(ignores_gqa)  # the lesson's model has no grouped-query attention...
    with pytest.raises(CheckFailed, match=r"(?s)expected .* trainable parameters.*Hint"):
        check.trainable_count(ignores_gqa, seed="grading")  # ...SmolLM2 has

    def stub(config, r, targets):
        raise NotImplementedError()
    with pytest.raises(CheckFailed, match="NotImplementedError"):
        check.trainable_count(stub)


def test_targets_check():
    def right(config, r, budget):
        return memory.targets_for_budget(config, r, budget)
    check.targets(right)
    check.targets(right, seed="grading")
    with pytest.raises(CheckFailed, match="over the budget"):
        check.targets(lambda config, r, budget: list(check.PREFERENCE))
    with pytest.raises(CheckFailed, match="expected"):
        check.targets(lambda config, r, budget: ["q_proj"])


def test_targets_reference_is_the_longest_prefix_that_fits():
    cfg = memory.config("llama-2-7b")
    assert memory.targets_for_budget(cfg, 8, 4_194_304) == ["q_proj", "v_proj"]
    assert memory.targets_for_budget(cfg, 8, 4_194_303) == ["q_proj"]
    assert memory.targets_for_budget(cfg, 8, 0) == []
    assert memory.targets_for_budget(cfg, 1, 10**12) == list(memory.PREFERENCE)


# ------------------------------------------------------------------------------- masking, exact match

@pytest.fixture(scope="module")
def tokenizer_and_data():
    from lorakit import data
    assert models.TINY_PATH.is_dir(), (f"the embedded model ships with the kit, but {models.TINY_PATH} is missing: "
                                       "reinstall lorakit, or rebuild it with python -m lorakit.tooling.pretrain")
    return models.load_tokenizer(models.TINY), data.load_task("who_found")


def test_masking_reference_is_lorakit_data_on_a_tokenizer_without_bos(tokenizer_and_data):
    """The exercise builds prompt + answer + EOS with no BOS token; the judge's reference is
    lorakit.data.tokenize_with_masking, which adds a BOS only for tokenizers that ask for one. The judge's
    tokenizer (the embedded model's) does not, so the two are the same exercise."""
    from lorakit import data
    tok, ds = tokenizer_and_data
    judge_tok = check._tokenizer()
    assert not getattr(judge_tok, "add_bos_token", False)
    for ex in list(ds["train"])[:5]:
        prompt = judge_tok(data.format_prompt(ex), add_special_tokens=False)["input_ids"]
        answer = judge_tok(data.format_answer(ex), add_special_tokens=False)["input_ids"] + [judge_tok.eos_token_id]
        out = check._reference(ex, judge_tok, 256, False)
        assert out["input_ids"] == prompt + answer and out["labels"] == [-100] * len(prompt) + answer


def test_masking_check(tokenizer_and_data, capsys):
    from lorakit import data
    for seed in (0, "grading"):
        check.masking(data.tokenize_with_masking, seed=seed)
        check.truncation(data.tokenize_with_masking, seed=seed)
    assert "the loss sees only" in capsys.readouterr().out

    def no_masking(ex, tokenizer, max_length=256, padding=True):
        out = data.tokenize_with_masking(ex, tokenizer, max_length, padding)
        out["labels"] = [t if m else -100 for t, m in zip(out["input_ids"], out["attention_mask"])]
        return out
    with pytest.raises(CheckFailed, match=r"(?s)prompt position.*-100 on every prompt token"):
        check.masking(no_masking)

    def no_eos(ex, tokenizer, max_length=256, padding=True):
        out = data.tokenize_with_masking(ex, tokenizer, max_length, padding=False)
        out = {k: v[:-1] for k, v in out.items()}
        if padding:
            n = max_length - len(out["input_ids"])
            out = {"input_ids": out["input_ids"] + [tokenizer.pad_token_id] * n,
                   "attention_mask": out["attention_mask"] + [0] * n, "labels": out["labels"] + [-100] * n}
        return out
    with pytest.raises(CheckFailed):
        check.masking(no_eos)


def test_exact_match_checks():
    def right(answers, dataset):
        return sum(a.strip() == ex["output"].strip() for a, ex in zip(answers, dataset)) / len(answers)
    check.exact_match(right)
    check.exact_match(right, seed="grading")
    with pytest.raises(CheckFailed, match="expected a score"):
        check.exact_match(lambda answers, dataset: sum(ex["output"] in a for a, ex in zip(answers, dataset)) / len(answers))
    rows = [{"output": "Mia"}, {"output": "Tom"}]
    check.before_eval(0.5, ["Mia", "Ben"], rows)
    with pytest.raises(CheckFailed):
        check.before_eval(0.0, ["Mia", "Ben"], rows)


@pytest.mark.slow
def test_improvement_is_measured_by_the_judge_not_reported(small_llama_dir, monkeypatch):
    """An adapter that learned nothing (B = 0) fails however good the scores the notebook reports; the judge
    loads the base model, puts the adapter on it and asks its own questions."""
    from peft import LoraConfig, get_peft_model
    model, _ = models.load_base(models.TINY, quantization="nf4", device="cpu")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    monkeypatch.setattr(check, "N_HELD_OUT", 8)
    with pytest.raises(CheckFailed, match=r"(?s)exact match went from .* \(base model\) to .* \(with your adapter\).*"
                                          r"your notebook measured 0.0% -> 100.0%"):
        check.improvement(model, "who_found", 0.0, 1.0)
    with pytest.raises(CheckFailed, match=r"(?s)trained on TASK='who_knows'.*measured on the lesson's task, 'who_found'.*set TASK = 'who_found'"):
        check.improvement(model, "who_knows", 0.0, 1.0)
    with pytest.raises(CheckFailed, match="fine-tuned peft model"):
        check.improvement(object(), "who_found", 0.0, 1.0)
    # Exercise 4 still open: the lesson's cells leave before/after at None, and the test says what to finish
    with pytest.raises(CheckFailed, match=r"(?s)`before` and `after` should be your exact_match_score's scores.*"
                                          r"found None and None.*finish Exercise 4"):
        check.improvement(model, "who_found", None, None)
    with pytest.raises(CheckFailed, match="finish exact_match_score above"):
        check.before_eval(None, ["Mia"], [{"output": "Mia"}])


def test_improvement_refuses_a_base_it_may_not_load():
    adapter = {"tensors": {}, "r": 4, "alpha": 8, "use_rslora": False, "target_modules": ["q_proj"],
               "base": "/etc/somewhere", "quantization": {}}
    with pytest.raises(CheckFailed, match="grader evaluates adapters of the embedded model"):
        rebuild(adapter, check.PREFERENCE)


# ---------------------------------------------------------------- trap 1: gradients after evaluation

@pytest.fixture(scope="module")
def small_llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def four_bit_lora(path, disable_repack: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=models.quantization_config("nf4"),
                                                 dtype=torch.float32, device_map={"": "cpu"})
    if disable_repack:
        models.disable_cpu_inference_repack(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))


def batch(n=2, length=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def evaluate(model):
    model.eval()
    with torch.no_grad():
        model(input_ids=batch()["input_ids"])
    model.train()


def test_adapters_get_gradients_after_evaluation_when_repack_is_off(small_llama_dir, capsys):
    model = four_bit_lora(small_llama_dir, disable_repack=True)
    evaluate(model)
    check.adapters_get_gradients(model, batch())
    assert "still get gradients" in capsys.readouterr().out
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind


def test_adapters_check_catches_dead_adapters(small_llama_dir):
    model = four_bit_lora(small_llama_dir, disable_repack=True)
    for n, p in model.named_parameters():  # what trap 1 looks like from outside: B gets no gradient
        if "lora_B" in n:
            p.register_hook(lambda g: torch.zeros_like(g))
    with pytest.raises(CheckFailed, match=r"(?s)got no gradient.*disable_cpu_inference_repack"):
        check.adapters_get_gradients(model, batch())


def test_same_outputs(small_llama_dir):
    a = four_bit_lora(small_llama_dir, disable_repack=True)
    b = four_bit_lora(small_llama_dir, disable_repack=True)
    assert check.same_outputs(a, b, batch()) == 0.0
    with torch.no_grad():
        next(p for n, p in b.named_parameters() if "lora_B" in n).add_(0.1)
    with pytest.raises(CheckFailed, match="differs from the trained model"):
        check.same_outputs(a, b, batch())


@pytest.mark.hardware
@pytest.mark.skipif(not env.avx512_bf16(), reason="bitsandbytes' CPU repack (trap 1) needs AVX512-BF16")
def test_adapters_check_catches_the_real_trap(small_llama_dir):
    model = four_bit_lora(small_llama_dir, disable_repack=False)
    evaluate(model)  # eval() + no_grad: bitsandbytes repacks the 4-bit weights for inference
    with pytest.raises(CheckFailed, match="got no gradient"):
        check.adapters_get_gradients(model, batch())
