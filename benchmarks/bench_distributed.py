"""Lesson 08 on this machine's CPUs: LoRA fine-tuning of the embedded model in one process with T torch threads
against T processes with one thread each (data parallel over gloo: DDP, and FSDP2), the same total threads and
the same optimizer steps on the same global batches. Runs are interleaved and repeated; the table shows the
median and the range of training throughput (real tokens per second of training, imports and loading left
out), and the ratio to one process.

Its promise is correctness, not speed: every multi-process run ends with the adapter one process trains on the
combined batches (to 1e-4: float rounding; the per-rank-mean trap is off by 1e-2), and each FSDP rank holds 1/T
of the weights. Exits 1 otherwise.

    python benchmarks/bench_distributed.py               # T = 2, 3 repeats of 30 steps
    python benchmarks/bench_distributed.py --repeats 5 --steps 60
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lorakit import distributed, launch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, default=2, help="T: processes (and threads of the one-process run)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--global-batch", type=int, default=8)
    args = p.parse_args(argv)
    t = args.procs
    setups = {f"1 process x {t} threads": (1, t, "none"), f"{t} processes x 1 thread, DDP": (t, 1, "none"),
              f"{t} processes x 1 thread, FSDP2": (t, 1, "fsdp")}
    speeds = {name: [] for name in setups}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name, (nproc, threads, sharding) in setups.items():
                folder = Path(tmp) / f"{rep}-{nproc}-{sharding}"
                cfg = distributed.RunConfig(out_dir=str(folder / "out"), max_steps=args.steps, threads=threads,
                                            global_batch_size=args.global_batch, sharding=sharding, n_train=512)
                run = launch.accelerate_launch(launch.write_launch_files(folder, cfg, nproc), timeout=900)
                speeds[name].append(run.tokens_per_second)
                results[name] = (run.adapter_weights(), run)
                print(f"repeat {rep + 1}/{args.repeats}  {name:<34} {run.tokens_per_second:8,.0f} tokens/s", flush=True)

    first = speeds[next(iter(setups))]
    base = statistics.median(first)
    print(f"\n{'setup':<34} {'tokens/s (median)':>18} {'range':>18} {'ratio':>7}")
    for name, v in speeds.items():
        overlap = v is not first and min(v) <= max(first) and min(first) <= max(v)
        print(f"{name:<34} {statistics.median(v):>18,.0f} {min(v):>8,.0f}-{max(v):<9,.0f} {statistics.median(v) / base:>7.2f}"
              + ("  (ranges overlap: not distinguishable)" if overlap else ""))

    ok = True
    reference, one = results[next(iter(setups))]
    for name, (weights, run) in list(results.items())[1:]:
        diff = max((weights[k] - reference[k]).abs().max().item() for k in reference)
        same = diff <= 1e-4
        print(f"{name}: largest adapter difference from one process {diff:.2e} ({'same' if same else 'DIFFERENT'})")
        ok &= same
        if "FSDP" in name:
            shares = [r["local_param_bytes"] / one.ranks[0]["local_param_bytes"] for r in run.ranks]
            print(f"{name}: each rank holds {', '.join(f'{s:.3f}' for s in shares)} of the weights")
            ok &= all(abs(s - 1 / t) < 0.01 for s in shares)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
