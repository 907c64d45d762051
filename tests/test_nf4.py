"""lorakit.nf4 against bitsandbytes 0.50.2 on CPU: bit-exact quantization, dequantization and double
quantization, clear errors on bad input, and the lesson 03 self-checks failing on wrong answers."""

import dataclasses
import logging

import pytest
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
import bitsandbytes.functional as bnbF  # noqa: E402

from lorakit import nf4  # noqa: E402
from lorakit.checks import CheckFailed  # noqa: E402
from lorakit.checks import nf4 as check  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(64,), (4096,), (1, 1), (3, 7), (33, 65), (127, 129), (512, 300)]


def weights(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g) * 0.02
    if W.numel() > 10:
        W.view(-1)[5] = 1.0  # an outlier
    return W.to(dtype)


def bnb_dequant(packed, state):
    with torch.compiler.set_stance("force_eager"):
        return bnbF.dequantize_4bit(packed, state, quant_type="nf4")


def test_codes_equal_bitsandbytes_tables():
    assert torch.equal(nf4.nf4_code(), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_code(), bnbF.create_dynamic_map())
    assert (nf4.nf4_code() == 0).sum() == 1 and nf4.nf4_code()[7] == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_quantize_and_dequantize_bit_exact(dtype, shape, double_quant):
    W = weights(shape, dtype)
    packed, state = nf4.quantize_nf4(W, blocksize=64, double_quant=double_quant)
    ref, ref_state = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert packed.dtype == torch.uint8 and packed.shape == ref.shape == ((W.numel() + 1) // 2, 1)
    assert torch.equal(packed, ref)
    assert torch.equal(state.absmax, ref_state.absmax)
    if double_quant:
        assert torch.equal(state.offset, ref_state.offset)
        assert torch.equal(state.absmax2, ref_state.state2.absmax)
    out = nf4.dequantize_nf4(packed, state)
    assert out.dtype == dtype and out.shape == W.shape
    assert torch.equal(out.reshape(-1), bnb_dequant(ref, ref_state).reshape(-1))


@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
def test_every_blocksize(blocksize):
    W = weights((37, 91), torch.bfloat16, seed=blocksize)
    packed, state = nf4.quantize_nf4(W, blocksize=blocksize, double_quant=True)
    ref, ref_state = bnbF.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, ref) and torch.equal(state.absmax, ref_state.absmax)
    assert torch.equal(nf4.dequantize_nf4(packed, state).reshape(-1), bnb_dequant(ref, ref_state).reshape(-1))


def test_dequantize_output_dtype_and_large_chunked_path():
    W = weights((1024, 1000), torch.float32)  # more bytes than one CPU chunk, and a partial last block
    packed, state = nf4.quantize_nf4(W)
    ref, ref_state = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4")
    fp32 = nf4.dequantize_nf4(packed, state)
    assert torch.equal(fp32, bnb_dequant(ref, ref_state))
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(nf4.dequantize_nf4(packed, state, dtype=dtype), fp32.to(dtype))


def _reference_dequantize(packed, state, dtype):
    """dequantize_nf4's short path, forced for any size."""
    n = state.numel
    values = state.code[nf4.unpack_nibbles(packed, n)]
    return (values * state.absmax_fp32().repeat_interleave(state.blocksize)[:n]).to(dtype).view(state.shape)


