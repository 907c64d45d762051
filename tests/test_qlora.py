"""lorakit.qlora, the reference of lesson 04: equal to bitsandbytes Linear4bit + peft, byte for byte and
output for output; the recomputing matmul keeps no 16-bit weight; only adapters train; bad input and
merge() explain themselves. And the lesson's checks reject the mistakes they are written for."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit import memory, nf4, qlora
from lorakit.checks import CheckFailed
from lorakit.checks import qlora as check
from lorakit.lora import LoRALinear, lora_state_dict
from lorakit.models import seeded_llama

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as BF  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(hidden=128, intermediate=256):
    """A random Llama (weights from seed 0) whose every size is a multiple of 64, as bitsandbytes' CPU kernels want."""
    return seeded_llama(dict(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                             tie_word_embeddings=False))


def _linear(d_in=192, d_out=128, bias=False, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias)


def _pair(d_in=192, d_out=128, bias=False, r=8, alpha=16):
    """Our layer and bitsandbytes Linear4bit + peft from the same 16-bit weights, same adapters (B != 0)."""
    lin = _linear(d_in, d_out, bias)
    ours = qlora.QLoRALinear.from_linear(lin, r, alpha)
    with torch.no_grad():
        ours.lora_B.weight.normal_(0, 0.05)
    twin = qlora.bitsandbytes_lora(lin, r, alpha)
    qlora.copy_adapters(ours, twin)
    return lin, ours, twin


# ------------------------------------------------------------------------------- equality with the libraries

@pytest.mark.parametrize("shape", [(192, 128), (512, 192), (128, 320)])
def test_packed_bytes_equal_bitsandbytes(shape):
    lin = _linear(*shape)
    layer = qlora.NF4Linear(lin)
    expected, state = BF.quantize_4bit(lin.weight.detach(), blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(layer.weight, expected)
    twin = qlora.bitsandbytes_lora(lin)
    assert torch.equal(layer.weight, twin.base_layer.weight.data)
    # double quantization: same offset; the 8-bit absmax codes agree (lorakit.nf4 reproduces the CPU lookup table)
    assert torch.allclose(layer.offset, state.offset)
    assert torch.equal(layer.absmax, state.absmax)


@pytest.mark.parametrize("bias", [False, True])
def test_outputs_and_gradients_equal_bitsandbytes_plus_peft_fp32(bias):
    _, ours, twin = _pair(bias=bias)
    x = torch.randn(3, 11, 192, requires_grad=True)
    y, y_ref = ours(x), twin(x)
    assert y.dtype == y_ref.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g, = torch.autograd.grad(y.square().sum(), x)
    g_ref, = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_adapter_gradients_equal_peft():
    _, ours, twin = _pair()
    x = torch.randn(4, 7, 192)
    ours(x).square().sum().backward()
    twin(x).square().sum().backward()
    for part in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(ours, part).weight.grad, getattr(twin, part)["default"].weight.grad,
                                   rtol=1e-4, atol=1e-4)


def test_outputs_close_to_bitsandbytes_in_bf16_and_under_autocast():
    _, ours, twin = _pair()
    x = torch.randn(3, 11, 192)
    with torch.no_grad():
        y, y_ref = ours(x.bfloat16()), twin(x.bfloat16())
        assert y.dtype == y_ref.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, y_ref = ours(x), twin(x)
        torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


