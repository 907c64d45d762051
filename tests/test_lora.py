"""lorakit.lora: the LoRA layer, injection by name, merging, and numerical equality with peft."""

import copy
import math
import re
import warnings

import numpy as np
import peft
import pytest
import torch
from torch import nn

from lorakit import lora, memory
from lorakit.lora import LoRALinear, inject_lora, lora_state_dict, merge_lora

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=64)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def peft_model(base, **kw):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(base, LoraConfig(**kw))


def randomize_b(model, std=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def load_into_peft(mine, theirs):
    from peft import set_peft_model_state_dict

    res = set_peft_model_state_dict(theirs, {"base_model.model." + k: v for k, v in lora_state_dict(mine).items()})
    assert not res.unexpected_keys


# ------------------------------------------------------------------------------------------ the layer

def test_shapes_init_and_scaling_follow_peft():
    torch.manual_seed(0)
    base = nn.Linear(256, 96)
    layer = LoRALinear(base, r=8, alpha=16)
    assert layer.base_layer is base
    assert layer.lora_A.weight.shape == (8, 256) and layer.lora_B.weight.shape == (96, 8)
    assert layer.lora_A.bias is None and layer.lora_B.bias is None
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt 5) on fan_in 256
    assert layer.lora_A.weight.abs().max() <= bound
    assert layer.lora_A.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert layer.scaling == 2.0
    assert LoRALinear(nn.Linear(4, 4), r=16, alpha=8, use_rslora=True).scaling == pytest.approx(2.0)
    assert not layer.merged


def test_init_equals_base_and_forward_is_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    layer = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(3, 5, 32)
    assert torch.equal(layer(x), base(x))
    nn.init.normal_(layer.lora_B.weight)
    expected = base(x) + x @ layer.lora_A.weight.T @ layer.lora_B.weight.T * 2.0
    torch.testing.assert_close(layer(x), expected)


def test_only_the_adapters_get_gradients():
    layer = LoRALinear(nn.Linear(16, 16), r=2, alpha=2)
    layer(torch.randn(4, 16)).sum().backward()
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert layer.lora_B.weight.grad is not None


def test_dropout_is_on_the_adapter_input_only():
    torch.manual_seed(0)
    base = nn.Linear(32, 32)
    layer = LoRALinear(base, r=4, alpha=4, dropout=0.5).train()
    x = torch.randn(8, 32)
    assert torch.equal(layer(x), base(x))  # B = 0: dropout cannot touch the frozen path
    nn.init.normal_(layer.lora_B.weight)
    y_train = layer(x)
    layer.eval()
    assert not torch.allclose(y_train, layer(x))
    assert isinstance(LoRALinear(nn.Linear(4, 4), r=1, alpha=1).lora_dropout, nn.Identity)


def test_merge_and_unmerge_are_inverses_and_keep_outputs():
    torch.manual_seed(0)
    base = nn.Linear(48, 40)
    layer = LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x, w0 = torch.randn(6, 48), base.weight.detach().clone()
    y0 = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(base.weight, w0 + layer.delta_weight())
    torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), base(x))  # merged: the base layer alone
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-5)


