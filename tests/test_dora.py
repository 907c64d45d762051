"""lorakit.dora: the DoRA layer equals peft's `use_dora=True` layer in outputs, gradients and merged weights."""

import copy
import warnings

import peft
import pytest
import torch
from torch import nn

from lorakit.dora import DoRALinear, inject_dora, weight_norm
from lorakit.lora import LoRALinear, lora_state_dict, trainable_parameters

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class One(nn.Module):
    def __init__(self, d_in, d_out, bias, dtype):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


def pair(d_in, d_out, r, alpha, bias=True, dtype=torch.float32, dropout=0.0, use_rslora=False, seed=0):
    """(our DoRALinear, peft's DoRA layer) over copies of one base layer, with the same non-zero A, B, m."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = One(d_in, d_out, bias, dtype)
    mine = DoRALinear(copy.deepcopy(base.proj), r, alpha, dropout, use_rslora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                                 target_modules=["proj"], use_dora=True,
                                                                 use_rslora=use_rslora))
    layer = theirs.base_model.model.proj
    # At initialisation the magnitudes must already agree (||W0|| per row).
    torch.testing.assert_close(mine.lora_magnitude_vector, layer.lora_magnitude_vector["default"].weight,
                               rtol=0, atol=0)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for ours, peft_param in [(mine.lora_A.weight, layer.lora_A["default"].weight),
                                 (mine.lora_B.weight, layer.lora_B["default"].weight),
                                 (mine.lora_magnitude_vector, layer.lora_magnitude_vector["default"].weight)]:
            if ours is mine.lora_magnitude_vector:
                value = ours * (1 + 0.2 * torch.randn(ours.shape, generator=g, dtype=ours.dtype))
            else:
                value = torch.randn(ours.shape, generator=g, dtype=ours.dtype) * 0.1
            ours.copy_(value)
            peft_param.copy_(value)
    return mine, layer, theirs


def our_name(peft_name: str) -> str:
    """peft's parameter name -> ours: no prefix, no adapter name, the magnitude without '.weight'."""
    name = peft_name.removeprefix("base_model.model.").replace(".default", "")
    return name.removesuffix(".weight") if "lora_magnitude_vector" in name else name


CASES = [  # d_in, d_out, r, alpha, bias, dtype, dropout, rslora
    (64, 48, 8, 16, True, torch.float32, 0.0, False),
    (192, 512, 4, 8, False, torch.float32, 0.0, False),
    (512, 192, 16, 32, True, torch.float32, 0.0, True),
    (128, 64, 16, 8, True, torch.bfloat16, 0.0, False),
    (96, 32, 8, 8, True, torch.float16, 0.0, False),
    (96, 40, 4, 8, True, torch.float64, 0.0, False),
    (64, 48, 8, 16, True, torch.float32, 0.3, False),
]


@pytest.mark.parametrize("d_in,d_out,r,alpha,bias,dtype,dropout,rslora", CASES)
def test_outputs_gradients_and_merge_equal_peft(d_in, d_out, r, alpha, bias, dtype, dropout, rslora):
    mine, layer, theirs = pair(d_in, d_out, r, alpha, bias, dtype, dropout, rslora)
    x = torch.randn(3, 5, d_in, dtype=dtype, generator=torch.Generator().manual_seed(7))
    mine.train(), theirs.train()
    torch.manual_seed(11)                      # the same dropout masks on both sides
    y_mine = mine(x)
    torch.manual_seed(11)
    y_peft = theirs(x)
    assert y_mine.dtype == y_peft.dtype == dtype
    torch.testing.assert_close(y_mine, y_peft)
    (y_mine.float() ** 2).sum().backward()
    (y_peft.float() ** 2).sum().backward()
    for ours, peft_param in [(mine.lora_A.weight, layer.lora_A["default"].weight),
                             (mine.lora_B.weight, layer.lora_B["default"].weight),
                             (mine.lora_magnitude_vector, layer.lora_magnitude_vector["default"].weight)]:
        assert ours.grad is not None and ours.grad.abs().sum() > 0
        torch.testing.assert_close(ours.grad, peft_param.grad)
    assert mine.base_layer.weight.grad is None
    # merged weights
    mine.eval(), theirs.eval()
    with torch.no_grad():
        unmerged = mine(x)
        mine.merge()
        layer.merge()
        torch.testing.assert_close(mine.base_layer.weight, layer.base_layer.weight)
        merged = mine(x)
    tol = {torch.float32: 2e-5, torch.float64: 1e-12}.get(dtype, 0.1)
    torch.testing.assert_close(merged, unmerged, rtol=tol, atol=tol)
    mine.unmerge()
    layer.unmerge()
    torch.testing.assert_close(mine.base_layer.weight, layer.base_layer.weight)


