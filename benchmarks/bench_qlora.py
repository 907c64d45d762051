"""The measured promise of lorakit.qlora (issue 7), side by side with the real libraries in one run:

1. speed: `QLoRALinear` forward+backward / bitsandbytes `Linear4bit` (nf4, double quantization) wrapped
   by peft's LoRA layer, forward+backward, on the same shapes, same adapters: <= 1.2;
2. memory: the bytes the quantized linears of a Llama (the course model's shapes) hold, in bits per
   weight, / the 4.127-bit limit of NF4 + double quantization: <= 1.05.

    python benchmarks/bench_qlora.py              # exits 1 when a promise is not met
    python benchmarks/bench_qlora.py --reps 20 --threads 2 --dtype bfloat16

Also printed, because it explains the speed ratio: dequantization alone (lorakit.nf4 in plain torch vs
bitsandbytes' C++ kernel). Timings alternate between the two contenders and keep the best of each (CPU
time with one thread), so a busy machine disturbs both alike.

Both compute in `lorakit.env.compute_dtype("cpu")`, what the lessons use: bf16 on a CPU with bf16 units,
float32 on others (emulated bf16 made this benchmark run for more than 10 minutes on a 2-core AVX2 CPU).
The first line names the CPU's class: the ratios differ between classes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lorakit import env, nf4, qlora  # noqa: E402
from lorakit.footprint import quant_state_tensors  # noqa: E402

PROMISE = {"speed_ratio_max": 1.2, "bits_ratio_max": 1.05}
# (in_features, out_features, tokens per batch): the course model's MLP, then wider layers
SHAPES = [(192, 512, 1024), (1024, 1024, 1024), (2048, 2048, 512), (4096, 4096, 256)]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


CLOCK = time.perf_counter


def _median_pair(fa, fb, reps: int) -> tuple[float, float]:
    fa(), fb()  # warm up
    ta, tb = [], []
    for _ in range(reps):
        for f, out in ((fa, ta), (fb, tb)):
            t0 = CLOCK()
            f()
            out.append(CLOCK() - t0)
    return min(ta), min(tb)  # the least disturbed run: timeit's advice for a busy machine


def speed(reps: int, rank: int, dtype: torch.dtype) -> list[dict]:
    import bitsandbytes.functional as BF

    rows = []
    for d_in, d_out, tokens in SHAPES:
        torch.manual_seed(0)
        lin = nn.Linear(d_in, d_out, bias=False)
        ours = qlora.QLoRALinear.from_linear(lin, rank, 2 * rank, compute_dtype=dtype)
        theirs = qlora.bitsandbytes_lora(lin, rank, 2 * rank, compute_dtype=dtype)
        qlora.copy_adapters(ours, theirs)
        x = torch.randn(tokens, d_in, dtype=dtype, requires_grad=True)

        def step(layer):
            def run():
                layer(x).float().square().mean().backward()
            return run

        t_ours, t_bnb = _median_pair(step(ours), step(theirs), reps)
        base = ours.base_layer
        packed_b, state_b = theirs.base_layer.weight.data, theirs.base_layer.weight.quant_state
        d_ours, d_bnb = _median_pair(lambda: nf4.dequantize_nf4(base.weight, base.quant_state, dtype),
                                     lambda: BF.dequantize_4bit(packed_b, state_b).to(dtype), reps)
        rows.append({"shape": f"{d_out}x{d_in}, {tokens} tok", "ours_ms": t_ours * 1e3, "bnb_ms": t_bnb * 1e3,
                     "ratio": t_ours / t_bnb, "deq_ratio": d_ours / d_bnb})
    return rows


def bits() -> dict:
    """Bits per weight held by the quantized linears of a random-init Llama with the course model's sizes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.tooling.pretrain import MODEL_CONFIG

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG))
    linears = {n: m for n, m in model.named_modules() if n.split(".")[-1] in ALL_LINEAR}
    n_weights = sum(m.weight.numel() for m in linears.values())
    twins = [qlora.bitsandbytes_lora(m).base_layer.weight for m in linears.values()]  # kept alive while counted
    seen, bnb_bytes = set(), 0
    for p in twins:  # the same weights through bitsandbytes, each tensor counted once
        for t in [p, *quant_state_tensors(p)]:
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                bnb_bytes += t.numel() * t.element_size()
    qlora.quantize_and_inject(model, ALL_LINEAR)
    ours = qlora.stored_bits_per_param(model)
    limit = nf4.bits_per_param(64, double_quant=True)
    return {"weights": n_weights, "ours": ours, "bnb": 8 * bnb_bytes / n_weights, "limit": limit,
            "ratio": ours / limit}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype (auto: lorakit.env.compute_dtype, bf16 only where native)")
    args = p.parse_args(argv)
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.get_num_threads() == 1:
        # One thread: count the CPU time this process spends, which other processes on a busy machine
        # do not inflate (wall-clock time does, by several times on 2 shared cores).
        CLOCK = time.process_time

    dtype = env.compute_dtype("cpu") if args.dtype == "auto" else getattr(torch, args.dtype)
    print(f"CPU: {env.cpu_class()}", flush=True)
    rows = speed(args.reps, args.rank, dtype)
    clock = "CPU time" if CLOCK is time.process_time else "wall time"
    print(f"forward+backward, {str(dtype).removeprefix('torch.')} compute, LoRA r={args.rank}, "
          f"{torch.get_num_threads()} thread(s), best {clock} of {args.reps}")
    print(f"{'shape (out x in, tokens)':<26}{'lorakit ms':>11}{'bnb+peft ms':>12}{'ratio':>8}{'dequant ratio':>15}")
    for r in rows:
        print(f"{r['shape']:<26}{r['ours_ms']:>11.2f}{r['bnb_ms']:>12.2f}{r['ratio']:>8.2f}{r['deq_ratio']:>15.2f}")
    b = bits()
    print(f"\nquantized linears of the course model's shapes ({b['weights']:,} weights), bits per weight:")
    print(f"  lorakit {b['ours']:.4f}   bitsandbytes {b['bnb']:.4f}   limit {b['limit']:.4f}   "
          f"lorakit / limit = {b['ratio']:.4f}")

    worst = max(r["ratio"] for r in rows)
    ok_speed = worst <= PROMISE["speed_ratio_max"]
    ok_bits = b["ratio"] <= PROMISE["bits_ratio_max"]
    print(f"\npromise: speed ratio <= {PROMISE['speed_ratio_max']} (worst {worst:.2f}): {'met' if ok_speed else 'NOT met'}; "
          f"bits ratio <= {PROMISE['bits_ratio_max']} ({b['ratio']:.4f}): {'met' if ok_bits else 'NOT met'}")
    return 0 if ok_speed and ok_bits else 1


if __name__ == "__main__":
    sys.exit(main())
