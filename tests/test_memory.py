"""lorakit.memory: parameter counts equal transformers' on meta-device models, LoRA counts equal peft's,
memory estimates add up, and measure() counts what a loaded 4-bit model really holds."""

import logging

import numpy as np
import pytest
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from lorakit import footprint, memory  # noqa: E402
from lorakit.checks import CheckFailed  # noqa: E402
from lorakit.checks import memory as check  # noqa: E402


def meta_model(cfg):
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(memory.config(cfg))


TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)


# ---------------------------------------------------------------------------------------- counting

@pytest.mark.parametrize("name", list(memory.CONFIGS))
def test_count_parameters_equals_meta_model_and_published(name):
    model = meta_model(name)
    assert memory.count_parameters(memory.config(name)) == model.num_parameters() == memory.PUBLISHED[name]


@pytest.mark.parametrize("name", ["llama-2-7b", "qwen2.5-0.5b", "mistral-7b", "llama-3.2-1b"])
def test_modules_are_named_as_in_the_model(name):
    model = meta_model(name)
    mods = memory.modules(name)
    assert list(mods) == [n for n, _ in model.named_modules()]
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert mods[n] == ("linear", m.in_features, m.out_features, m.bias is not None), n


def test_facts():
    cfg = memory.config("llama-2-7b")
    assert memory.count_parameters(cfg) == 6_738_415_616
    assert memory.lora_parameters(cfg, 8, ["q_proj", "v_proj"]) == 4_194_304
    assert memory.bits_per_param("nf4") == 4.5
    assert memory.bits_per_param("nf4", double_quant=True) == 4 + 8 / 64 + 32 / (64 * 256)
    full = memory.estimate(cfg, "full", activations=False)
    assert full.total_bytes == 16 * 6_738_415_616 and round(full.gb) == 108


def test_the_source_lessons_4bit_printout_decoded():
    """Lesson 01: "all params: 3,752,071,168" is Mistral-7B counted packed (peft < 0.5) without adapters;
    Llama-2-7B with the r=8 q/v adapters would have printed 3,504,607,232; 0.1118% mixes the two."""
    assert memory.packed_parameter_count("mistral-7b") == 3_752_071_168
    assert memory.packed_parameter_count("llama-2-7b", 8, ["q_proj", "v_proj"]) == 3_504_607_232
    assert round(100 * memory.lora_parameters("llama-2-7b", 8, ["q_proj", "v_proj"]) / 3_752_071_168, 4) == 0.1118
    assert memory.lora_parameters("mistral-7b", 8, ["q_proj", "v_proj"]) == 3_407_872  # v_proj is 4096 x 1024
    assert memory.packed_parameter_count("llama-2-7b") + 4_194_304 == 3_504_607_232


def _lesson_01_text(starts: str) -> str:
    import nbformat

    from lorakit import course
    nb = nbformat.read(course.solution_path("01_memory"), as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "markdown" and c.source.startswith(starts))


def test_the_source_lessons_lora_column_and_70b_sentences_are_what_lesson_01_says():
    """Lesson 01 settles the rest of the source lesson's table and its three sentences about Llama-2-70B from the
    configs, with the QLoRA table's assumptions (r = 64 on all linear layers, batch 1 x 512 tokens): every number
    its text states is recomputed here."""
    setting = dict(target_modules="all-linear", batch_size=1, seq_len=512)
    for name, claim in {"llama-2-7b": 16, "llama-2-13b": 30, "llama-33b": 70, "llama-2-70b": 150}.items():
        total = memory.estimate(name, "lora", r=64, **setting).gb
        assert abs(claim - total) / total <= 0.05, name               # "each claim is within 5% of the estimate"
    assert "each claim is within 5% of the estimate" in _lesson_01_text("The LoRA column holds up")

    text = " ".join(_lesson_01_text("Two of the three claims are right").split())
    n = memory.count_parameters("llama-2-70b")
    assert f"{n * 2 / 1e9:.0f} GB of bf16 weights ({n * 2 / 2**30:.0f} GiB)" in text   # ~140 GB: right
    weights = memory.estimate("llama-2-70b", "qlora", activations=False)
    four_bit = (weights.parts["weights"] + weights.parts["quantization constants"]) / 1e9
    assert f"{four_bit:.1f} GB, {1 - four_bit / (n * 2 / 1e9):.1%} less" in text        # 75%, ~35 GB: close
    assert f"{4 + 8 / 64 + 32 / (64 * 256) - 4:.3f} bits" in text
    recipe = memory.estimate("llama-2-70b", "qlora", r=64, **setting)
    states = recipe.parts["optimizer states"] / 1e9
    assert f"about {recipe.gb:.1f} GB, {recipe.gb - 48:.1f} GB over" in text and recipe.gb > 48
    assert f"Adam states ({states:.1f} GB here)" in text and recipe.gb - states <= 48   # paged optimizers: fits
    eight_bit = memory.estimate("llama-2-70b", "qlora", r=64, optimizer="adamw_8bit", **setting).gb
    assert f"8-bit Adam states ({eight_bit:.1f} GB)" in text and eight_bit <= 48
    smaller = memory.estimate("llama-2-70b", "qlora", r=16, target_modules="all-linear", batch_size=1, seq_len=2048)
    assert f"2,048 tokens: {smaller.gb:.1f} GB)" in text and smaller.gb <= 48


