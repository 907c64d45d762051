"""The one-script GPU run (benchmarks/gpu_run.sh + gpu_checks.py), checked here on the CPU: its arguments,
its plan, and its measuring code in --dry-run (the same functions, small sizes). The run itself needs a
CUDA device; without one, `gpu_checks.py` refuses to start and says so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit import course, install

ROOT = course.course_root()
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_checks  # noqa: E402


def test_arguments_are_checked():
    args = gpu_checks.parse_args([])
    assert args.sections == list(gpu_checks.SECTIONS) and args.budget == 450 and not args.dry_run
    assert gpu_checks.parse_args(["--only", "nf4", "speed"]).sections == ["nf4", "speed"]
    for bad in (["--only", "nf5"], ["--reps", "0"], ["--budget", "-1"], ["--memory-models", "gpt-5"]):
        with pytest.raises(SystemExit):
            gpu_checks.parse_args(bad)


def test_the_plan_runs_every_lesson_on_cuda_and_lesson_05_reports(tmp_path):
    plan = dict(gpu_checks.lesson_plan(gpu_checks.parse_args([]), tmp_path))
    assert sorted(plan) == course.lessons() and list(plan)[0] == "05_qlora_finetune", "lesson 05 runs first"
    assert all(p["DEVICE"] == "cuda" for p in plan.values())
    assert plan["05_qlora_finetune"]["RESULTS_JSON"] == str((tmp_path / "05_qlora_finetune.json").resolve())
    shorter = dict(gpu_checks.lesson_plan(gpu_checks.parse_args(["--params", str(ROOT / ".ci/params.yml")]), tmp_path))
    assert shorter["02_lora"]["MAX_STEPS"] == 40 and shorter["02_lora"]["DEVICE"] == "cuda"


def test_budget_skips_what_does_not_fit():
    b = gpu_checks.Budget(30)
    assert b.allows("nf4") and not b.allows("memory")


def test_lesson05_row_reads_the_lessons_json(tmp_path):
    assert "no results" in gpu_checks.lesson05_row(tmp_path)[0][0]
    (tmp_path / "05_qlora_finetune.json").write_text(json.dumps(
        {"model_id": "lorakit/tiny-stories-llama", "device": "cuda", "compute_dtype": "bfloat16", "max_steps": 100,
         "before": 0.0, "after": 0.985, "train_seconds": 12.5, "peak_memory_bytes": 300 * 2**20}))
    [row] = gpu_checks.lesson05_row(tmp_path)
    assert row[4:] == ["0.0%", "98.5%", 12.5, "300 MiB"]


@pytest.mark.hardware
@pytest.mark.skipif(torch.cuda.is_available(), reason="this test is about refusing to run without a GPU")
def test_without_cuda_the_run_refuses_and_says_what_to_do(capsys):
    assert gpu_checks.main(["--only", "nf4"]) == 2
    assert "--dry-run" in capsys.readouterr().out


@pytest.mark.slow
def test_dry_run_measures_on_the_cpu(tmp_path):
    """The whole script through its shell entry point, on the CPU: every section prints its table (paged
    optimizers say they need CUDA), NF4 is bit-exact with bitsandbytes' CPU path, and the report is JSON."""
    res = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_run.sh"), "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**__import__("os").environ, "OUT": str(tmp_path),
                                                      "PYTHON": sys.executable})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    for title in ("lessons on cuda", "NF4: lorakit.nf4 vs bitsandbytes", "forward+backward", "paged optimizers",
                  "peak memory vs lorakit.memory.estimate", "LoftQ: peft's loftq_init", "lesson 05 before/after"):
        assert f"## {title}" in out, f"section {title!r} missing:\n{out}"
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert [r[2] for r in report["nf4"]["rows"]] == ["bit-exact"] * 4, report["nf4"]["rows"]
    assert report["paged"]["rows"][0][0] == "needs CUDA: not run on the CPU"
    assert sorted(r[0] for r in report["lessons"]["rows"]) == course.lessons()
    assert {r[1] for r in report["memory"]["rows"]} == {"lora", "qlora", "full"}
    assert all(r[2] > 0 for r in report["memory"]["rows"])
    assert [r[3].split("/")[0] for r in report["loftq"]["rows"]] == ["0"], report["loftq"]["rows"]  # CPU: bit-exact
    speed = report["speed"]["rows"][0]
    assert speed[1] > 0 and speed[2] > 0 and speed[4] < 0.05, speed


def test_the_wheels_to_carry_are_pinned_by_the_lock():
    """`gpu_run.sh fetch` asks pip for each package the GPU image lacks at its locked version."""
    res = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_run.sh"), "pins"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    pins = res.stdout.split()
    lock = install.read_lock()
    assert all("==" in p for p in pins) and len(pins) > 30 and any(p.startswith("bitsandbytes==") for p in pins)
    wrong = [p for p in pins if lock.get(install.normalize(p.split("==")[0])) != p.split("==")[1]]
    assert not wrong, f"not at the versions of {install.LOCK}: {wrong}"