def _save_tiny(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    return model


def test_model_equals_transformers_bitsandbytes_and_peft(tmp_path):
    """The whole model: our quantize_and_inject vs from_pretrained(BitsAndBytesConfig nf4 + double quant) +
    get_peft_model, with the same adapters loaded. Same packed bytes in every layer, same logits."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ours = _save_tiny(tmp_path)
    # transformers' Linear4bit computes in bnb_4bit_compute_dtype (bf16) whatever the input dtype
    qlora.quantize_and_inject(ours, ALL_LINEAR, r=8, alpha=16, compute_dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_(0, 0.05)
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg, dtype=torch.float32,
                                               device_map={"": "cpu"})
    ref = get_peft_model(ref, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=ALL_LINEAR))
    set_peft_model_state_dict(ref, {f"base_model.model.{k}": v for k, v in lora_state_dict(ours).items()})
    n_layers = 0
    for name, m in ours.named_modules():
        if isinstance(m, qlora.NF4Linear):
            theirs = ref.base_model.model.get_submodule(name)
            assert torch.equal(m.weight, theirs.weight.data), name
            n_layers += 1
    assert n_layers == 2 * 7
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    ours.train(), ref.train()  # no dropout in a Llama; train() also sidesteps bitsandbytes' CPU repack
    with torch.no_grad():
        ours_logits, ref_logits = ours(ids).logits, ref(ids).logits
    # bf16 compute: the two differ only in where the adapter output is rounded (peft rounds it to bf16
    # before adding, LoRALinear adds in fp32), a few bf16 steps at most
    torch.testing.assert_close(ours_logits, ref_logits, rtol=2e-2, atol=2e-2)
    assert (ours_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() > 0.95


# --------------------------------------------------------------------------------------- the matmul itself

def test_matmul_nf4_keeps_no_dequantized_weight():
    lin = _linear(256, 256)
    layer = qlora.NF4Linear(lin)
    x = torch.randn(8, 256, dtype=torch.bfloat16, requires_grad=True)
    recompute = memory.saved_bytes(layer, x, exclude=layer)
    naive = memory.saved_bytes(lambda x: F.linear(x, layer.dequantize(torch.bfloat16)), x, exclude=layer)
    assert recompute == 0
    assert naive == 256 * 256 * 2  # the bf16 weight
    # and the gradient is still right
    W = layer.dequantize(torch.float32)
    x32 = torch.randn(5, 256, requires_grad=True)
    g, = torch.autograd.grad(layer(x32).sum(), x32)
    torch.testing.assert_close(g, torch.ones(5, 256) @ W)


def test_only_adapters_train_and_get_gradients():
    model = tiny_llama()
    n = qlora.quantize_and_inject(model, ALL_LINEAR, r=4, alpha=8)
    assert n == 2 * 4 * ((128 + 128) * 4 + (128 + 256) * 3)
    trainable = {name.split(".")[-2] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    ids = torch.randint(0, 256, (2, 10))
    model.train()
    model(ids, labels=ids).loss.backward()
    assert {name.split(".")[-2] for name, p in model.named_parameters() if p.grad is not None} == {"lora_A", "lora_B"}
    assert all(p.grad.abs().sum() > 0 for name, p in model.named_parameters() if name.endswith("lora_B.weight"))


def test_adapters_learn_after_an_evaluation_under_no_grad():
    """bitsandbytes' CPU repack (`Linear4bit.forward`): evaluating in eval() under no_grad must not stop the adapters from learning, for
    our layers and for the bitsandbytes twin (whose CPU repack bitsandbytes_lora switches off)."""
    for layer in _pair()[1:]:
        layer.eval()
        with torch.no_grad():
            layer(torch.randn(2, 192))
        layer.train()
        out = layer(torch.randn(2, 192))
        out.square().sum().backward()
        B = layer.lora_B if isinstance(layer, LoRALinear) else layer.lora_B["default"]
        assert B.weight.grad is not None and B.weight.grad.abs().sum() > 0


def test_training_lowers_the_loss():
    model = tiny_llama()
    qlora.quantize_and_inject(model, ALL_LINEAR, r=8, alpha=16)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


# -------------------------------------------------------------------------------------------------- memory

def test_stored_bits_close_to_the_4127_limit():
    model = tiny_llama(hidden=256, intermediate=512)
    qlora.quantize_and_inject(model, ALL_LINEAR)
    bits = qlora.stored_bits_per_param(model)
    limit = nf4.bits_per_param(64, double_quant=True)
    assert limit == pytest.approx(4.127, abs=1e-3)
    assert limit <= bits <= limit * 1.05


def test_memory_measure_counts_the_4bit_layer():
    from lorakit.memory import measure

    lin = _linear(256, 256)
    layer = qlora.NF4Linear(lin)
    # packed bytes + uint8 absmax + offset + second-level absmax + the two code tables
    expected = layer.nbytes() + layer.code.numel() * 4 + layer.code2.numel() * 4
    assert measure(layer) == expected
    assert measure(layer) < measure(lin) / 6


def test_to_device_and_state_dict_keep_the_state():
    layer = qlora.QLoRALinear.from_linear(_linear(), 8, 16)
    sd = layer.state_dict()
    assert {"base_layer.weight", "base_layer.absmax", "base_layer.offset", "base_layer.absmax2"} <= set(sd)
    moved = copy.deepcopy(layer).to("cpu")
    x = torch.randn(2, 192)
    torch.testing.assert_close(moved(x), layer(x))


# ----------------------------------------------------------------------------------------- merge, bad input

def test_merge_raises_and_points_to_16bit_merge():
    _, ours, _ = _pair()
    with pytest.raises(qlora.QLoRAMergeError, match="16-bit"):
        ours.merge()
    x = torch.randn(3, 192)
    merged = ours.to_merged_linear(torch.float32)
    assert isinstance(merged, nn.Linear) and merged.weight.dtype == torch.float32
    torch.testing.assert_close(merged(x), ours(x), rtol=1e-5, atol=1e-5)


def test_merge_to_16bit_model():
    model = tiny_llama()
    qlora.quantize_and_inject(model, ["q_proj", "v_proj"], r=4, alpha=8)
    for name, p in model.named_parameters():
        if name.endswith("lora_B.weight"):
            p.data.normal_(0, 0.05)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        before = model(ids).logits
        qlora.merge_to_16bit(model, torch.float32)
        after = model(ids).logits
    assert not any(isinstance(m, (qlora.QLoRALinear, qlora.NF4Linear)) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_bad_input_is_explained():
    with pytest.raises(TypeError, match="nn.Linear"):
        qlora.QLoRALinear.from_linear(nn.Conv1d(4, 4, 1), 8, 16)
    with pytest.raises(ValueError, match="multiple of blocksize"):
        qlora.QLoRALinear.from_linear(nn.Linear(100, 64), 8, 16)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        qlora.NF4Linear(nn.Linear(64, 64), blocksize=48)
    with pytest.raises(ValueError, match="rank"):
        qlora.QLoRALinear.from_linear(nn.Linear(64, 64), 0, 16)
    with pytest.raises(TypeError, match="already"):
        qlora.QLoRALinear.from_linear(qlora.QLoRALinear.from_linear(nn.Linear(64, 64)))
    model = tiny_llama()
    with pytest.raises(ValueError, match="matched no module"):
        qlora.quantize_and_inject(model, ["query"])
    qlora.quantize_and_inject(model, ["q_proj"])
    with pytest.raises(TypeError, match="already adapted"):
        qlora.quantize_and_inject(model, ["q_proj"])


# ------------------------------------------------------------------------------ the lesson's checks bite

class SavesW(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, quant_state, bias=None):
        W = nf4.dequantize_nf4(weight, quant_state, dtype=x.dtype)
        ctx.save_for_backward(W)
        return F.linear(x, W, bias)

    @staticmethod
    def backward(ctx, g):
        (W,) = ctx.saved_tensors
        return g @ W, None, None, None


class KeepsFloatWeight(qlora.NF4Linear):
    def __init__(self, linear, **kw):
        super().__init__(linear, **kw)
        self.register_buffer("w16", linear.weight.detach().to(torch.bfloat16))


class MergesAnyway(qlora.QLoRALinear):
    def merge(self):
        pass


def test_checks_pass_on_the_reference():
    check.matmul_nf4(qlora.MatMulNF4)
    check.nf4_linear(qlora.NF4Linear)
    check.qlora_linear(qlora.QLoRALinear)
    check.quantize_and_inject(qlora.quantize_and_inject, qlora.QLoRALinear)
    check.stored_bits(qlora.stored_bits_per_param, qlora.quantize_and_inject)
    for c, args in [(check.matmul_nf4, (qlora.MatMulNF4,)), (check.qlora_linear, (qlora.QLoRALinear,)),
                    (check.stored_bits, (qlora.stored_bits_per_param, qlora.quantize_and_inject))]:
        c(*args, seed="grading")  # made-up shapes and ranks


def test_checks_catch_mistakes():
    with pytest.raises(CheckFailed, match="dequantized weight"):
        check.matmul_nf4(SavesW)
    with pytest.raises(CheckFailed, match="copy of the weight"):
        check.nf4_linear(KeepsFloatWeight)
    with pytest.raises(CheckFailed, match="merge"):
        check.qlora_linear(MergesAnyway)
    with pytest.raises(CheckFailed, match="not replaced"):
        check.quantize_and_inject(lambda m, t, r, a: qlora.quantize_and_inject(m, ["q_proj", "v_proj"], r, a),
                                  MergesAnyway)
    with pytest.raises(CheckFailed, match="bits per 4-bit weight"):
        check.stored_bits(lambda m: 4.0, qlora.quantize_and_inject)


def test_checks_fail_on_the_student_stub():
    def stub(*args, **kwargs):
        raise NotImplementedError()

    class Stub(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            raise NotImplementedError()

    for fn in (lambda: check.matmul_nf4(Stub), lambda: check.nf4_linear(stub), lambda: check.qlora_linear(stub),
               lambda: check.quantize_and_inject(stub, qlora.QLoRALinear),
               lambda: check.stored_bits(stub, qlora.quantize_and_inject)):
        with pytest.raises(CheckFailed, match="NotImplementedError"):
            fn()


# ----------------------------------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_equality_and_paged_optimizer():
    """The same layer on a GPU: quantized there, equal to bitsandbytes + peft there, and trainable with
    bitsandbytes' PagedAdamW, whose states live in paged (unified) memory."""
    lin = _linear().cuda()
    ours = qlora.QLoRALinear.from_linear(lin, 8, 16, compute_dtype=torch.bfloat16)
    with torch.no_grad():
        ours.lora_B.weight.normal_(0, 0.05)
    twin = qlora.bitsandbytes_lora(lin, 8, 16, compute_dtype=torch.bfloat16)
    qlora.copy_adapters(ours, twin)
    assert ours.base_layer.weight.is_cuda
    assert torch.equal(ours.base_layer.weight, twin.base_layer.weight.data)
    x = torch.randn(4, 192, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), twin(x), rtol=2e-2, atol=2e-2)
    # bitsandbytes pages only states of >= 100,000 numbers: r=128 on 1024 x 1024 gives 131,072 per adapter
    big = qlora.QLoRALinear.from_linear(_linear(1024, 1024).cuda(), 128, 128)
    with torch.no_grad():
        big.lora_B.weight.normal_(0, 0.05)
    opt = bnb.optim.PagedAdamW([p for p in big.parameters() if p.requires_grad], lr=1e-3)
    before = big.lora_A.weight.detach().clone()
    big(torch.randn(4, 1024, device="cuda")).square().sum().backward()
    opt.step()
    assert not torch.equal(before, big.lora_A.weight)
    states = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    assert states and all(getattr(t, "is_paged", False) for t in states)
