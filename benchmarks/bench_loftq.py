"""LoftQ measured (issue 18), in one run on the embedded model's weights (every linear layer of its blocks):

1. reconstruction error ||W - (dequant(Q) + s B A)|| over all layers, relative to plain NF4's ||W - dequant(Q)||
   (QLoRA's start, B A = 0), at r = 8, 16, 64 after 1 and 5 iterations;
2. equality with peft's own `loftq_init` on the same weights (bitsandbytes NF4 on both sides): the largest
   differences of dequant(Q), A and B;
3. the quantizer peft 0.17-0.19 fell back to without bitsandbytes 4-bit (`NFQuantizer`, removed in 0.20): it
   divides each block by its absmax and takes the nearest code by argmin |x - c| (ties to the lower code),
   where bitsandbytes multiplies by 1/absmax and counts the 15 midpoints strictly below
   (`lorakit.loftq.nfquantizer_roundtrip`, checked against peft 0.19.1's class: identical dequantized weights on a
   4096 x 4096 normal matrix and on the embedded model). Printed: how many values differ from bitsandbytes,
   and the error of each;
4. peft's LoftQ ignores the LoRA scaling (peft issue #1982): with alpha = 2r its adapters start at 2x the
   residual; the error of that start against lorakit's (which divides by the scaling).

    python benchmarks/bench_loftq.py
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lorakit.loftq import loftq_init, nfquantizer_roundtrip, peft_on_cpu  # noqa: E402
from lorakit.models import TINY, load_base  # noqa: E402
from lorakit.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, _ = load_base(TINY, device="cpu")
    weights = {n: m.weight.detach().float() for n, m in model.named_modules() if n.endswith("_proj")}
    print(f"{len(weights)} linear layers of {TINY}, {sum(w.numel() for w in weights.values()):,} weights\n")

    plain = sum(loftq_init(W, 1).plain_error ** 2 for W in weights.values()) ** 0.5
    print(f"plain NF4 (QLoRA's start): ||W - dequant(Q)|| = {plain:.4f} over all layers\n")
    print("| r | iterations | LoftQ error | LoftQ / plain NF4 |")
    print("|---:|---:|---:|---:|")
    for r in args.ranks:
        for it in args.iters:
            err = sum(loftq_init(W, r, num_iter=it).errors[-1] ** 2 for W in weights.values()) ** 0.5
            print(f"| {r} | {it} | {err:.4f} | {err / plain:.3f} |")

    from peft.utils.loftq_utils import loftq_init as peft_loftq_init

    worst = {"dequant(Q)": 0.0, "lora_A": 0.0, "lora_B": 0.0}
    for W in weights.values():
        with peft_on_cpu():
            q, A, B = peft_loftq_init(W, num_bits=4, reduced_rank=16, num_iter=2)
        mine = loftq_init(W, 16, num_iter=2)
        for key, a, b in [("dequant(Q)", mine.dequantize(), q), ("lora_A", mine.lora_A, A), ("lora_B", mine.lora_B, B)]:
            worst[key] = max(worst[key], (a - b).abs().max().item())
    print(f"\nlorakit vs peft loftq_init (r=16, 2 iterations, every layer), largest |difference|: "
          + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))

    tests = {"embedded model": torch.cat([W.reshape(-1) for W in weights.values()]),
             "normal 4096 x 4096": 0.02 * torch.randn(4096 * 4096, generator=torch.Generator().manual_seed(0))}
    print("\n| weights | codes that differ: NFQuantizer rule vs bitsandbytes | error NFQuantizer | error bitsandbytes |")
    print("|---|---:|---:|---:|")
    for name, flat in tests.items():
        packed, state = quantize_nf4(flat)
        deq_bnb = dequantize_nf4(packed, state)
        deq_old = nfquantizer_roundtrip(flat)
        differ = int((deq_bnb != deq_old).sum())
        print(f"| {name} | {differ} of {flat.numel():,} | {torch.linalg.norm(flat - deq_old):.6f} "
              f"| {torch.linalg.norm(flat - deq_bnb):.6f} |")

    r = 16
    W = next(iter(weights.values()))
    scaled = loftq_init(W, r, scaling=2.0)                    # alpha = 2r: s = 2
    peft_start = scaled.dequantize() + 2.0 * (2.0 * scaled.lora_B @ scaled.lora_A)   # peft's B A is s x ours
    print(f"\nalpha = 2r on {next(iter(weights))}: plain NF4 {scaled.plain_error:.4f}, lorakit LoftQ "
          f"{scaled.errors[-1]:.4f}, peft's LoftQ start (scaling ignored) {torch.linalg.norm(W - peft_start):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