def test_config_accepts_names_dicts_and_configs():
    cfg = memory.config("Mistral-7B")
    assert cfg.model_type == "mistral" and memory.config(cfg) is cfg
    assert memory.count_parameters(TINY) == memory.count_parameters(memory.config(TINY))


# ---------------------------------------------------------------------------------------------- LoRA

TARGETS = [["q_proj", "v_proj"], "all-linear", ["down_proj"], ["self_attn.o_proj", "gate_proj"],
           r".*\.mlp\.(up|down)_proj", ["embed_tokens", "lm_head"], None]


@pytest.mark.parametrize("name", ["llama-2-7b", "qwen2.5-0.5b", "mistral-7b"])
@pytest.mark.parametrize("targets", TARGETS, ids=str)
def test_lora_parameters_equal_peft(name, targets):
    from peft import LoraConfig, get_peft_model
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(meta_model(name), LoraConfig(r=16, target_modules=targets))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert memory.lora_parameters(name, 16, targets) == trainable


def test_all_linear_leaves_out_lm_head():
    cfg = memory.config(TINY)
    everything = memory.ATTENTION + memory.MLP + ("lm_head",)
    assert "lm_head" not in memory.lora_targets(cfg, "all-linear")
    assert memory.lora_parameters(cfg, 4, "all-linear") + 4 * (64 + 256) == memory.lora_parameters(cfg, 4, list(everything))


@pytest.mark.parametrize("r", [0, -8, 2.5, True, "8"])
def test_bad_rank_says_so(r):
    with pytest.raises(ValueError, match=r"LoRA rank\) must be a positive integer"):
        memory.lora_parameters("llama-2-7b", r, ["q_proj"])


def test_whole_numbers_may_be_numpy_integers():
    assert memory.lora_parameters("llama-2-7b", np.int64(8)) == memory.lora_parameters("llama-2-7b", 8) == 4_194_304
    a = memory.estimate("llama-2-7b", "qlora", r=np.int32(8), batch_size=np.int64(2), seq_len=np.int64(256),
                        world_size=np.int64(2), sharding="zero2")
    b = memory.estimate("llama-2-7b", "qlora", r=8, batch_size=2, seq_len=256, world_size=2, sharding="zero2")
    assert a.parts == b.parts
    assert memory.estimate(np.int64(7_000_000_000), "full", activations=False).total_bytes == 16 * 7_000_000_000


@pytest.mark.parametrize("kw, words", [
    (dict(batch_size=-1), r"batch_size is the number of sequences per device and must be a whole number >= 1; found -1"),
    (dict(batch_size=0), "batch_size"), (dict(batch_size=2.5), "batch_size.*found 2.5"),
    (dict(seq_len=-512), r"seq_len is the number of tokens per sequence.*found -512"), (dict(seq_len=True), "seq_len"),
])
def test_negative_or_broken_batch_and_sequence_sizes_are_refused(kw, words):
    with pytest.raises(ValueError, match=words):
        memory.estimate("llama-2-7b", "lora", **kw)
    with pytest.raises(ValueError, match=words):
        memory.activation_bytes("llama-2-7b", **kw)


def test_unknown_model_name_lists_the_known_configs():
    with pytest.raises(ValueError) as e:
        memory.estimate("llama-2-8b", "qlora")
    assert "'llama-2-8b' is not one of the configs" in str(e.value)
    assert all(name in str(e.value) for name in memory.CONFIGS)


def test_target_forms_match_as_in_lorakit_lora_and_peft():
    dotted = memory.lora_targets("llama-2-7b", ["self_attn.o_proj", "mlp.down_proj"])
    assert dotted == memory.lora_targets("llama-2-7b", ["o_proj", "down_proj"]) and len(dotted) == 64
    assert memory.lora_targets("llama-2-7b", r".*\.0\.self_attn\.q_proj") == ["model.layers.0.self_attn.q_proj"]
    with pytest.raises(ValueError, match="target_modules is empty"):
        memory.lora_parameters("llama-2-7b", 8, [])
    with pytest.raises(ValueError, match=r"\['attn.o_proj'\] not found"):
        memory.lora_targets("llama-2-7b", ["attn.o_proj"])


