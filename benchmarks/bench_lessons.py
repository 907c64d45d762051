"""How long each lesson takes, cell by cell: every solution notebook run top to bottom with papermill, at its
default parameters or at CI's (.ci/params.yml), on this CPU as it is or as a plain AVX2 CPU.

The course promises that every lesson runs on a laptop CPU, and most laptops compute bf16 only by emulation
(no AVX512-BF16, no AMX). `--cpu avx2` turns this machine into such a CPU for the notebooks' kernels
(ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2) and checks that the switch really takes the slow path
(torch reports AVX2, oneDNN no bf16, emulated bf16 several times slower than float32) before anything runs.

Goals at default parameters, on 2 cores: no lesson over 10 minutes, the whole course under 45 minutes, and no
cell over 2 minutes without a progress bar. At CI's parameters the table says what the notebook part of
`make test` costs (each notebook runs twice there: the solution, then the student version).

    python benchmarks/bench_lessons.py                          # default parameters, this CPU; exits 1 on a missed goal
    python benchmarks/bench_lessons.py --params ci --cpu avx2 --lessons 02_lora 07_beyond_lora --json avx2.json
    python benchmarks/bench_lessons.py --table runs/*.json      # one table from earlier runs (merged per params and CPU)

Run it alone: two busy processes on two cores slow each other several times over.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lorakit import course, runner  # noqa: E402
from lorakit.env import scoped_environ  # noqa: E402

GOALS = {"lesson_seconds_max": 600.0, "course_seconds_max": 2700.0, "cell_without_bar_seconds_max": 120.0}
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
WIDGET = "application/vnd.jupyter.widget-view+json"
BAR = re.compile(r"\d+%\|")  # tqdm's text bar ("  45%|####5     | 9/20 [...]") where widgets do not render

PROBE = """
import json, statistics, torch
from lorakit import env
t = env.bf16_matmul_times(repeats=9)
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(),
                  "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                  "compute_dtype": str(env.compute_dtype("cpu")).removeprefix("torch."),
                  "why": env.cpu_bf16()[1], "threads": torch.get_num_threads(),
                  "bf16_over_fp32": statistics.median(t["bfloat16"]) / statistics.median(t["float32"])}))