def test_the_norm_is_a_constant_in_backward():
    """DoRA section 4.3 (and peft): no gradient flows through ||W0 + s B A||. With the norm left in the graph,
    lora_A and lora_B would get different gradients; the magnitude's gradient would not change."""
    mine, _, _ = pair(32, 24, 4, 8)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    mine(x).square().sum().backward()
    detached = [p.grad.clone() for p in (mine.lora_A.weight, mine.lora_B.weight)]

    A, B, m, W, s = mine.lora_A.weight, mine.lora_B.weight, mine.lora_magnitude_vector, mine.base_layer.weight, mine.scaling
    A.grad = B.grad = None
    V = W + s * B @ A                                                    # norm kept in the graph
    y = (m / torch.linalg.norm(V, dim=1)) * (x @ V.T) + mine.base_layer.bias
    torch.testing.assert_close(y, mine(x), rtol=1e-6, atol=1e-6)         # the same forward...
    y.square().sum().backward()
    assert not torch.allclose(A.grad, detached[0])                       # ...but other gradients
    assert not torch.allclose(B.grad, detached[1])


def test_starts_equal_to_the_base_layer_and_counts_its_parameters():
    torch.manual_seed(0)
    base = nn.Linear(48, 24)
    layer = DoRALinear(base, r=4, alpha=8)
    x = torch.randn(5, 48)
    torch.testing.assert_close(layer(x), base(x))
    torch.testing.assert_close(layer.lora_magnitude_vector, torch.linalg.norm(base.weight, dim=1))
    assert trainable_parameters(layer) == 4 * (48 + 24) + 24
    assert weight_norm(base.weight, torch.zeros_like(base.weight)).requires_grad is False


def test_model_logits_gradients_and_state_dict_equal_peft():
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    mine = copy.deepcopy(base)
    n_mine = inject_dora(mine, ALL_LINEAR, r=4, alpha=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR,
                                                                 use_dora=True))
    assert n_mine == theirs.get_nb_trainable_parameters()[0]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in mine.modules():
            if isinstance(m, DoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
                m.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(m.lora_magnitude_vector.shape, generator=g))
    state = lora_state_dict(mine)
    assert sum(k.endswith("lora_magnitude_vector") for k in state) == 2 * len(ALL_LINEAR)
    result = set_peft_model_state_dict(theirs, {"base_model.model." + k: v for k, v in state.items()})
    assert not result.unexpected_keys
    ids = torch.randint(0, 128, (2, 12), generator=g)
    out_mine, out_peft = mine(ids, labels=ids), theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_mine.logits, out_peft.logits, rtol=1e-6, atol=1e-6)
    out_mine.loss.backward()
    out_peft.loss.backward()
    grads_peft = {our_name(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in mine.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads_peft[name], rtol=1e-5, atol=1e-7)


def test_merging_twice_warns():
    layer = DoRALinear(nn.Linear(8, 8), r=2, alpha=2)
    nn.init.normal_(layer.lora_B.weight)
    layer.merge()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("module,words", [
    (nn.Embedding(10, 8), ["nn.Linear", "Embedding", "use_dora=True"]),
    (nn.Conv1d(4, 4, 3), ["nn.Linear", "Conv1d", "target_modules"]),
    (LoRALinear(nn.Linear(4, 4)), ["already", "once"]),
])
def test_unsupported_layers_are_explained(module, words):
    with pytest.raises(TypeError) as e:
        DoRALinear(module)
    for w in words:
        assert w in str(e.value)


def test_inject_refuses_non_linear_targets_by_name():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=32))
    with pytest.raises(TypeError, match="DoRA adapts nn.Linear layers only"):
        inject_dora(model, ["embed_tokens"], r=2, alpha=2)
    with pytest.raises(ValueError, match="positive integer"):
        inject_dora(model, ["q_proj"], r=0, alpha=2)