def test_merging_twice_warns_and_does_not_double_apply():
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=2)
    nn.init.normal_(layer.lora_B.weight)
    layer.merge()
    w = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w)
    layer.unmerge()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_adapters_stay_fp32_beside_a_bf16_base():
    layer = LoRALinear(nn.Linear(16, 8).to(torch.bfloat16), r=2, alpha=2)
    assert layer.lora_A.weight.dtype == torch.float32
    y = layer(torch.randn(3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("kw, words", [
    (dict(r=0), "r=0"), (dict(r=-4), "r=-4"), (dict(r=2.5), "positive integer"), (dict(r=True), "positive integer"),
    (dict(alpha=0), "alpha=0"), (dict(alpha=-1.0), "positive number"),
    (dict(dropout=1.0), r"\[0, 1\)"), (dict(dropout=-0.1), "dropout=-0.1"),
])
def test_bad_hyperparameters_are_explained(kw, words):
    args = dict(r=4, alpha=8, dropout=0.0) | kw
    with pytest.raises(ValueError, match=words):
        LoRALinear(nn.Linear(4, 4), **args)


@pytest.mark.parametrize("module", [nn.Conv1d(4, 4, 1), nn.Embedding(10, 4), nn.LayerNorm(4)])
def test_wrapping_something_that_is_not_a_linear_is_explained(module):
    with pytest.raises(TypeError, match=f"nn.Linear.*{type(module).__name__}"):
        LoRALinear(module, r=2, alpha=2)


def test_wrapping_twice_is_explained():
    with pytest.raises(TypeError, match="already"):
        LoRALinear(LoRALinear(nn.Linear(4, 4), r=2, alpha=2), r=2, alpha=2)


# --------------------------------------------------------------------------------------- injection

@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ALL_LINEAR, ["self_attn.o_proj"], ["down_proj"]])
def test_inject_counts_and_placement_equal_peft_and_memory(targets):
    mine, theirs = tiny_llama(), peft_model(tiny_llama(), r=8, lora_alpha=16, target_modules=targets)
    n = inject_lora(mine, targets, r=8, alpha=16)
    assert n == theirs.get_nb_trainable_parameters()[0]
    assert n == memory.lora_parameters(mine.config, 8, targets)
    assert n == lora.trainable_parameters(mine)
    wrapped = {name for name, m in mine.named_modules() if isinstance(m, LoRALinear)}
    peft_wrapped = {name.removeprefix("base_model.model.") for name, m in theirs.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == peft_wrapped
    assert all(".lora_A." in k or ".lora_B." in k for k, p in mine.named_parameters() if p.requires_grad)


def test_regex_target_matches_like_peft():
    pattern = r".*layers\.1\.self_attn\.(q|v)_proj"
    mine, theirs = tiny_llama(), peft_model(tiny_llama(), r=4, lora_alpha=4, target_modules=pattern)
    assert inject_lora(mine, pattern, r=4, alpha=4) == theirs.get_nb_trainable_parameters()[0]
    assert sorted(n for n, m in mine.named_modules() if isinstance(m, LoRALinear)) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_inject_keeps_the_output_at_init():
    model, ids = tiny_llama(), torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        before = model(ids).logits
        inject_lora(model, ALL_LINEAR, r=4, alpha=8)
        assert torch.equal(model(ids).logits, before)


def test_numpy_integers_are_ranks():
    layer = LoRALinear(nn.Linear(16, 8), r=np.int64(4), alpha=np.float32(8.0), dropout=np.float64(0.0))
    assert type(layer.r) is int and layer.r == 4 and layer.lora_A.weight.shape == (4, 16) and layer.scaling == 2.0
    with pytest.raises(ValueError, match="r=0"):
        LoRALinear(nn.Linear(16, 8), r=np.int64(0))


def test_inject_errors_are_explained():
    with pytest.raises(ValueError, match=r"matched no module.*'q_proj'"):
        inject_lora(tiny_llama(), ["qproj"], r=4, alpha=4)
    with pytest.raises(ValueError, match="target_modules is empty"):
        inject_lora(tiny_llama(), [], r=4, alpha=4)
    with pytest.raises(TypeError, match="list of module names"):
        inject_lora(tiny_llama(), None, r=4, alpha=4)
    with pytest.raises(TypeError, match="'model.embed_tokens' is Embedding"):
        inject_lora(tiny_llama(), ["embed_tokens"], r=4, alpha=4)
    with pytest.raises(ValueError, match="r=0"):
        inject_lora(tiny_llama(), ["q_proj"], r=0, alpha=4)
    model = tiny_llama()
    inject_lora(model, ["q_proj"], r=4, alpha=4)
    with pytest.raises(TypeError, match="already a LoRALinear"):
        inject_lora(model, ["q_proj"], r=4, alpha=4)


# ---------------------------------------------------------------------------------- equal to peft

@pytest.mark.parametrize("use_rslora", [False, True])
def test_logits_and_gradients_equal_peft(use_rslora):
    mine = tiny_llama()
    theirs = peft_model(tiny_llama(), r=8, lora_alpha=16, target_modules=ALL_LINEAR, use_rslora=use_rslora,
                        lora_dropout=0.0)
    inject_lora(mine, ALL_LINEAR, r=8, alpha=16, use_rslora=use_rslora)
    randomize_b(mine)
    load_into_peft(mine, theirs)
    ids = torch.randint(0, 128, (2, 12))
    a, b = mine(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)
    a.loss.backward(), b.loss.backward()
    grads = {k: p.grad for k, p in mine.named_parameters() if p.requires_grad}
    peft_grads = {k.removeprefix("base_model.model.").replace(".default", ""): p.grad
                  for k, p in theirs.named_parameters() if p.requires_grad}
    assert grads.keys() == peft_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], peft_grads[k], rtol=1e-5, atol=1e-7)


def test_lora_state_dict_holds_only_adapters():
    model = tiny_llama()
    inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=4)
    sd = lora_state_dict(model)
    assert len(sd) == 2 * 2 * 2  # layers x targets x (A, B)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
    assert sum(v.numel() for v in sd.values()) == lora.trainable_parameters(model)