# short path: 256 and 4,096 bytes, and 1,365 numbers (a partial last block); chunked: 6,240 bytes, and
# 4,850 and 512,000 bytes with a partial last block
@pytest.mark.parametrize("shape", [(8, 64), (64, 128), (3, 7, 65), (130, 96), (100, 97), (1024, 1000)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_reference_and_chunked_dequantize_agree_bit_for_bit(shape, double_quant):
    """dequantize_nf4 reads as code[index] * absmax for small weights and takes the chunked path above
    REFERENCE_MAX_BYTES; both give the same numbers in every dtype, partial last blocks included."""
    W = weights(shape, torch.float32)
    packed, state = nf4.quantize_nf4(W, blocksize=64, double_quant=double_quant)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ref = _reference_dequantize(packed, state, dtype)
        assert torch.equal(nf4._dequantize_chunked(packed, state, dtype), ref)
        assert torch.equal(nf4.dequantize_nf4(packed, state, dtype), ref)


@pytest.mark.parametrize("shape", [(16, 64), (512, 512)])
def test_dequantize_uses_the_states_code_table(shape):
    """The state carries its code table; dequantization reads it (both paths), not a table of its own."""
    packed, state = nf4.quantize_nf4(weights(shape, torch.float32))
    flipped = dataclasses.replace(state, code=-state.code.flip(0))  # code[i] -> -code[15 - i]
    index = nf4.unpack_nibbles(packed, state.numel)
    want = (-state.code.flip(0))[index] * state.absmax_fp32().repeat_interleave(64)
    assert torch.equal(nf4.dequantize_nf4(packed, flipped).reshape(-1), want)


def test_dequantize_explains_a_wrong_state():
    W = weights((16, 64), torch.float32)
    ref, ref_state = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4")
    with pytest.raises(TypeError, match=r"got QuantState.*bitsandbytes.functional.dequantize_4bit"):
        nf4.dequantize_nf4(ref, ref_state)
    packed, state = nf4.quantize_nf4(W)
    with pytest.raises(ValueError, match="uint8"):
        nf4.dequantize_nf4(packed.float(), state)
    with pytest.raises(ValueError, match="do not hold the 1024 numbers"):
        nf4.dequantize_nf4(packed[:10], state)


def test_midpoint_ties_and_padding():
    code = nf4.nf4_code()
    mids = nf4.nf4_midpoints()
    # a value exactly on a midpoint takes the lower code, one ulp above takes the upper one
    block = torch.zeros(64)
    block[0] = 1.0
    block[1:16] = mids
    block[16:31] = torch.nextafter(mids, torch.tensor(2.0))
    packed, _ = nf4.quantize_nf4(block)
    idx = nf4.unpack_nibbles(packed, 64)
    assert idx[1:16].tolist() == list(range(15)) and idx[16:31].tolist() == list(range(1, 16))
    assert torch.equal(packed, bnbF.quantize_4bit(block, blocksize=64, quant_type="nf4")[0])
    # an odd count pads with index 7 (0.0) in the low nibble of the last byte
    packed, _ = nf4.quantize_nf4(torch.tensor([1.0, -1.0, 1.0]))
    assert packed.reshape(-1).tolist() == [(15 << 4) | 0, (15 << 4) | 7]
    assert code[7] == 0


def test_zero_blocks_match_bitsandbytes():
    W = torch.zeros(200)
    W[:64] = torch.randn(64)  # block 0 real, blocks 1-2 zero, block 3 (partial) zero
    packed, state = nf4.quantize_nf4(W, double_quant=True)
    ref, ref_state = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, ref) and torch.equal(state.absmax, ref_state.absmax)
    _, plain = nf4.quantize_nf4(W)
    assert plain.absmax[1] == 0 and plain.absmax[3].item() == pytest.approx(1e-38)  # bnb's clamped divisor
    assert torch.equal(nf4.dequantize_nf4(packed, state).reshape(-1), bnb_dequant(ref, ref_state).reshape(-1))


def test_double_quant_lookup_table_matches_bitsandbytes_blockwise():
    x = torch.randn(256 * 300) * 0.3
    codes, absmax = nf4.quantize_dynamic_8bit(x, 256)
    ref, ref_state = bnbF.quantize_blockwise(x, blocksize=256)
    assert torch.equal(codes, ref) and torch.equal(absmax, ref_state.absmax)
    exact = nf4.exact_dynamic_8bit(x, 256)
    assert 0 < (exact != codes).float().mean() < 0.01  # the lookup table is not exact-nearest


def test_state_absmax_roundtrip_and_bits():
    W = weights((256, 256), torch.float32)
    _, plain = nf4.quantize_nf4(W)
    _, dq = nf4.quantize_nf4(W, double_quant=True)
    assert dq.double_quant and not plain.double_quant
    rel = ((dq.absmax_fp32() - plain.absmax).abs() / plain.absmax).max()
    assert rel < 0.05
    _, ref = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(dq.absmax_fp32(), bnbF.dequantize_blockwise(ref.absmax, ref.state2) + ref.offset)
    assert nf4.bits_per_param(64) == 4.5
    assert nf4.bits_per_param(64, double_quant=True) == pytest.approx(4.126953125)
    n = W.numel()
    assert plain.nbytes() * 8 / n == pytest.approx(0.5)
    assert dq.nbytes() * 8 / n == pytest.approx(0.125 + 32 / (64 * 256), abs=1e-3)


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([]), "empty"),
    (torch.arange(64), "float32, float16 or bfloat16"),
    (torch.tensor([1.0, float("nan")] * 32), "NaN or inf"),
    (torch.tensor([1.0, float("inf")] * 32), "NaN or inf"),
])
def test_bad_input_raises_clearly(bad, message):
    with pytest.raises(ValueError, match=message):
        nf4.quantize_nf4(bad)


def test_bad_blocksize_raises_like_bitsandbytes():
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize_nf4(torch.randn(64), blocksize=48)
    with pytest.raises(ValueError):
        bnbF.quantize_4bit(torch.randn(64), blocksize=48, quant_type="nf4")


# ------------------------------------------------------------------- the lesson's self-checks


