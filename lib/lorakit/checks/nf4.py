"""Self-checks for lesson 03 (data types and NF4 quantization).

Each check runs the learner's function on small inputs, compares with bitsandbytes (or torch) and says
what differs: which dtype or shape, how many codes, and the usual cause.
"""

from __future__ import annotations


import torch

from . import close, expect, passed

# Shapes that exercise full blocks, a partial last block, and an odd number of elements.
SHAPES = [(64, 64), (33, 65), (7, 9), (1, 1), (5000,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bnb():
    import bitsandbytes.functional as F
    return F


def _weights(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g) * 0.02
    W.view(-1)[:: 97] *= 40  # a few outliers, as trained weights have
    return W.to(dtype)


def _pair(result, name):
    expect(isinstance(result, tuple) and len(result) == 2,
           f"`{name}` should return a pair, found {type(result).__name__}.", "end the function with `return ..., ...`.")
    return result


# ------------------------------------------------------------------------------------- float formats

def describe(fn) -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = fn(dtype)
        expect(isinstance(got, dict) and {"max", "eps"} <= set(got),
               f"`describe({dtype})` should return a dict with keys 'max' and 'eps', found {got!r}.")
        fi = torch.finfo(dtype)
        expect(close(got["max"], fi.max), f"{dtype}: largest value expected {fi.max:.6g}, found {got['max']!r}.",
               "torch.finfo(dtype).max is the largest finite number the format holds.")
        expect(close(got["eps"], fi.eps), f"{dtype}: step after 1.0 expected {fi.eps:.6g}, found {got['eps']!r}.",
               "torch.finfo(dtype).eps is the gap between 1.0 and the next representable number.")
    passed("fp32, fp16 and bf16: largest value and precision match torch.finfo")


# --------------------------------------------------------------------------------------- absmax int8

def absmax_int8(quantize, dequantize) -> None:
    x = torch.tensor([0.5, -1.25, 2.5, 0.01, -0.3, 1.0])
    q, scale = _pair(quantize(x), "absmax_quantize")
    expect(isinstance(q, torch.Tensor) and q.dtype == torch.int8,
           f"the codes should be a torch.int8 tensor, found {getattr(q, 'dtype', type(q).__name__)}.",
           "finish with `.to(torch.int8)` after rounding.")
    expected = torch.round(x * 127 / 2.5).to(torch.int8)
    expect(torch.equal(q, expected), f"codes for {x.tolist()}: expected {expected.tolist()}, found {q.tolist()}.",
           "scale by 127 / absmax (absmax = the largest |x|) and round to the nearest integer.")
    expect(close(scale, 2.5), f"the scale you return should be the absmax 2.5, found {scale!r}.")
    x_hat = dequantize(q, scale)
    err = (x_hat - x).abs().max().item()
    expect(err <= 2.5 / 127 / 2 + 1e-6, f"dequantized values are off by up to {err:.4f}; rounding allows at most {2.5 / 254:.4f}.",
           "dequantize with q * absmax / 127.")
    passed(f"absmax int8: codes {q.tolist()}, largest error {err:.4f}")


def blockwise(quantize, dequantize) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4 * 64, generator=g)
    x[3] = 50.0
    q, absmax = _pair(quantize(x, 64), "blockwise_quantize")
    expect(tuple(q.shape) == (4, 64) and q.dtype == torch.int8,
           f"blockwise codes should be int8 of shape (4, 64) for 256 numbers in blocks of 64, found {q.dtype} {tuple(q.shape)}.",
           "reshape to (-1, blocksize) first; every row is one block.")
    ref_absmax = x.view(4, 64).abs().amax(dim=1)
    expect(torch.allclose(absmax.reshape(-1).float(), ref_absmax),
           f"absmax per block expected {ref_absmax.tolist()}, found {absmax.reshape(-1).tolist()}.",
           "take the max of |x| along each row: x.abs().amax(dim=1).")
    ref_q = torch.round(x.view(4, 64) * 127 / ref_absmax[:, None]).to(torch.int8)
    expect(torch.equal(q, ref_q), f"{(q != ref_q).sum().item()} of 256 codes differ from round(127 * x / block absmax).",
           "divide each row by its own absmax (keepdim or [:, None] so it broadcasts).")
    x_hat = dequantize(q, absmax).reshape(-1)
    err = (x_hat - x).abs()
    expect(x_hat.numel() == 256 and err[64:].max() < 0.05,
           f"dequantized blocks 2-4 should be close to x (error < 0.05), found max error {err[64:].max().item():.3f}.",
           "multiply each row by its absmax / 127 and flatten.")
    passed("blockwise int8: the outlier only coarsens its own block")


# -------------------------------------------------------------------------------------- the NF4 code

def nf4_values(fn) -> None:
    v = fn()
    expect(isinstance(v, torch.Tensor) and v.numel() == 16,
           f"expected a tensor of 16 values, found {type(v).__name__} with {getattr(v, 'numel', lambda: '?')()} elements.")
    v = v.reshape(-1).float().cpu()
    ref = _bnb().get_4bit_type("nf4", device="cpu")
    expect(torch.equal(v.sort().values, v), "the values should be sorted from -1 to 1.", "finish with .sort().values.")
    expect((v == 0).sum() == 1, f"exactly one value should be 0.0 (found {(v == 0).sum().item()}).",
           "drop the last quantile (at probability 0.5) on both sides and add a single 0.")
    expect(v[0] == -1 and v[-1] == 1, f"the ends should be -1.0 and 1.0, found {v[0].item()} and {v[-1].item()}.",
           "divide by the largest value (the positive side reaches further: 8 positive, 7 negative).")
    diff = (v - ref).abs().max().item()
    expect(diff < 1e-6, f"the values differ from bitsandbytes' NF4 table by up to {diff:.2e}.\n"
           f"expected {ref.tolist()}\nfound    {v.tolist()}",
           "probabilities torch.linspace(0.9677083, 0.5, 9)[:-1] for the positive side and (…, 8)[:-1] for the negative side.")
    exact = torch.equal(v, ref)
    passed("the 16 NF4 values equal bitsandbytes' table" + (" bit for bit" if exact else f" (within {diff:.1e})"))


# ------------------------------------------------------------------------------ NF4 quantize/dequantize

def _diagnose(packed, ref):
    """A hint for the most common packing mistakes."""
    p, r = packed.reshape(-1), ref.reshape(-1)
    swapped = ((p & 0xF) << 4) | (p >> 4)
    if torch.equal(swapped, r):
        return "the nibbles are swapped: the even-indexed element goes in the HIGH nibble (idx[0::2] << 4)."
    hi, lo = (p >> 4).int() - (r >> 4).int(), (p & 0xF).int() - (r & 0xF).int()
    d = torch.cat([hi, lo])
    if (d != 0).any() and set(d[d != 0].unique().tolist()) <= {-1, 1}:
        return ("some codes are one off: a number exactly on a midpoint takes the lower code (torch.bucketize "
                "with the 15 midpoints does that), and the partial last block divides by its absmax.")
    return "quantize in fp32 (W.float()), scale by 1/absmax per block, clamp to [-1, 1], then bucketize with the midpoints."


def quantize(fn) -> None:
    F = _bnb()
    for dtype in DTYPES:
        for shape in SHAPES:
            W = _weights(shape, dtype)
            packed, state = _pair(fn(W, 64), "quantize_nf4")
            ref, ref_state = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
            where = f"{dtype} weight of shape {shape}"
            expect(isinstance(packed, torch.Tensor) and packed.dtype == torch.uint8 and packed.shape == ref.shape,
                   f"{where}: packed should be uint8 of shape {tuple(ref.shape)}, found "
                   f"{getattr(packed, 'dtype', '?')} {tuple(getattr(packed, 'shape', ()))}.",
                   "two codes per byte: (ceil(n / 2), 1); pad an odd count with index 7 (the code for 0.0).")
            absmax = getattr(state, "absmax", None)
            expect(isinstance(absmax, torch.Tensor) and absmax.shape == ref_state.absmax.shape
                   and torch.equal(absmax.float(), ref_state.absmax),
                   f"{where}: absmax should be fp32 of shape {tuple(ref_state.absmax.shape)} equal to bitsandbytes'.",
                   "one absmax per block of 64, the last block may be shorter; compute it in fp32.")
            n_diff = (packed != ref).sum().item()
            expect(n_diff == 0, f"{where}: {n_diff} of {ref.numel()} packed bytes differ from bitsandbytes.", _diagnose(packed, ref))
    passed(f"quantize_nf4 is bit-exact with bitsandbytes for fp32, bf16 and fp16 and {len(SHAPES)} shapes")


def dequantize(quantize_fn, dequantize_fn) -> None:
    F = _bnb()
    for dtype in DTYPES:
        for shape in SHAPES:
            W = _weights(shape, dtype, seed=2)
            packed, state = quantize_fn(W, 64)
            ref_packed, ref_state = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
            with torch.compiler.set_stance("force_eager"):  # bnb would compile a kernel per odd shape
                ref = F.dequantize_4bit(ref_packed, ref_state, quant_type="nf4").reshape(shape)
            out = dequantize_fn(packed, state)
            where = f"{dtype} weight of shape {shape}"
            expect(isinstance(out, torch.Tensor) and out.dtype == dtype and tuple(out.shape) == tuple(shape),
                   f"{where}: expected a {dtype} tensor of shape {shape}, found "
                   f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}.",
                   "slice off the padding ([:n]), reshape to state.shape and cast to state.dtype at the very end.")
            n_diff = (out != ref).sum().item()
            expect(n_diff == 0, f"{where}: {n_diff} values differ from bitsandbytes' dequantize_4bit.",
                   "multiply code value by block absmax in fp32, and only then cast to the weight's dtype.")
    passed("dequantize_nf4 equals bitsandbytes' dequantize_4bit bit for bit")