def test_merge_lora_restores_plain_linears_and_equals_peft_merge_and_unload():
    mine = tiny_llama()
    theirs = peft_model(tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    inject_lora(mine, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    randomize_b(mine)
    load_into_peft(mine, theirs)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        before = mine(ids).logits
        merged = merge_lora(mine)
        assert merged is mine
        assert not any(isinstance(m, LoRALinear) for m in mine.modules())
        assert type(mine.model.layers[0].self_attn.q_proj) is nn.Linear
        torch.testing.assert_close(mine(ids).logits, before, rtol=1e-5, atol=1e-5)
        reference = theirs.merge_and_unload()
    for (k, v), (k2, v2) in zip(mine.state_dict().items(), reference.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v, v2, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="no LoRALinear"):
        merge_lora(mine)


def test_merge_lora_keeps_an_already_merged_layer_once():
    model = tiny_llama()
    inject_lora(model, ["q_proj"], r=2, alpha=2)
    randomize_b(model)
    copy_ = copy.deepcopy(model)
    model.model.layers[0].self_attn.q_proj.merge()
    merge_lora(model), merge_lora(copy_)
    for a, b in zip(model.parameters(), copy_.parameters()):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------- combining adapters

def two_adapter_model(r0=4, r1=8, targets1=("q_proj", "v_proj")):
    """A peft model with adapters "a" (rank r0, alpha 8) and "b" (rank r1, alpha 2 r1), B non-zero."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(), LoraConfig(r=r0, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                               adapter_name="a")
        model.add_adapter("b", LoraConfig(r=r1, lora_alpha=2 * r1, target_modules=list(targets1)))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def adapter_state(model, name):
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=name)


def test_concat_adapters_equals_peft_add_weighted_adapter_cat():
    model = two_adapter_model()
    weights = [0.7, 1.3]
    model.add_weighted_adapter(["a", "b"], weights, "ab", combination_type="cat")
    scalings = [8 / 4, 16 / 8]
    mine = lora.concat_adapters([adapter_state(model, "a"), adapter_state(model, "b")], scalings, weights)
    theirs = adapter_state(model, "ab")
    assert sorted(mine) == sorted(theirs)
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=0)
    assert model.peft_config["ab"].r == 12 and model.peft_config["ab"].lora_alpha == 12  # scaling 1
    # and the combination is the weighted sum of the two updates, exactly what cat promises
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = sum(w * layer.get_delta_weight(a) for w, a in zip(weights, ["a", "b"]))
    torch.testing.assert_close(layer.get_delta_weight("ab"), expected)


def test_concat_lora_bad_input_is_explained():
    A, B = torch.zeros(4, 16), torch.zeros(8, 4)
    with pytest.raises(ValueError, match="one lora_A, lora_B, scaling and weight per adapter"):
        lora.concat_lora([A, A], [B, B], [1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"adapter 1: lora_A \(4, 16\) and lora_B \(8, 2\) do not fit"):
        lora.concat_lora([A, A], [B, torch.zeros(8, 2)], [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="adapter 1 adapts a 32 -> 8 layer but adapter 0 a 16 -> 8 layer"):
        lora.concat_lora([A, torch.zeros(4, 32)], [B, B], [1.0, 1.0], [1.0, 1.0])


def test_concat_adapters_with_other_targets_is_explained():
    model = two_adapter_model(targets1=("q_proj", "k_proj"))
    with pytest.raises(ValueError) as e:
        lora.concat_adapters([adapter_state(model, "a"), adapter_state(model, "b")], [2.0, 2.0], [1.0, 1.0])
    for words in ["other modules", "v_proj", "k_proj", "same target_modules", "add_weighted_adapter"]:
        assert words in str(e.value)


def test_break_even_rank_is_where_a_and_b_stop_holding_fewer_numbers_than_w():
    """Lesson 02's first exercise builds on lesson 01's count r * (d_in + d_out): the largest r below d_in * d_out."""
    for d_in, d_out in [(4000, 5000), (4096, 4096), (4096, 11008), (192, 512), (1, 3), (2, 2)]:
        r = lora.break_even_rank(d_in, d_out)
        assert r * (d_in + d_out) < d_in * d_out or r == 0
        assert (r + 1) * (d_in + d_out) >= d_in * d_out
    assert lora.break_even_rank(4000, 5000) == 2222 and lora.break_even_rank(4096, 4096) == 2047
    layer = LoRALinear(nn.Linear(4000, 5000, bias=False, device="meta"), 2222, 2222)   # counted on a real layer
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) < 4000 * 5000


def test_break_even_rank_check_passes_the_reference_and_names_the_mistakes():
    from lorakit.checks import CheckFailed
    from lorakit.checks import lora as check

    for seed in (0, 1, "grading"):
        check.break_even_rank(lora.break_even_rank, seed=seed)
    mistakes = {"as many numbers as W": lambda d_in, d_out: d_in * d_out // (d_in + d_out),   # ties allowed
                "whole number": lambda d_in, d_out: d_in * d_out / (d_in + d_out),
                "r * (d_in + d_out) < d_in * d_out": lambda d_in, d_out: min(d_in, d_out)}
    for words, wrong in mistakes.items():
        with pytest.raises(CheckFailed, match=re.escape(words)):
            check.break_even_rank(wrong, seed="grading" if words == "as many numbers as W" else 0)

    def stub(d_in, d_out):
        raise NotImplementedError()
    with pytest.raises(CheckFailed, match="NotImplementedError"):
        check.break_even_rank(stub)
