"""Checks for lesson 03 (data types and NF4 quantization), judged (see lorakit.checks.judged).

Each check runs the learner's function on weights drawn from a seed (with a few outliers, as trained weights
have), and the judge compares what came back with bitsandbytes, or with the exercise's mirror in `lorakit.nf4`
(same name and signature), on the same weights, saying what differs: which dtype or shape, how many codes, and
the usual cause.
"""

from __future__ import annotations

import torch

from lorakit.checks import CheckFailed, close, expect
from lorakit.checks.judged import data_or_repr, judged_check

# Shapes that exercise full blocks, a partial last block, and an odd number of elements.
SHAPES = [(64, 64), (33, 65), (7, 9), (1, 1), (5000,)]
DTYPES = ["float32", "bfloat16", "float16"]


def _bnb():
    import bitsandbytes.functional as F
    return F


def _weights(rng, shape, dtype: str) -> torch.Tensor:
    W = rng.randn(*shape) * 0.02
    W.view(-1)[:: 97] *= 40  # a few outliers, as trained weights have
    return W.to(getattr(torch, dtype))


def _random_shape(rng) -> list[int]:
    return _comparable([rng.integer(1, 90), rng.integer(1, 90)] if rng.integer(0, 2) else [rng.integer(1, 6000)])


def _comparable(shape: list[int]) -> list[int]:
    if shape[-1] % 16 == 0 and shape[-1] % 64:  # bitsandbytes 0.50's CPU dequantize_4bit differs on a last
        shape[-1] += 1                          # dimension of 16, 32 or 48 (mod 64); lorakit.nf4 does not
    return shape


def _pair(result, name, n=2):
    if not (isinstance(result, tuple) and len(result) == n):
        what = "a pair" if n == 2 else f"{n} things"
        raise CheckFailed(f"`{name}` should return {what}, found {type(result).__name__}."
                          + ("\nHint: end the function with `return ..., ...`." if n == 2 else ""))
    return result


def _kind(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).removeprefix('torch.')} {tuple(x.shape)}"
    return type(x).__name__ if not isinstance(x, str) else repr(x)


# ------------------------------------------------------------------------------------- float formats

@judged_check
class describe:
    """`describe(dtype)`: the largest value and the precision (eps) of a float format."""
    answer = {"results": [object]}
    reference = ("lorakit.nf4.describe",)

    def draw(rng):
        names = ["float32", "float16", "bfloat16"]
        return {"dtypes": rng.sample(names + ["float64"], 4) if rng.grading else names}

    def probe(inputs, fn):
        out = []
        for name in inputs["dtypes"]:
            got = fn(getattr(torch, name))
            out.append({k: data_or_repr(got[k]) for k in ("max", "eps")} if isinstance(got, dict) and
                       {"max", "eps"} <= set(got) else data_or_repr(got))
        return {"results": out}

    def judge(inputs, answer):
        from lorakit.nf4 import describe
        for name, got in zip(inputs["dtypes"], answer["results"]):
            dtype = f"torch.{name}"
            expect(isinstance(got, dict) and {"max", "eps"} <= set(got),
                   f"`describe({dtype})` should return a dict with keys 'max' and 'eps', found {got!r}.")
            want = describe(getattr(torch, name))
            expect(close(got["max"], want["max"]), f"{dtype}: largest value expected {want['max']:.6g}, found "
                   f"{got['max']!r}.", "torch.finfo(dtype).max is the largest finite number the format holds.")
            expect(close(got["eps"], want["eps"]), f"{dtype}: step after 1.0 expected {want['eps']:.6g}, found "
                   f"{got['eps']!r}.",
                   "torch.finfo(dtype).eps is the gap between 1.0 and the next representable number.")
        expect(len(answer["results"]) == len(inputs["dtypes"]), "`describe` should answer once per call.")
        return "fp32, fp16 and bf16: largest value and precision match torch.finfo"


# --------------------------------------------------------------------------------------- absmax int8