def test_checks_pass_on_reference():
    check.describe(lambda dt: {"max": torch.finfo(dt).max, "eps": torch.finfo(dt).eps})
    check.nf4_values(nf4.nf4_code)
    check.quantize(lambda W, bs=64: nf4.quantize_nf4(W, bs))
    check.dequantize(lambda W, bs=64: nf4.quantize_nf4(W, bs), nf4.dequantize_nf4)
    check.bits(nf4.bits_per_param)

    def dq(absmax):
        offset = absmax.mean()
        codes, absmax2 = nf4.quantize_dynamic_8bit(absmax - offset, 256)
        return codes, absmax2, offset
    check.double_quant(dq)


def test_quantize_check_explains_swapped_nibbles():
    def swapped(W, bs=64):
        packed, state = nf4.quantize_nf4(W, bs)
        return ((packed & 0xF) << 4) | (packed >> 4), state
    with pytest.raises(CheckFailed, match="HIGH nibble"):
        check.quantize(swapped)


def test_dequantize_check_catches_early_cast():
    def early(packed, state):  # casts the code values before multiplying: wrong rounding
        code = nf4.nf4_code().to(state.dtype)
        idx = nf4.unpack_nibbles(packed, state.numel)
        scale = state.absmax.to(state.dtype).repeat_interleave(state.blocksize)[: state.numel]
        return (code[idx] * scale).reshape(state.shape)
    with pytest.raises(CheckFailed):
        check.dequantize(lambda W, bs=64: nf4.quantize_nf4(W, bs), early)


def test_double_quant_check_catches_exact_nearest():
    def exact(absmax):
        offset = absmax.mean()
        _, absmax2 = nf4.quantize_dynamic_8bit(absmax - offset, 256)
        return nf4.exact_dynamic_8bit(absmax - offset, 256), absmax2, offset
    with pytest.raises(CheckFailed, match="65,536"):
        check.double_quant(exact)


def test_nf4_values_check_catches_symmetric_code():
    def symmetric():
        v = torch.special.ndtri(torch.linspace(0.9677083, 0.5, 9)[:-1].double())
        v = torch.cat([v, torch.zeros(1, dtype=torch.float64), -v]).float().sort().values
        return (v / v.max())[:16]
    with pytest.raises(CheckFailed):
        check.nf4_values(symmetric)


@pytest.mark.parametrize("seed", [0, "grading"])
def test_absmax_int8_is_the_reference_of_lesson_03s_first_exercises(seed):
    """lorakit.nf4.absmax_int8 (one absmax, or one per block) answers the absmax and blockwise exercises, which the
    lesson's cells use while those exercises are open."""
    check.absmax_int8(nf4.absmax_int8, nf4.absmax_int8_dequantize, seed=seed)
    check.blockwise(nf4.absmax_int8, nf4.absmax_int8_dequantize, seed=seed)
    x = torch.tensor([0.5, -1.0, 0.25, 2.0])
    q, absmax = nf4.absmax_int8(x)
    assert q.dtype == torch.int8 and q.tolist() == [32, -64, 16, 127] and absmax.item() == 2.0
    q, absmax = nf4.absmax_int8(x, blocksize=2)
    assert q.tolist() == [[64, -127], [16, 127]] and absmax.tolist() == [1.0, 2.0]
    assert torch.allclose(nf4.absmax_int8_dequantize(q, absmax), x, atol=0.01)


def test_nf4_blocks_have_a_scale_and_no_zero_point():
    """Lesson 03 corrects the source lesson's "scales and zero-points": a block of NF4 keeps its absmax and nothing
    else; a value comes back as code value x absmax with nothing added (0 stays exactly 0), and with double
    quantization the one offset is the mean of the absmax values, one number for the whole tensor."""
    W = weights((256, 320), torch.bfloat16)
    W.view(-1)[:64] = 0.0
    packed, state = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4")
    assert state.offset is None and state.state2 is None and state.absmax.shape == (W.numel() // 64,)
    idx = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], dim=1).view(-1).long()
    by_hand = (state.code[idx] * state.absmax.repeat_interleave(64)).to(W.dtype).view(W.shape)
    assert torch.equal(by_hand, bnbF.dequantize_4bit(packed, state))
    assert (bnbF.dequantize_4bit(packed, state).view(-1)[:64] == 0).all() and state.code[7] == 0
    _, nested = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert nested.offset.numel() == 1
    assert torch.allclose(nested.offset, state.absmax.mean())


def test_the_three_4bit_codes_distinct_values():
    """Lesson 03's histogram: NF4 has 16 distinct values, FP4 15 (+0 and -0 are two codes), int4 15 (-7..7)."""
    counts = {"NF4": nf4.nf4_code().unique().numel(), "FP4": bnbF.get_4bit_type("fp4", device="cpu").unique().numel(),
              "int4": (torch.arange(-7, 8) / 7).unique().numel()}
    assert counts == {"NF4": 16, "FP4": 15, "int4": 15}
