"""benchmarks/bench_lessons.py: what counts as a progress bar, which goals a run misses, how runs measured lesson
by lesson merge into one table, and (with the notebook runs) that a real run records every code cell's time."""

import sys

import nbformat
import pytest

from lorakit import course

sys.path.insert(0, str(course.course_root() / "benchmarks"))
import bench_lessons as bench  # noqa: E402


def _cell(*outputs):
    c = nbformat.v4.new_code_cell("for step in tqdm(range(100)): ...")
    c.outputs = [nbformat.from_dict(o) for o in outputs]
    return c


def test_a_progress_bar_is_a_tqdm_widget_or_text_bar():
    widget = {"output_type": "display_data", "metadata": {},
              "data": {bench.WIDGET: {"model_id": "x", "version_major": 2, "version_minor": 0}, "text/plain": "..."}}
    text_bar = {"output_type": "stream", "name": "stderr", "text": "fine-tuning:  45%|####5     | 9/20 [00:02<00:03]"}
    trainer = {"output_type": "display_data", "metadata": {},  # transformers' NotebookProgressCallback
               "data": {"text/html": "<div><progress value='10' max='100'></progress> [10/100 00:03]</div>",
                        "text/plain": "<IPython.core.display.HTML object>"}}
    plain = {"output_type": "stream", "name": "stdout", "text": "exact match 45% after 20 steps | done"}
    assert bench.has_bar(_cell(widget)) and bench.has_bar(_cell(plain, text_bar)) and bench.has_bar(_cell(trainer))
    assert not bench.has_bar(_cell(plain)) and not bench.has_bar(_cell())


def _run(lessons, params="default", cpu="avx2"):
    probe = {"capability": "AVX2", "onednn_bf16": False, "compute_dtype": "float32", "why": "", "threads": 2,
             "bf16_over_fp32": 20.0}
    return {"params": params, "cpu": cpu, "probe": probe, "lessons": lessons}


def _lesson(name, seconds, cells=(), status="ok"):
    return {"lesson": name, "status": status, "error": "" if status == "ok" else "boom", "seconds": seconds,
            "cells": [{"index": i, "label": f"cell {i}", "seconds": s, "progress_bar": bar}
                      for i, (s, bar) in enumerate(cells)]}


def test_goals_name_the_long_lesson_the_long_cell_without_a_bar_and_a_failure():
    run = _run([_lesson("02_lora", 700, [(300, True), (10, False)]),
                _lesson("03_nf4", 200, [(150, False), (40, False)]),
                _lesson("04_qlora_from_scratch", 30, [(30, False)], status="failed")])
    missed = bench.missed_goals(run)
    assert any(m.startswith("02_lora took 700 s") for m in missed)
    assert any("03_nf4 cell [0]" in m and "without a progress bar" in m for m in missed)
    assert not any("02_lora cell" in m for m in missed)            # 300 s, but with a bar
    assert any(m.startswith("04_qlora_from_scratch failed") for m in missed)
    assert not any("whole course" in m for m in missed)            # three lessons are not the course
    assert bench.missed_goals(_run([_lesson("00_setup", 20, [(5, False)])])) == []


def test_the_course_total_counts_when_every_lesson_ran():
    names = course.lessons()
    run = _run([_lesson(n, 2700 / len(names) + 1, [(5, False)]) for n in names])
    assert [m for m in bench.missed_goals(run) if "whole course" in m]
    run = _run([_lesson(n, 2700 / len(names) - 1, [(5, False)]) for n in names])
    assert bench.missed_goals(run) == []


def test_runs_measured_lesson_by_lesson_merge_per_parameters_and_cpu():
    runs = [_run([_lesson("02_lora", 60)]), _run([_lesson("00_setup", 10)]), _run([_lesson("00_setup", 5)], cpu="native")]
    merged = bench.merge(runs)
    assert [(r["params"], r["cpu"], [x["lesson"] for x in r["lessons"]]) for r in merged] == \
        [("default", "avx2", ["00_setup", "02_lora"]), ("default", "native", ["00_setup"])]
    table = bench.table(merged)
    assert "| **all 2** | default | avx2" in table and "**70**" in table


def test_the_avx2_check_refuses_a_cpu_that_is_not_on_the_slow_path():
    slow = {"capability": "AVX2", "onednn_bf16": False, "compute_dtype": "float32", "bf16_over_fp32": 20.0}
    bench.check_avx2(slow)
    for wrong in ({"capability": "AVX512"}, {"onednn_bf16": True}, {"compute_dtype": "bfloat16"}, {"bf16_over_fp32": 0.8}):
        with pytest.raises(SystemExit, match="avx2"):
            bench.check_avx2({**slow, **wrong})


@pytest.mark.notebooks
def test_a_real_run_times_every_code_cell(tmp_path):
    params = course.params_for("00_setup", course.load_params(course.course_root() / ".ci" / "params.yml"))
    row = bench.run_lesson("00_setup", params, tmp_path, {})
    nb = nbformat.read(course.solution_path("00_setup"), as_version=4)
    assert row["status"] == "ok", row["error"]
    # every code cell of the lesson, plus the cell papermill injects with the parameters
    assert len(row["cells"]) == sum(c.cell_type == "code" for c in nb.cells) + 1
    assert 0 < sum(c["seconds"] for c in row["cells"]) <= row["seconds"]
