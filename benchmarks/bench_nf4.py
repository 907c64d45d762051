"""lorakit.nf4 against bitsandbytes on a 4096x4096 weight (issue 6): quantize and dequantize time,
side by side in one run, while checking that the bytes and the dequantized values are identical.

    python benchmarks/bench_nf4.py            # exits 1 when a result is not bit-exact
    python benchmarks/bench_nf4.py --size 2048 --repeats 5

Prints one table: dtype, operation, lorakit ms, bitsandbytes ms, ratio (lorakit / bitsandbytes), bit-exact.
The promise is bit-exactness; the ratio is measured, not promised: quantize is as fast as bitsandbytes' (its
quantize is torch code too), dequantize is plain torch against bitsandbytes' C++ kernel and takes a few times
its time, how many depends on the CPU's class (printed first: AVX512 or AVX2 kernels, native bf16 or not).
Timings alternate between the two implementations and keep the best of `--repeats`, so a busy machine slows
both alike. A last column, "floor ms", times allocating the output and writing it once
(`torch.empty(...).fill_(0)`): no dequantize can be faster, and it shows how much of bitsandbytes' dequantize
time is the first touch of fresh memory rather than decoding.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import torch  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402

from lorakit import env, nf4  # noqa: E402


def best_of(fns: dict, repeats: int) -> dict:
    """Best wall time (ms) of each function, calls interleaved so that load affects all alike."""
    for f in fns.values():
        f()  # warm-up (caches, lookup tables)
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], (time.perf_counter() - t) * 1e3)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--double-quant", action="store_true", help="also quantize the absmax (compress_statistics)")
    args = ap.parse_args()

    torch.manual_seed(0)
    rows, all_exact = [], True
    for dtype in (torch.bfloat16, torch.float32):
        W = (torch.randn(args.size, args.size) * 0.02).to(dtype)
        dq = args.double_quant
        packed, state = nf4.quantize_nf4(W, 64, double_quant=dq)
        ref, ref_state = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=dq)
        q_exact = torch.equal(packed, ref) and torch.equal(state.absmax, ref_state.absmax)
        d_exact = torch.equal(nf4.dequantize_nf4(packed, state), bnbF.dequantize_4bit(ref, ref_state, quant_type="nf4"))
        t = best_of({
            "q_ours": lambda: nf4.quantize_nf4(W, 64, double_quant=dq),
            "q_bnb": lambda: bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=dq),
            "d_ours": lambda: nf4.dequantize_nf4(packed, state),
            "d_bnb": lambda: bnbF.dequantize_4bit(ref, ref_state, quant_type="nf4"),
            "floor": lambda: torch.empty(W.numel(), dtype=dtype).fill_(0),
        }, args.repeats)
        name = str(dtype).removeprefix("torch.")
        rows.append((name, "quantize", t["q_ours"], t["q_bnb"], q_exact, None))
        rows.append((name, "dequantize", t["d_ours"], t["d_bnb"], d_exact, t["floor"]))
        all_exact &= q_exact and d_exact

    print(f"NF4, {args.size}x{args.size}, blocksize 64, double quantization {'on' if args.double_quant else 'off'}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; CPU: {env.cpu_class()}")
    print(f"{'dtype':<9} {'operation':<11} {'lorakit ms':>11} {'bnb ms':>9} {'ratio':>7}  {'bit-exact':<9}  floor ms")
    for name, op, ours, theirs, exact, floor in rows:
        print(f"{name:<9} {op:<11} {ours:>11.1f} {theirs:>9.1f} {ours / theirs:>7.2f}  {'yes' if exact else 'NO':<9}  "
              f"{'' if floor is None else f'{floor:.1f}'}")
    return 0 if all_exact else 1


if __name__ == "__main__":
    sys.exit(main())