@judged_check
class absmax_int8:
    """`absmax_quantize(x)` -> (int8 codes, absmax) and `absmax_dequantize(q, absmax)`."""
    answer = {"q": object, "scale": object, "x_hat": object}
    # the mirrors, and what they call (a learner's function that calls absmax_int8 answers with it)
    reference = ("lorakit.nf4.absmax_quantize", "lorakit.nf4.absmax_dequantize", "lorakit.nf4.absmax_int8",
                 "lorakit.nf4.absmax_int8_dequantize")

    def draw(rng):
        if rng.grading:
            x = rng.randn(rng.integer(3, 40)) * rng.uniform(0.1, 10)
            i = int(x.abs().argmax())
            x[i] = -x[i].abs()   # the largest magnitude is negative: absmax is max |x|, not max x
        else:
            x = torch.tensor([0.5, -1.25, 2.5, 0.01, -3.0, 1.0])
        return {"x": x}

    def probe(inputs, quantize, dequantize):
        q, scale = _pair(quantize(inputs["x"].clone()), "absmax_quantize")
        return {"q": data_or_repr(q), "scale": data_or_repr(scale.item() if isinstance(scale, torch.Tensor) and
                                                             scale.numel() == 1 else scale),
                "x_hat": data_or_repr(dequantize(q, scale))}

    def judge(inputs, a):
        from lorakit.nf4 import absmax_dequantize, absmax_quantize
        x, q = inputs["x"], a["q"]
        expected, ref_absmax = absmax_quantize(x)
        absmax = ref_absmax.item()
        expect(isinstance(q, torch.Tensor) and q.dtype == torch.int8,
               f"the codes should be a torch.int8 tensor, found {_kind(q)}.", "finish with `.to(torch.int8)` after rounding.")
        expect(q.shape == expected.shape and torch.equal(q, expected),
               f"codes for {[round(v, 4) for v in x.tolist()][:8]}: expected {expected.tolist()[:8]}, found "
               f"{q.reshape(-1)[:8].tolist()}.", "scale by 127 / absmax (absmax = the largest |x|) and round to the "
               "nearest integer.")
        expect(close(a["scale"], absmax), f"the scale you return should be the absmax {absmax:g}, found {a['scale']!r}.")
        x_hat = a["x_hat"]
        expect(isinstance(x_hat, torch.Tensor) and x_hat.shape == x.shape and x_hat.is_floating_point(),
               f"absmax_dequantize should return a float tensor shaped like x {tuple(x.shape)}, found {_kind(x_hat)}.")
        want = absmax_dequantize(expected, ref_absmax).double()
        err = (x_hat.double() - want).abs().max().item()
        expect(err <= 1e-6 * absmax, f"dequantized values differ from q * absmax / 127 by up to {err:.3g}.",
               "dequantize with q * absmax / 127.")
        return f"absmax int8: codes {q.tolist()[:8]}, largest error {(x_hat.double() - x).abs().max().item():.4f}"