def test_unknown_target_module_names_the_real_ones():
    with pytest.raises(ValueError, match=r"\['query'\] not found.*q_proj"):
        memory.lora_parameters("llama-2-7b", 8, ["q_proj", "query"])
    with pytest.raises(ValueError, match="matches no module"):
        memory.lora_parameters("llama-2-7b", 8, r".*\.c_attn")
    with pytest.raises(ValueError, match="linear and embedding layers only"):
        memory.lora_parameters("llama-2-7b", 8, ["input_layernorm"])


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(ValueError, match="llama, mistral, qwen2"):
        memory.count_parameters(dict(model_type="gpt2", n_embd=64))
    from transformers import GPT2Config
    with pytest.raises(ValueError, match="llama, mistral, qwen2"):
        memory.lora_parameters(GPT2Config(), 8, ["c_attn"])


# ----------------------------------------------------------------------------------------- estimates

def test_estimate_parts_and_order():
    cfg = memory.config("llama-2-7b")
    est = {m: memory.estimate(cfg, m, r=64, target_modules="all-linear") for m in memory.METHODS}
    for e in est.values():
        assert e.total_bytes == sum(e.parts.values()) > 0
    assert est["qlora"].total_bytes < est["lora"].total_bytes < est["full"].total_bytes
    q = est["qlora"]
    n_lora = memory.lora_parameters(cfg, 64, "all-linear")
    assert q.trainable == n_lora and q.parts["optimizer states"] == 8 * n_lora
    nq = memory.quantized_parameters(cfg)
    # 4.127 bits per quantized parameter, within the few per-tensor code tables
    assert q.parts["quantization constants"] == pytest.approx(nq * (memory.bits_per_param("nf4", double_quant=True) - 4) / 8, rel=0.01)
    assert "activations" in q.parts and "activations" not in memory.estimate(cfg, "qlora", activations=False).parts
    longer = memory.estimate(cfg, "qlora", seq_len=2048).parts["activations"]
    assert longer > q.parts["activations"]


def test_estimate_bad_input():
    with pytest.raises(ValueError, match="full, lora, qlora"):
        memory.estimate("llama-2-7b", "dora")
    with pytest.raises(ValueError, match="rank"):
        memory.estimate("llama-2-7b", "lora", r=0)
    with pytest.raises(ValueError, match="not found"):
        memory.estimate("llama-2-7b", "qlora", target_modules=["attn"])


# ------------------------------------------------------------------------------------------ measuring