"""


def probe(environ: dict) -> dict:
    """What the notebooks' kernels will see under `environ`: torch's CPU path, the dtype the kit picks, and the
    measured cost of bf16 against float32."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=600,
                         env={**os.environ, **environ})
    if out.returncode:
        raise SystemExit(f"the CPU probe failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_avx2(cpu: dict) -> None:
    """Stop when the AVX2 switches did not take the slow path: the table would measure the wrong CPU."""
    if cpu["capability"] != "AVX2" or cpu["onednn_bf16"] or cpu["compute_dtype"] != "float32":
        raise SystemExit(f"--cpu avx2 did not make this an AVX2-only CPU: {cpu}")
    if cpu["bf16_over_fp32"] < 3:
        raise SystemExit(f"--cpu avx2: bf16 costs only {cpu['bf16_over_fp32']:.1f}x float32 here, so it is not "
                         "emulated; the switches had no effect on this machine")


def has_bar(cell) -> bool:
    """The cell showed a progress bar: a tqdm widget, transformers' notebook bar (an HTML <progress>), or tqdm's
    text bar on stderr."""
    for o in cell.get("outputs", []):
        if WIDGET in o.get("data", {}) or "<progress" in str(o.get("data", {}).get("text/html", "")):
            return True
        if o.get("output_type") == "stream" and BAR.search(o.get("text", "")):
            return True
    return False


def label(cell) -> str:
    gid = cell.metadata.get("nbgrader", {}).get("grade_id")
    first = next((line for line in cell.source.splitlines() if line.strip()), "")[:60]
    return gid or first


def run_lesson(lesson: str, params: dict, out_dir: Path, environ: dict) -> dict:
    """Execute one solution notebook and read papermill's per-cell durations from the executed copy."""
    src = course.solution_path(lesson)
    dst = out_dir / f"{lesson}.ipynb"
    t0 = time.perf_counter()
    status, error, nb = "ok", "", None
    try:
        with scoped_environ(**environ):  # the kernel inherits this process's environment
            nb = runner.execute(src, dst, params, cwd=src.parent, timeout=3600)
    except Exception as e:  # a failed lesson is recorded as failed, with its cells so far
        status, error = "failed", runner.describe_failure(e, dst, lesson)
        if dst.is_file():
            import nbformat
            nb = nbformat.read(dst, as_version=4)
    seconds = time.perf_counter() - t0
    cells = []
    for i, cell in enumerate(nb.cells if nb else []):
        duration = cell.metadata.get("papermill", {}).get("duration")
        if cell.cell_type == "code" and duration is not None:
            cells.append({"index": i, "label": label(cell), "seconds": round(float(duration), 2),
                          "progress_bar": has_bar(cell)})
    return {"lesson": lesson, "status": status, "error": error, "seconds": round(seconds, 1), "cells": cells}


def slowest(row: dict, n: int = 2) -> str:
    top = sorted(row["cells"], key=lambda c: -c["seconds"])[:n]
    return "; ".join(f"{c['seconds']:.0f} s [{c['index']}] {c['label']}{'' if c['progress_bar'] else ' (no bar)'}"
                     for c in top)


def table(runs: list[dict]) -> str:
    """One Markdown table for the runs given (each run: parameters, CPU, dtype, lessons)."""
    lines = ["| lesson | params | CPU | dtype | seconds | slowest cells |", "|---|---|---|---|---:|---|"]
    for run in runs:
        ratios = run.get("bf16_over_fp32") or [run["probe"]["bf16_over_fp32"]]
        spread = f"{min(ratios):.1f}" + (f"-{max(ratios):.1f}" if len(ratios) > 1 else "")
        cpu = f"{run['cpu']} ({run['probe']['capability']}, bf16 {spread}x fp32)"
        for row in run["lessons"]:
            state = "" if row["status"] == "ok" else " FAILED"
            lines.append(f"| {row['lesson']} | {run['params']} | {cpu} | {run['probe']['compute_dtype']} "
                         f"| {row['seconds']:.0f}{state} | {slowest(row)} |")
        total = sum(r["seconds"] for r in run["lessons"])
        lines.append(f"| **all {len(run['lessons'])}** | {run['params']} | {cpu} | | **{total:.0f}** "
                     f"(**{total / 60:.1f} min**) | |")
    return "\n".join(lines)


def merge(runs) -> list[dict]:
    """Runs of the same parameters and CPU (lesson by lesson, say) as one run each, in course order."""
    merged: dict[tuple, dict] = {}
    for run in runs:
        key = (run["params"], run["cpu"])
        into = merged.setdefault(key, {**run, "lessons": [], "bf16_over_fp32": []})
        into["lessons"] += run["lessons"]
        into["bf16_over_fp32"].append(run["probe"]["bf16_over_fp32"])  # each run's probe: its spread
    order = {name: i for i, name in enumerate(course.lessons())}
    for run in merged.values():
        run["lessons"].sort(key=lambda row: order.get(row["lesson"], len(order)))
    return list(merged.values())


def missed_goals(run: dict) -> list[str]:
    """The goals (at default parameters) that this run misses, in words."""
    out = []
    for row in run["lessons"]:
        if row["status"] != "ok":
            out.append(f"{row['lesson']} failed: {row['error']}")
        if row["seconds"] > GOALS["lesson_seconds_max"]:
            out.append(f"{row['lesson']} took {row['seconds']:.0f} s (goal: at most {GOALS['lesson_seconds_max']:.0f})")
        for c in row["cells"]:
            if c["seconds"] > GOALS["cell_without_bar_seconds_max"] and not c["progress_bar"]:
                out.append(f"{row['lesson']} cell [{c['index']}] {c['label']!r} ran {c['seconds']:.0f} s without a "
                           f"progress bar (goal: at most {GOALS['cell_without_bar_seconds_max']:.0f})")
    total = sum(r["seconds"] for r in run["lessons"])
    if len(run["lessons"]) == len(course.lessons()) and total > GOALS["course_seconds_max"]:
        out.append(f"the whole course took {total:.0f} s (goal: at most {GOALS['course_seconds_max']:.0f})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", choices=("default", "ci"), default="default",
                    help="the notebooks' own parameters, or CI's (.ci/params.yml)")
    ap.add_argument("--cpu", choices=("native", "avx2"), default="native",
                    help="this CPU as it is, or switched to AVX2 only (no native bf16) for the kernels")
    ap.add_argument("--lessons", nargs="*", help="lesson names (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the executed notebooks (default: build/bench_lessons)")
    ap.add_argument("--json", type=Path, help="also write the run as JSON here (for --table)")
    ap.add_argument("--table", nargs="+", type=Path, metavar="JSON",
                    help="print one table from runs written earlier with --json, and run nothing")
    args = ap.parse_args(argv)

    if args.table:
        print(table(merge(json.loads(p.read_text()) for p in args.table)))
        return 0

    environ = AVX2 if args.cpu == "avx2" else {}
    cpu = probe(environ)
    if args.cpu == "avx2":
        check_avx2(cpu)
    params_file = course.course_root() / ".ci" / "params.yml" if args.params == "ci" else None
    params = course.load_params(params_file)
    out_dir = args.out or course.course_root() / "build" / "bench_lessons" / f"{args.params}-{args.cpu}"
    print(f"{args.params} parameters, {args.cpu} CPU: torch {cpu['capability']}, oneDNN bf16 {cpu['onednn_bf16']}, "
          f"bf16 matmul {cpu['bf16_over_fp32']:.1f}x float32's time, {cpu['threads']} threads; the kit computes in "
          f"{cpu['compute_dtype']} ({cpu['why']})", flush=True)
    run = {"params": args.params, "cpu": args.cpu, "probe": cpu, "lessons": []}
    for lesson in course.select(args.lessons):
        row = run_lesson(lesson, course.params_for(lesson, params), out_dir, environ)
        run["lessons"].append(row)
        print(f"{lesson:<24} {row['status']:<6} {row['seconds']:7.1f} s   slowest: {slowest(row)}", flush=True)
        if args.json:  # after every lesson, so an interrupted run keeps what it measured
            args.json.write_text(json.dumps(run, indent=1))
    print()
    print(table([run]))
    if args.params == "default":
        missed = missed_goals(run)
        for line in missed:
            print("goal missed:", line)
        return 1 if missed else 0
    return 0 if all(r["status"] == "ok" for r in run["lessons"]) else 1


if __name__ == "__main__":
    sys.exit(main())