@judged_check
class blockwise:
    """`blockwise_quantize(x, blocksize)` and `blockwise_dequantize(q, absmax)`: one absmax per block."""
    answer = {"q": object, "absmax": object, "x_hat": object}
    reference = ("lorakit.nf4.blockwise_quantize", "lorakit.nf4.blockwise_dequantize", "lorakit.nf4.absmax_int8",
                 "lorakit.nf4.absmax_int8_dequantize")

    def draw(rng):
        blocksize, blocks = (rng.choice([8, 16, 32, 64]), rng.integer(2, 8)) if rng.grading else (64, 4)
        x = rng.randn(blocks * blocksize)
        x[rng.integer(0, blocksize - 1)] = 50.0  # an outlier in the first block
        return {"x": x, "blocksize": blocksize}

    def probe(inputs, quantize, dequantize):
        q, absmax = _pair(quantize(inputs["x"].clone(), inputs["blocksize"]), "blockwise_quantize")
        return {"q": data_or_repr(q), "absmax": data_or_repr(absmax), "x_hat": data_or_repr(dequantize(q, absmax))}

    def judge(inputs, a):
        from lorakit.nf4 import blockwise_dequantize, blockwise_quantize
        x, bs = inputs["x"], inputs["blocksize"]
        n = x.numel()
        q, absmax = a["q"], a["absmax"]
        ref_q, ref_absmax = blockwise_quantize(x, bs)
        expect(isinstance(q, torch.Tensor) and tuple(q.shape) == (n // bs, bs) and q.dtype == torch.int8,
               f"blockwise codes should be int8 of shape {(n // bs, bs)} for {n} numbers in blocks of {bs}, found {_kind(q)}.",
               "reshape to (-1, blocksize) first; every row is one block.")
        expect(isinstance(absmax, torch.Tensor) and absmax.numel() == ref_absmax.numel()
               and torch.allclose(absmax.reshape(-1).float(), ref_absmax),
               f"absmax per block expected {[round(v, 4) for v in ref_absmax.tolist()]}, found "
               f"{absmax.reshape(-1).tolist() if isinstance(absmax, torch.Tensor) else absmax!r}.",
               "take the max of |x| along each row: x.abs().amax(dim=1).")
        expect(torch.equal(q, ref_q), f"{(q != ref_q).sum().item()} of {n} codes differ from round(127 * x / block absmax).",
               "divide each row by its own absmax (keepdim or [:, None] so it broadcasts).")
        x_hat = a["x_hat"]
        expect(isinstance(x_hat, torch.Tensor) and tuple(x_hat.shape) == (n,) and x_hat.is_floating_point(),
               f"blockwise_dequantize should give back the {n} numbers as a flat float tensor, found {_kind(x_hat)}.",
               "multiply each row by its absmax / 127 and flatten.")
        want = blockwise_dequantize(ref_q, ref_absmax).double()
        err = (x_hat.double() - want).abs()
        bad = int((err > 1e-6 * ref_absmax.repeat_interleave(bs)).sum())
        expect(bad == 0, f"{bad} of {n} dequantized values differ from code * block absmax / 127 (by up to "
               f"{err.max().item():.3g}), the outlier's block included.", "multiply each row by its absmax / 127 and flatten.")
        coarse = (x_hat.double() - x).abs()
        return (f"blockwise int8: the outlier only coarsens its own block (largest error {coarse[:bs].max().item():.3f} "
                f"there, {coarse[bs:].max().item():.4f} elsewhere)")


# -------------------------------------------------------------------------------------- the NF4 code

@judged_check
class nf4_values:
    """`nf4_values()`: the 16 NF4 values from the normal distribution's quantiles."""
    answer = {"values": object}
    # lorakit.nf4.nf4_values, the exercise's mirror, is not named: it is `return nf4_code().clone()`, too short for the
    # copied-code flagger to fingerprint (reference_use.similarity says 0 below 8 fingerprints, so
    # benchmarks/bench_similarity.py would count every copy of it as missed); a copy of it calls nf4_code,
    # which is named and flagged by name.
    reference = ("lorakit.nf4.nf4_code",)

    def draw(rng):
        return {}

    def probe(inputs, fn):
        return {"values": data_or_repr(fn())}

    def judge(inputs, answer):
        v = answer["values"]
        expect(isinstance(v, torch.Tensor) and v.numel() == 16,
               f"expected a tensor of 16 values, found {_kind(v)}.")
        v = v.reshape(-1).float()
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
        return "the 16 NF4 values equal bitsandbytes' table" + (" bit for bit" if exact else f" (within {diff:.1e})")


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


def _edge_cases(rng) -> list:
    """Weights whose edges a slip shows: an exact number of blocks with an all-zero block; a partial last
    block whose first number is its largest; a partial last block of zeros (absmax 1e-38 in bitsandbytes)."""
    blocksize = rng.choice([32, 64])
    exact = _weights(rng, [4 * blocksize], rng.choice(DTYPES))
    exact[blocksize:2 * blocksize] = 0
    partial = _weights(rng, _comparable([2 * blocksize + rng.integer(3, blocksize - 2)]), "float32")
    partial[2 * blocksize] = -3 * partial.abs().max()
    zeros = _weights(rng, _comparable([blocksize + rng.integer(1, blocksize - 2)]), rng.choice(DTYPES))
    zeros[blocksize:] = 0
    return [[exact, blocksize], [partial, blocksize], [zeros, blocksize]]


def _weight_cases(rng) -> list:
    if rng.grading:
        return [[_weights(rng, _random_shape(rng), rng.choice(DTYPES)), rng.choice([64, 128, 32])] for _ in range(4)] \
            + _edge_cases(rng)
    return [[_weights(rng, shape, dtype), 64] for dtype in DTYPES for shape in SHAPES]


def _where(W, blocksize) -> str:
    return f"{str(W.dtype).removeprefix('torch.')} weight of shape {tuple(W.shape)}" + \
        ("" if blocksize == 64 else f" (blocksize {blocksize})")


@judged_check
class quantize:
    """`quantize_nf4(W, blocksize)`: packed NF4 bytes and the per-block absmax, bit-exact with bitsandbytes."""
    answer = {"results": [[object]]}
    reference = ("lorakit.nf4.quantize_nf4",)

    def draw(rng):
        return {"cases": _weight_cases(rng)}

    def probe(inputs, fn):
        out = []
        for W, blocksize in inputs["cases"]:
            packed, state = _pair(fn(W.clone(), blocksize), "quantize_nf4")
            out.append([data_or_repr(packed), data_or_repr(getattr(state, "absmax", None))])
        return {"results": out}

    def judge(inputs, answer):
        F = _bnb()
        expect(len(answer["results"]) == len(inputs["cases"]), "`quantize_nf4` should answer once per call.")
        for (W, blocksize), (packed, absmax) in zip(inputs["cases"], answer["results"]):
            ref, ref_state = F.quantize_4bit(W, blocksize=blocksize, quant_type="nf4")
            where = _where(W, blocksize)
            expect(isinstance(packed, torch.Tensor) and packed.dtype == torch.uint8 and packed.shape == ref.shape,
                   f"{where}: packed should be uint8 of shape {tuple(ref.shape)}, found {_kind(packed)}.",
                   "two codes per byte: (ceil(n / 2), 1); pad an odd count with index 7 (the code for 0.0).")
            expect(isinstance(absmax, torch.Tensor) and absmax.shape == ref_state.absmax.shape
                   and torch.equal(absmax.float(), ref_state.absmax),
                   f"{where}: absmax should be fp32 of shape {tuple(ref_state.absmax.shape)} equal to bitsandbytes'.",
                   f"one absmax per block of {blocksize}, the last block may be shorter; compute it in fp32.")
            n_diff = (packed != ref).sum().item()
            expect(n_diff == 0, f"{where}: {n_diff} of {ref.numel()} packed bytes differ from bitsandbytes.", _diagnose(packed, ref))
        shapes = len({tuple(W.shape) for W, _ in inputs["cases"]})
        return f"quantize_nf4 is bit-exact with bitsandbytes for fp32, bf16 and fp16 and {shapes} shapes"


@judged_check
class dequantize:
    """`dequantize_nf4(packed, state)` of the learner's own `quantize_nf4`: bitsandbytes' values, bit for bit."""
    answer = {"results": [object]}
    reference = ("lorakit.nf4.dequantize_nf4",)

    def draw(rng):
        cases = _weight_cases(rng)
        return {"cases": [[W, 64] for W, _ in cases]}

    def probe(inputs, quantize_fn, dequantize_fn):
        out = []
        for W, blocksize in inputs["cases"]:
            packed, state = _pair(quantize_fn(W.clone(), blocksize), "quantize_nf4")
            out.append(data_or_repr(dequantize_fn(packed, state)))
        return {"results": out}

    def judge(inputs, answer):
        F = _bnb()
        expect(len(answer["results"]) == len(inputs["cases"]), "`dequantize_nf4` should answer once per call.")
        for (W, blocksize), out in zip(inputs["cases"], answer["results"]):
            ref_packed, ref_state = F.quantize_4bit(W, blocksize=blocksize, quant_type="nf4")
            with torch.compiler.set_stance("force_eager"):  # bnb would compile a kernel per odd shape
                ref = F.dequantize_4bit(ref_packed, ref_state, quant_type="nf4").reshape(W.shape)
            where = _where(W, blocksize)
            expect(isinstance(out, torch.Tensor) and out.dtype == W.dtype and tuple(out.shape) == tuple(W.shape),
                   f"{where}: expected a {str(W.dtype).removeprefix('torch.')} tensor of shape {tuple(W.shape)}, found "
                   f"{_kind(out)}.", "slice off the padding ([:n]), reshape to state.shape and cast to state.dtype at the very end.")
            n_diff = (out != ref).sum().item()
            expect(n_diff == 0, f"{where}: {n_diff} values differ from bitsandbytes' dequantize_4bit.",
                   "multiply code value by block absmax in fp32, and only then cast to the weight's dtype.")
        return "dequantize_nf4 equals bitsandbytes' dequantize_4bit bit for bit"


# ------------------------------------------------------------------------------ double quantization

@judged_check
class double_quant:
    """`double_quantize(absmax)`: the 8-bit codes, second-level absmax and offset of bitsandbytes'
    compress_statistics=True."""
    answer = {"results": [object]}
    reference = ("lorakit.nf4.double_quantize", "lorakit.nf4.quantize_dynamic_8bit", "lorakit.nf4.quantize_nf4")

    def draw(rng):
        shapes = [[rng.integer(20, 400), 64 * rng.integer(1, 6)] for _ in range(3)] if rng.grading else \
            [[256, 256], [100, 70], [4096, 64 * 3]]
        weights = [_weights(rng, shape, "float32") for shape in shapes]
        # one block far below the others: its absmax sits far below the mean, so the largest |absmax - mean|
        # of its group is negative (the second-level absmax is of |x|, not of x)
        quiet = rng.randn(rng.integer(8, 60), 64) * 0.02
        quiet[rng.integer(0, quiet.shape[0] - 1)] *= 1e-3
        return {"weights": weights + [quiet]}

    def probe(inputs, fn):
        F = _bnb()
        out = []
        for W in inputs["weights"]:
            _, plain = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
            codes, absmax2, offset = _pair(fn(plain.absmax.clone()), "double_quantize", 3)
            out.append([data_or_repr(codes), data_or_repr(absmax2),
                        data_or_repr(offset.item() if isinstance(offset, torch.Tensor) and offset.numel() == 1 else offset)])
        return {"results": out}

    def judge(inputs, answer):
        F = _bnb()
        expect(len(answer["results"]) == len(inputs["weights"]), "`double_quantize` should answer once per call.")
        for W, got in zip(inputs["weights"], answer["results"]):
            expect(isinstance(got, list) and len(got) == 3, "`double_quantize` should return three things: (codes, absmax2, offset).")
            codes, absmax2, offset = got
            _, plain = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
            _, ref = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
            where = f"the {plain.absmax.numel()} absmax values of a {tuple(W.shape)} weight"
            expect(close(offset, ref.offset.item(), rel=0), f"{where}: offset expected {ref.offset.item():.8g}, found {offset!r}.",
                   "offset = absmax.mean(), in fp32.")
            expect(isinstance(absmax2, torch.Tensor) and absmax2.shape == ref.state2.absmax.shape
                   and torch.equal(absmax2.float(), ref.state2.absmax),
                   f"{where}: second-level absmax should be {tuple(ref.state2.absmax.shape)} values equal to bitsandbytes'.",
                   "after subtracting the offset, one absmax per block of 256 (the last block may be shorter).")
            expect(isinstance(codes, torch.Tensor) and codes.dtype == torch.uint8 and codes.shape == ref.absmax.shape,
                   f"{where}: codes should be uint8 of shape {tuple(ref.absmax.shape)}, found {_kind(codes)}.")
            n_diff = (codes != ref.absmax).sum().item()
            expect(n_diff == 0, f"{where}: {n_diff} of {codes.numel()} codes differ from bitsandbytes.",
                   "round each scaled value to the nearest of the 65,536 grid points ((v + 1) * 0.5 * 65535 + 0.5, "
                   "truncated) and look that point up in the table.")
        return "double quantization equals bitsandbytes' compress_statistics=True code for code"


@judged_check
class bits:
    """`bits_per_param(blocksize, double_quant)`: bits stored per parameter with the quantization constants."""
    answer = {"bits": [object]}
    reference = ("lorakit.nf4.bits_per_param", "lorakit.memory.bits_per_param")

    def draw(rng):
        cases = [[64, False], [64, True], [128, False], [32, True]]
        if rng.grading:
            # both formulas, each at a blocksize that does not divide 32 evenly
            cases = [[rng.choice([64, 128, 256, 512, 1024]), dq] for dq in (False, True)] + \
                [[rng.choice([32, 64, 128, 256, 512, 1024]), rng.choice([False, True])] for _ in range(3)]
        return {"cases": cases}

    def probe(inputs, fn):
        return {"bits": [data_or_repr(fn(blocksize, dq)) for blocksize, dq in inputs["cases"]]}

    def judge(inputs, answer):
        from lorakit.nf4 import bits_per_param
        expect(len(answer["bits"]) == len(inputs["cases"]), "`bits_per_param` should answer once per call.")
        for (blocksize, dq), got in zip(inputs["cases"], answer["bits"]):
            want = bits_per_param(blocksize, dq)
            expect(close(got, want, rel=1e-9), f"bits_per_param({blocksize}, double_quant={dq}): expected {want:.6f}, "
                   f"found {got!r}.", "4 bits of code, plus 32 bits of fp32 absmax shared by a block; with double "
                   "quantization 8 bits per block plus 32 bits per 256 blocks.")
        return "bits per parameter: 4.5 without, 4.127 with double quantization"