# ------------------------------------------------------------------------------ double quantization

def double_quant(fn) -> None:
    F = _bnb()
    for shape in [(256, 256), (100, 70), (4096, 64 * 3)]:
        W = _weights(shape, torch.float32, seed=3)
        _, plain = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
        _, ref = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
        result = fn(plain.absmax.clone())
        expect(isinstance(result, tuple) and len(result) == 3,
               "`double_quantize` should return three things: (codes, absmax2, offset).")
        codes, absmax2, offset = result
        where = f"the {plain.absmax.numel()} absmax values of a {shape} weight"
        expect(close(offset, ref.offset.item(), rel=0), f"{where}: offset expected {ref.offset.item():.8g}, found {offset!r}.",
               "offset = absmax.mean(), in fp32.")
        expect(isinstance(absmax2, torch.Tensor) and absmax2.shape == ref.state2.absmax.shape
               and torch.equal(absmax2.float(), ref.state2.absmax),
               f"{where}: second-level absmax should be {tuple(ref.state2.absmax.shape)} values equal to bitsandbytes'.",
               "after subtracting the offset, one absmax per block of 256 (the last block may be shorter).")
        expect(isinstance(codes, torch.Tensor) and codes.dtype == torch.uint8 and codes.shape == ref.absmax.shape,
               f"{where}: codes should be uint8 of shape {tuple(ref.absmax.shape)}.")
        n_diff = (codes != ref.absmax).sum().item()
        expect(n_diff == 0, f"{where}: {n_diff} of {codes.numel()} codes differ from bitsandbytes.",
               "round each scaled value to the nearest of the 65,536 grid points ((v + 1) * 0.5 * 65535 + 0.5, "
               "truncated) and look that point up in the table.")
    passed("double quantization equals bitsandbytes' compress_statistics=True code for code")


def bits(fn) -> None:
    for blocksize, dq, want in [(64, False, 4.5), (64, True, 4 + 8 / 64 + 32 / (64 * 256)), (128, False, 4.25),
                                (32, True, 4 + 8 / 32 + 32 / (32 * 256))]:
        got = fn(blocksize, dq)
        expect(close(got, want, rel=1e-9), f"bits_per_param({blocksize}, double_quant={dq}): expected {want:.6f}, found {got!r}.",
               "4 bits of code, plus 32 bits of fp32 absmax shared by a block; with double quantization 8 bits "
               "per block plus 32 bits per 256 blocks.")
    passed("bits per parameter: 4.5 without, 4.127 with double quantization")
