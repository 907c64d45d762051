"""lorakit.models: the embedded model loads like a hub model, 4-bit loading on CPU, errors, and
bitsandbytes trap 1 (adapters must still get gradients after an evaluation)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from lorakit import env, models
from lorakit.models import ALL_LINEAR, PRESETS, TINY, ModelNotFoundError, load_base, resolve


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(TINY)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_resolve():
    assert resolve(TINY) == str(models.TINY_PATH)
    assert resolve("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_embedded_model_is_a_small_llama_in_hf_format(tiny):
    model, tokenizer = tiny
    folder = models.TINY_PATH
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "MODEL_CARD.md"):
        assert (folder / name).is_file(), f"{name} is missing from {folder}"
    assert sum(f.stat().st_size for f in folder.iterdir()) < 20e6
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 1e6 < model.num_parameters() < 10e6
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(ALL_LINEAR) <= names
    cfg = model.config
    # bitsandbytes' CPU 4-bit path needs these multiples of 64 (`_convert_weight_packed_for_cpu`)
    for size in (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim * cfg.num_key_value_heads):
        assert size % 64 == 0
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_tokenizer_round_trip(tiny):
    _, tokenizer = tiny
    for text in ["Mia found a red ball under a tree.", "Who found the key? It was Tom.\n\n### Response: Tom",
                 "Numbers 2024-05-17, 3.14 and 1000!", "  two spaces, a tab\tand é ünïcödé ✓"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    digits = tokenizer("12345", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in digits] == list("12345"), "digits are tokenized one by one"
    assert len(tokenizer) <= 4096 and tokenizer.eos_token and tokenizer.pad_token


def test_embedded_model_writes_stories(tiny):
    model, tokenizer = tiny
    enc = tokenizer("Mia and Tom went to the park.", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert " found " in text, f"a pretrained story model continues with a find, got {text!r}"


def test_load_base_plain():
    model, tokenizer = load_base(device="cpu")
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tokenizer.pad_token_id is not None


def test_load_base_nf4_gives_linear4bit_on_cpu():
    import bitsandbytes as bnb

    model, _ = load_base(quantization="nf4", device="cpu")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 7 * model.config.num_hidden_layers
    assert {n.rsplit(".", 1)[-1] for n in layers} == set(ALL_LINEAR)
    one = next(iter(layers.values()))
    assert one.weight.quant_state.quant_type == "nf4"
    assert one.weight.quant_state.nested, "double quantization is on"
    assert one.weight.dtype == torch.uint8
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit), "the output layer stays unquantized"
    assert not any(m.support_avx512bf16_for_cpu for m in layers.values()), "trap 1 protection is on"
    enc = _batch(model)
    assert torch.isfinite(model(**enc).logits).all()


def test_quantization_config_accepts_the_listed_values():
    from transformers import BitsAndBytesConfig

    assert models.quantization_config(None) is None
    assert models.quantization_config("fp4").bnb_4bit_quant_type == "fp4"
    assert models.quantization_config("int8").load_in_8bit
    mine = BitsAndBytesConfig(load_in_4bit=True)
    assert models.quantization_config(mine) is mine


def test_bad_quantization_names_the_accepted_ones():
    with pytest.raises(ValueError) as e:
        load_base(quantization="nf3")
    for accepted in ("'nf4'", "'fp4'", "'int8'", "BitsAndBytesConfig"):
        assert accepted in str(e.value)


def test_unknown_model_id_offline_is_explained(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as e:
        load_base("someone/no-such-model-xyz")
    msg = str(e.value)
    assert "locally or on the Hugging Face hub" in msg and TINY in msg


def test_presets_have_memory_needs():
    assert {"smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b"} <= set(PRESETS)
    from lorakit import memory
    for name in PRESETS:
        est = {m: memory.estimate(name, m, r=16, target_modules="all-linear").total_bytes for m in memory.METHODS}
        assert est["qlora"] < est["lora"] < est["full"]
    table = models.presets_table()
    assert "HuggingFaceTB/SmolLM2-135M" in table and "GB" in table


def _batch(model, n=4, length=24):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, model.config.vocab_size, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _qlora(support_repack: bool):
    """A 4-bit peft model, as lesson 05 builds it; `support_repack` restores bitsandbytes' default."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model, _ = load_base(quantization="nf4", device="cpu")
    if support_repack:
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = True
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, task_type="CAUSAL_LM"))


def _lora_b_grads_after_eval(model):
    batch = _batch(model)
    model.eval()
    with torch.no_grad():  # e.g. scoring the base model before training
        model(**batch)
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    # lora_B starts at zero, so at the first step only lora_B can have a gradient
    return [p.grad for n, p in model.named_parameters() if "lora_B" in n]


@pytest.mark.slow
def test_adapters_get_gradients_after_an_eval():
    grads = _lora_b_grads_after_eval(_qlora(support_repack=False))
    assert len(grads) == 7 * 4
    missing = sum(g is None or g.abs().sum() == 0 for g in grads)
    assert missing == 0, f"{missing} of {len(grads)} LoRA layers got no gradient after an evaluation"


@pytest.mark.hardware
def test_the_trap_is_real_without_the_protection():
    """Shows the test above can fail: with bitsandbytes' default, the eval repack kills the gradients."""
    if not env.avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes never repacks")
    grads = _lora_b_grads_after_eval(_qlora(support_repack=True))
    assert any(g is None or g.abs().sum() == 0 for g in grads)


# ------------------------------------------------------------------------------------- small seeded Llamas

def test_tiny_config_is_the_embedded_models_architecture():
    import json

    on_disk = json.loads((models.TINY_PATH / "config.json").read_text())
    cfg = models.tiny_config()
    assert cfg and all(cfg[k] == on_disk[k] for k in cfg)
    assert {"hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "head_dim"} <= set(cfg)
    smaller = models.tiny_config(num_hidden_layers=2, vocab_size=256)
    assert (smaller["num_hidden_layers"], smaller["vocab_size"], smaller["hidden_size"]) == (2, 256, cfg["hidden_size"])


def test_seeded_llama_depends_on_its_seed_only_and_leaves_the_global_generator_alone():
    """Fair grades (#23): the same seed gives the same weights whatever the global generator holds, and building
    one draws nothing from it (a notebook's random numbers are the same with or without a check)."""
    cfg = models.tiny_config(num_hidden_layers=1, vocab_size=64)
    torch.manual_seed(1)
    a = models.seeded_llama(cfg, seed=5)
    after_a = torch.rand(3)
    torch.manual_seed(2)
    b = models.seeded_llama(cfg, seed=5)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_a)
    assert not a.training and all(p.dtype == torch.float32 for p in a.parameters())
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    c = models.seeded_llama(cfg, seed=6)
    assert not torch.equal(a.model.layers[0].self_attn.q_proj.weight, c.model.layers[0].self_attn.q_proj.weight)
