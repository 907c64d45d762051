"""The measured promise of lorakit.lora (issue 5), side by side in one run:

- `LoRALinear` forward+backward time / peft's LoRA `Linear` forward+backward time on the same shapes
  (hidden 512-4096, r=8, the same weights): <= 1.05;
- a merged `LoRALinear`'s forward time / a plain `nn.Linear`'s forward time: <= 1.02.

    python benchmarks/bench_lora.py              # exits 1 when a promise is not met
    python benchmarks/bench_lora.py --hidden 512 1024 --tokens 128 --budget 1

Calls of the two contenders are interleaved one by one and each is timed; the ratio reported is the
median time of one call over the other's, so a busy machine slows both alike and preempted calls drop
out of the medians. One torch thread by default: on a shared machine OpenMP threads fight each other. Prints one table of ratios (and the absolute milliseconds, for context only).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lorakit.lora import LoRALinear  # noqa: E402

PROMISE = {"fwd_bwd_vs_peft": 1.05, "merged_vs_linear": 1.02}


class _Holder(nn.Module):
    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def peft_linear(base: nn.Linear, mine: LoRALinear) -> nn.Module:
    """peft's LoRA Linear (made by get_peft_model) around the same frozen `base`, with the same A and B as
    `mine`: one weight in memory for both, so that memory placement cannot tilt the ratio."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_Holder(base),
                               LoraConfig(r=mine.r, lora_alpha=mine.lora_alpha, lora_dropout=0.0, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(mine.lora_A.weight)
        layer.lora_B["default"].weight.copy_(mine.lora_B.weight)
    return layer


def fwd_bwd(layer, x):
    def step():
        layer(x).sum().backward()
        x.grad = None
        for p in layer.parameters():
            p.grad = None
    return step


def fwd(layer, x):
    @torch.no_grad()
    def step():
        layer(x)
    return step


def ratio(a, b, calls: int) -> tuple[float, float, float]:
    """median time of one call of `a` / median time of one call of `b`, with the calls interleaved
    (a b b a a b ...) so that both see the same machine; the medians drop calls a busy machine preempted."""
    for f in (a, b, a, b):  # warm up
        f()
    ta, tb = [], []
    for k in range(calls):
        for f, out in (((a, ta), (b, tb)) if k % 2 == 0 else ((b, tb), (a, ta))):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
    ma, mb = statistics.median(ta), statistics.median(tb)
    return ma / mb, ma * 1e3, mb * 1e3


def layer_arguments(description: str, argv=None) -> argparse.Namespace:
    """The layer benchmarks' common options (shapes, rank, threads, time budget), applied: the thread count
    and seed are set and the run's header printed."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256, help="rows of the input (batch x sequence)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 keeps a shared machine's OpenMP contention out of the ratios")
    p.add_argument("--budget", type=float, default=3.0, help="seconds per contender and measurement (sets the calls)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, r={args.rank}, "
          f"median of interleaved calls\n")
    return args


def calls_within(step, budget: float) -> int:
    """How many calls of `step` fit in `budget` seconds (one call timed; at least 5)."""
    t0 = time.perf_counter()
    step()
    return max(5, int(budget / max(time.perf_counter() - t0, 1e-6)))


def print_table(header: str, rows, ok: bool) -> int:
    """The ratio table (two ratios per shape, each with its milliseconds) and the verdict; the exit code."""
    print(header)
    print("|---:|---:|---:|---:|---:|")
    for h, r1, a, b, r2, c, d in rows:
        print(f"| {h} | {r1:.3f} | {a:.2f}, {b:.2f} | {r2:.3f} | {c:.2f}, {d:.2f} |")
    print("\npromise met" if ok else "\npromise NOT met")
    return 0 if ok else 1


def main(argv=None) -> int:
    args = layer_arguments(__doc__.split("\n")[0], argv)
    rows, ok = [], True
    for h in args.hidden:
        base = nn.Linear(h, h, bias=False)
        mine = LoRALinear(base, r=args.rank, alpha=2 * args.rank)
        nn.init.normal_(mine.lora_B.weight, std=0.02)
        theirs = peft_linear(base, mine)
        x = torch.randn(args.tokens, h, requires_grad=True)  # inside a network the input needs a gradient too
        torch.testing.assert_close(mine(x), theirs(x))      # the same computation, or the timing means nothing

        n = calls_within(fwd_bwd(mine, x), args.budget)
        r1, ms_mine, ms_peft = ratio(fwd_bwd(mine, x), fwd_bwd(theirs, x), n)

        merged = LoRALinear(copy.deepcopy(base), r=args.rank, alpha=2 * args.rank)
        merged.merge()
        plain = merged.base_layer  # the same nn.Linear called directly: what the wrapper costs and nothing else
        xi = x.detach()
        r2, ms_merged, ms_plain = ratio(fwd(merged, xi), fwd(plain, xi), 2 * n)
        rows.append((h, r1, ms_mine, ms_peft, r2, ms_merged, ms_plain))
        ok &= r1 <= PROMISE["fwd_bwd_vs_peft"] and r2 <= PROMISE["merged_vs_linear"]

    return print_table(f"| hidden | LoRALinear fwd+bwd / peft (<= {PROMISE['fwd_bwd_vs_peft']}) | ms: ours, peft "
                       f"| merged fwd / nn.Linear (<= {PROMISE['merged_vs_linear']}) | ms: merged, plain |", rows, ok)

if __name__ == "__main__":
    sys.exit(main())
