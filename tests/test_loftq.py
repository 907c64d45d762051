"""lorakit.loftq: LoftQ's alternating NF4 + SVD initialisation, equal to peft's own `loftq_init`."""

import peft  # noqa: F401  (the tests compare with peft's own loftq_init)
import pytest
import torch

from lorakit.loftq import loftq_init, loftq_iteration, low_rank, peft_on_cpu, reconstruction_error
from lorakit.nf4 import dequantize_nf4, quantize_nf4


def weight(shape, seed=0):
    """A weight with some low-rank structure on top of noise, like a trained layer."""
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    return 0.02 * torch.randn(shape, generator=g) + 0.05 * torch.randn(out_f, 4, generator=g) @ torch.randn(4, in_f, generator=g) / 4


def peft_loftq(W, r, num_iter):
    from peft.utils.loftq_utils import loftq_init as peft_loftq_init

    with peft_on_cpu():
        return peft_loftq_init(W, num_bits=4, reduced_rank=r, num_iter=num_iter)


@pytest.mark.parametrize("shape,r,num_iter", [((192, 192), 8, 1), ((512, 192), 16, 3), ((192, 512), 64, 2),
                                              ((128, 320), 4, 5)])
def test_equals_peft_loftq_init(shape, r, num_iter):
    W = weight(shape)
    q_peft, A_peft, B_peft = peft_loftq(W, r, num_iter)
    mine = loftq_init(W, r, scaling=1.0, num_iter=num_iter)
    assert torch.equal(mine.dequantize(), q_peft)          # the same NF4 codes (bitsandbytes on both sides)
    torch.testing.assert_close(mine.lora_A, A_peft)
    torch.testing.assert_close(mine.lora_B, B_peft)


def test_the_error_falls_below_plain_nf4_and_keeps_falling():
    W = weight((256, 192), seed=1)
    result = loftq_init(W, r=16, num_iter=4)
    packed, state = quantize_nf4(W)
    assert result.plain_error == pytest.approx(torch.linalg.norm(W - dequantize_nf4(packed, state)).item())
    assert result.errors[0] < result.plain_error
    assert all(b <= a * (1 + 1e-6) for a, b in zip(result.errors, result.errors[1:])), result.errors
    assert result.errors[-1] == pytest.approx(reconstruction_error(W, result.packed, result.quant_state,
                                                                   result.lora_A, result.lora_B))


def test_one_iteration_covers_the_top_r_of_the_quantization_error():
    """After one step s B A is the best rank-r approximation of W - dequant(NF4(W)) (Eckart-Young): the error
    left is the norm of the residual's singular values beyond r."""
    W = weight((96, 160), seed=2)
    packed, state, A, B = loftq_iteration(W, None, None, r=8)
    residual = W - dequantize_nf4(packed, state)
    S = torch.linalg.svdvals(residual)
    assert reconstruction_error(W, packed, state, A, B) == pytest.approx(S[8:].square().sum().sqrt().item(), rel=1e-4)


@pytest.mark.parametrize("scaling", [0.5, 2.0, 1 / 3])
def test_scaling_is_accounted_for(scaling):
    """s B A is the residual's rank-r part for any alpha / r (peft's LoftQ assumes s = 1: peft issue #1982)."""
    W = weight((128, 128), seed=3)
    one = loftq_init(W, r=8, scaling=1.0)
    scaled = loftq_init(W, r=8, scaling=scaling)
    torch.testing.assert_close(scaling * scaled.lora_B @ scaled.lora_A, one.lora_B @ one.lora_A, rtol=1e-4, atol=1e-6)
    assert scaled.errors == pytest.approx(one.errors, rel=1e-5)


def test_low_rank_puts_sqrt_s_on_both_sides():
    M = weight((40, 30), seed=4)
    A, B = low_rank(M, 5)
    assert A.shape == (5, 30) and B.shape == (40, 5)
    torch.testing.assert_close(torch.linalg.norm(A, dim=1), torch.linalg.norm(B, dim=0))


@pytest.mark.parametrize("kwargs,words", [
    (dict(weight=torch.zeros(64, 32), r=33), ["r=33", "64 x 32", "min(64, 32) = 32", "r <= 32"]),
    (dict(weight=torch.zeros(64, 32), r=0), ["positive integer"]),
    (dict(weight=torch.zeros(64), r=4), ["2-D", "(64,)"]),
    (dict(weight=torch.zeros(64, 64), r=4, num_iter=0), ["num_iter", "positive"]),
    (dict(weight=torch.zeros(64, 64), r=4, scaling=0.0), ["scaling"]),
])
def test_bad_input_is_explained(kwargs, words):
    with pytest.raises(ValueError) as e:
        loftq_init(**kwargs)
    for w in words:
        assert w in str(e.value)


@pytest.mark.hardware
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU redirect")
def test_peft_on_cpu_redirects_only_inside_the_block():
    t = torch.ones(2)
    with peft_on_cpu():
        assert t.to("cuda").device.type == "cpu"
        assert t.to(device="cuda", dtype=torch.float64).dtype == torch.float64
    with pytest.raises((AssertionError, RuntimeError)):
        t.to("cuda")


def test_nfquantizer_rule_agrees_with_bitsandbytes_almost_everywhere():
    """peft <= 0.19's NFQuantizer (divide, argmin) against bitsandbytes (multiply by 1/absmax, midpoints): the same
    16 values, so only numbers next to a midpoint can round differently."""
    from lorakit.loftq import nfquantizer_roundtrip
    from lorakit.nf4 import nf4_code

    W = weight((256, 512), seed=6)
    packed, state = quantize_nf4(W)
    ours, theirs = dequantize_nf4(packed, state), nfquantizer_roundtrip(W)
    assert (ours != theirs).sum() <= W.numel() // 10_000
    block = torch.linspace(-1, 1, 64)                        # absmax 1: every result is one of the 16 values
    assert torch.isin(nfquantizer_roundtrip(block), nf4_code()).all()