@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(memory.config(TINY), dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def _buffers(model):
    return sum(b.numel() * b.element_size() for b in model.buffers())


def test_measure_bf16_equals_footprint_and_estimate(saved_tiny):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(saved_tiny, dtype=torch.bfloat16)
    assert footprint.measure(model) == model.get_memory_footprint()
    assert footprint.measure(model) - _buffers(model) == memory.estimate(TINY, "lora", activations=False).weights_bytes


def test_measure_counts_4bit_quantization_constants(saved_tiny):
    import transformers
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(saved_tiny, quantization_config=bnb_config,
                                                              dtype=torch.bfloat16, device_map="cpu")
    constants = sum(t.numel() * t.element_size() for p in model.parameters() for t in footprint.quant_state_tensors(p))
    assert constants > 0
    assert footprint.measure(model) == model.get_memory_footprint() + constants
    est = memory.estimate(TINY, "qlora", activations=False)
    assert est.parts["quantization constants"] == constants
    assert footprint.measure(model) - _buffers(model) == est.weights_bytes


def test_measure_counts_tied_weights_once_and_works_on_meta():
    model = meta_model("qwen2.5-0.5b")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert footprint.measure(model, buffers=False) == 4 * memory.count_parameters("qwen2.5-0.5b")  # fp32 default


# -------------------------------------------------------------------------------------------- checks

def _reference_count(cfg):
    return memory.count_parameters(cfg)


def test_checks_pass_on_reference_answers(capsys):
    check.nf4_bits(lambda dq: memory.bits_per_param("nf4", double_quant=dq))
    check.adamw_bytes(dict(check.ADAMW_PARTS))
    check.count_parameters(_reference_count)
    check.lora_params(lambda d_in, d_out, r: r * (d_in + d_out))
    check.qlora_weights_gb(lambda cfg: memory.estimate(cfg, "qlora", activations=False).weights_bytes / 1e9)
    assert capsys.readouterr().out.count("\u2705") == 5


def test_checks_explain_wrong_answers():
    with pytest.raises(CheckFailed, match="4.127"):
        check.nf4_bits(lambda dq: 4.5)
    with pytest.raises(CheckFailed, match="master weights"):
        check.adamw_bytes({"weights": 2, "gradients": 2, "master weights": 2, "adam m": 4, "adam v": 4})

    def untied(cfg):  # forgets that tied embeddings share lm_head
        n = memory.count_parameters(cfg)
        return n + (cfg.vocab_size * cfg.hidden_size if cfg.tie_word_embeddings else 0)
    with pytest.raises(CheckFailed, match="lm_head"):
        check.count_parameters(untied)

    def no_gqa(cfg):  # k and v as wide as q
        s = memory.sizes(cfg)
        return memory.count_parameters(cfg) + s["layers"] * 2 * s["h"] * (s["q"] - s["kv"])
    with pytest.raises(CheckFailed, match="grouped-query"):
        check.count_parameters(no_gqa)
    with pytest.raises(CheckFailed, match="72,000"):
        check.lora_params(lambda d_in, d_out, r: d_in * r)
    with pytest.raises(CheckFailed, match="bf16"):
        check.qlora_weights_gb(lambda cfg: memory.count_parameters(cfg) * 0.5 / 1e9)


def test_memory_bars_draws_one_bar_per_estimate():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lorakit import viz
    cfg = memory.config("llama-2-7b")
    ax = viz.memory_bars({m: memory.estimate(cfg, m) for m in memory.METHODS})
    assert [t.get_text() for t in ax.get_yticklabels()] == list(memory.METHODS)
    plt.close(ax.figure)


@pytest.mark.parametrize("quantized", [False, True])
def test_measure_training_step_counts_each_part_and_leaves_the_model_as_it_was(saved_tiny, quantized):
    import transformers
    from peft import LoraConfig, get_peft_model

    kw = dict(quantization_config=transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16), device_map="cpu") if quantized else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(saved_tiny, dtype=torch.bfloat16, **kw)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.eval()
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    parts = footprint.measure_training_step(model, {"input_ids": ids, "labels": ids}, autocast_dtype=torch.bfloat16)
    assert list(parts) == list(memory.estimate(TINY, "qlora").parts)  # the estimate's parts, in its order
    assert parts["adapters"] == parts["gradients"] == 4 * trainable  # peft keeps adapters in fp32
    assert 8 * trainable <= parts["optimizer states"] <= 8 * trainable + 8 * 64  # AdamW's m and v (+ step counts)
    assert parts["weights"] + parts["quantization constants"] + parts["adapters"] == footprint.measure(model)
    assert (parts["quantization constants"] > 0) == quantized
    assert parts["activations"] >= 3 * 20 * 256 * 2  # at least the logits, kept for the loss's backward
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    frozen = memory.estimate(TINY, "qlora" if quantized else "lora", r=4, target_modules=["q_proj", "v_proj"])
    assert parts["gradients"] == frozen.parts["gradients"] and parts["adapters"] == frozen.parts["adapters"]


def test_measure_training_step_needs_something_to_train(saved_tiny):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(saved_tiny, dtype=torch.bfloat16).requires_grad_(False)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="no trainable parameters"):
        footprint.measure_training_step(model, {"input_ids": ids, "labels": ids})


def test_lesson_01_and_05_exercises_have_their_library_mirrors():
    """The functions lessons 01 and 05 have the learner write, with the same names, signatures and answers."""
    assert memory.lora_params(5000, 4000, 8) == 72_000
    with pytest.raises(ValueError):
        memory.lora_params(5000, 4000, 0)
    cfg = memory.config("llama-2-7b")
    assert memory.lora_parameters(cfg, 8, ["q_proj", "v_proj"]) == 32 * 2 * memory.lora_params(4096, 4096, 8)
    n, nq = memory.count_parameters(cfg), memory.quantized_parameters(cfg)
    assert memory.qlora_weights_gb(cfg) == pytest.approx((nq * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + (n - nq) * 2) / 1e9)
    # bitsandbytes rounds each tensor's constants up: the estimate is a few bytes per tensor above
    assert memory.qlora_weights_gb(cfg) == pytest.approx(memory.estimate(cfg, "qlora", activations=False).weights_bytes / 1e9,
                                                         rel=1e-4)
    budget = memory.lora_parameters(cfg, 8, ["q_proj", "v_proj"])
    assert memory.targets_for_budget(cfg, 8, budget) == ["q_proj", "v_proj"]
    chosen = memory.targets_for_budget(cfg, 2, budget)  # a quarter of the rank: more modules fit
    assert chosen == list(memory.PREFERENCE[:len(chosen)]) and len(chosen) > 2
    assert memory.lora_parameters(cfg, 2, list(memory.PREFERENCE[:len(chosen) + 1])) > budget
    assert memory.targets_for_budget(cfg, 8, 0) == []
    assert memory.targets_for_budget(cfg, 1, 10**12, ["o_proj", "q_proj"]) == ["o_proj", "q_proj"]
