"""`lorakit sweep` and lorakit.sweep: grids, validation before any run, failures recorded mid-sweep, results
files, the committed full-grid results, and the reference answers of lesson 06's exercises."""

import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest

from lorakit import course, memory, models, sweep
from lorakit.checks import CheckFailed
from lorakit.checks import lab as check


def grid(**studies):
    return {"name": "t", "parameters": {"MAX_STEPS": 2}, "base": {"r": 8, "alpha": 16}, "studies": studies}


# ----------------------------------------------------------------------------------------------- grids

def test_studies_expand_and_shared_configurations_run_once():
    g = sweep.load_grid(grid(rank={"r": [2, 8]}, methods={"method": ["lora", "qlora"]}))
    assert [s for s, _ in g.entries] == ["rank", "rank", "methods", "methods"]
    assert [c.name for c in g.configs] == ["lora_r2_a16_q+v", "lora_r8_a16_q+v", "qlora_r8_a16_q+v"]


def test_products_lists_of_mappings_alpha_multiples_and_module_lists():
    g = sweep.load_grid(grid(
        both={"r": [1, 4], "alpha": "2r", "use_rslora": [False, True]},
        pairs=[{"target_modules": ["q_proj", "v_proj"], "r": 19}, {"target_modules": "all-linear", "r": 4}],
        targets={"target_modules": [["q_proj"], "all-linear"], "N_TRAIN": 64}))
    both = [c for s, c in g.entries if s == "both"]
    assert [(c.r, c.alpha, c.use_rslora) for c in both] == [(1, 2, False), (1, 2, True), (4, 8, False), (4, 8, True)]
    assert both[1].scaling == 2.0 and both[3].scaling == 4.0  # alpha / sqrt(r) with rsLoRA
    pairs = [c for s, c in g.entries if s == "pairs"]
    assert [c.target_modules for c in pairs] == [("q_proj", "v_proj"), "all-linear"]
    targets = [c for s, c in g.entries if s == "targets"]
    assert [c.target_modules for c in targets] == [("q_proj",), "all-linear"]
    assert targets[0].notebook_parameters()["N_TRAIN"] == 64
    assert targets[0].notebook_parameters()["TARGET_MODULES"] == ["q_proj"]


@pytest.mark.parametrize("bad, words", [
    ({"r": [4, 0]}, ["'rank'", "r=0", "positive whole number"]),
    ({"r": 2.5}, ["r=2.5", "positive whole number"]),
    ({"r": True}, ["r=True"]),
    ({"r": "8"}, ["r='8'"]),
    ({"method": ["lora", "qlora4"]}, ["method='qlora4'", "'lora', 'qlora'"]),
    ({"alpha": "two r"}, ["alpha='two r'", "'2r'"]),
    ({"alpha": -1}, ["alpha=-1"]),
    ({"dropout": 1.0}, ["dropout=1.0"]),
    ({"use_rslora": "yes"}, ["use_rslora='yes'"]),
    ({"rank": 8}, ["unknown field", "'rank'"]),
    ({"target_modules": []}, ["target_modules=[]"]),
])
def test_bad_values_are_rejected_with_the_entry_named(bad, words):
    with pytest.raises(sweep.SweepError) as e:
        sweep.load_grid(grid(rank=bad))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_grid_file_problems_are_explained(tmp_path):
    with pytest.raises(sweep.SweepError, match="not found"):
        sweep.load_grid(tmp_path / "nope.yml")
    (tmp_path / "g.yml").write_text("studies: {}\n")
    with pytest.raises(sweep.SweepError, match="no studies"):
        sweep.load_grid(tmp_path / "g.yml")
    (tmp_path / "g.yml").write_text("studdies: {a: {r: [1]}}\n")
    with pytest.raises(sweep.SweepError, match="unknown key"):
        sweep.load_grid(tmp_path / "g.yml")


def test_unknown_module_and_unknown_parameter_are_rejected_against_the_model_and_notebook():
    assert sweep.linear_module_names(models.TINY) == models.ALL_LINEAR
    with pytest.raises(sweep.SweepError) as e:
        sweep.validate(sweep.load_grid(grid(t={"target_modules": [["q_proj", "query"]]})))
    assert "'query'" in str(e.value) and "q_proj" in str(e.value) and "study 't'" in str(e.value)
    with pytest.raises(sweep.SweepError, match="MAX_STEP'"):
        sweep.validate(sweep.load_grid({**grid(a={"r": 2}), "parameters": {"MAX_STEP": 3}}))
    with pytest.raises(sweep.SweepError, match="set per configuration"):
        sweep.validate(sweep.load_grid(grid(a={"r": 2})), {"LORA_R": 4})
    with pytest.raises(sweep.SweepError, match="N_TRAINS"):
        sweep.validate(sweep.load_grid(grid(a={"N_TRAINS": 2})))


@pytest.mark.parametrize("name", ["reduced", "full"])
def test_shipped_grids_are_valid(name):
    g = sweep.load_grid(name)
    sweep.validate(g)
    assert {"rank", "lora_vs_qlora"} <= set(g.studies())


def test_full_grid_covers_the_issue_and_its_equal_budget_pair_is_equal():
    g = sweep.load_grid("full")
    studies = {s: [c for t, c in g.entries if t == s] for s in g.studies()}
    assert sorted({c.r for c in studies["rank"]}) == [1, 2, 8, 64]
    assert all(c.alpha == 2 * c.r for c in studies["rank_alpha_2r"])
    assert all(c.use_rslora for c in studies["rank_rslora"])
    assert sorted(c.dropout for c in studies["dropout_small_data"]) == [0.0, 0.05, 0.1]
    cfg = memory.config(models.resolve(models.TINY))
    a, b = studies["targets_equal_budget"]
    assert memory.lora_parameters(cfg, a.r, list(a.target_modules)) == memory.lora_parameters(cfg, b.r, b.target_modules)
    methods = [c.method for c in studies["lora_vs_qlora"]]
    assert methods.count("lora") == methods.count("qlora") >= 2
    names = {c.name for c in g.configs}  # the runs lesson 06's prediction check reads
    assert {check.LORA_R2, check.LORA_R8, check.QLORA_R8} <= names
    assert {check.LORA_R2, check.LORA_R8, check.QLORA_R8} == {c.name for c in sweep.load_grid("reduced").configs}


# --------------------------------------------------------------------------------------------- running

FAKE_PARAMETERS = """
MODEL_ID = "lorakit/tiny-stories-llama"
METHOD = "lora"
LORA_R = 8
LORA_ALPHA = 16
LORA_DROPOUT = 0.0
USE_RSLORA = False
TARGET_MODULES = ["q_proj", "v_proj"]
MAX_STEPS = 10
N_TRAIN = 0
THREADS = 0
RESULT_JSON = ""
"""
FAKE_BODY = """
import json, pathlib
if LORA_R == 3:
    raise RuntimeError("this configuration breaks on purpose")
pathlib.Path(RESULT_JSON).write_text(json.dumps({
    "exact_match": 1 - 1 / LORA_R, "trainable_params": 768 * LORA_R, "model_bytes": 1000 if METHOD == "qlora" else 3000,
    "peak_memory_bytes": 10 * LORA_R, "step_seconds": 1.5 if METHOD == "qlora" else 1.0, "train_seconds": MAX_STEPS,
    "final_loss": 0.1, "steps": MAX_STEPS, "device": "cpu", "threads": THREADS}))
"""


@pytest.fixture(scope="module")
def fake_notebook(tmp_path_factory):
    path = tmp_path_factory.mktemp("nb") / "fake.ipynb"
    course.write_clean(course.notebook([course.parameters(FAKE_PARAMETERS), course.code(FAKE_BODY)]), path)
    return path


def test_a_failing_configuration_is_recorded_and_the_sweep_goes_on(fake_notebook, tmp_path):
    g = sweep.load_grid(grid(rank={"r": [3, 2]}, methods={"method": ["lora", "qlora"]}))
    table = sweep.run_sweep(g, tmp_path, notebook=fake_notebook, progress=False)
    assert list(table.columns) == list(sweep.COLUMNS)
    assert list(table.status) == ["failed", "ok", "ok", "ok"]
    assert "RuntimeError: this configuration breaks on purpose" in table.error[0]
    assert table.exact_match[1] == 0.5 and math.isnan(table.exact_match[0])
    assert table.steps[1] == 2  # the grid's shared parameters reached the notebook
    again = sweep.read_results(tmp_path / "results.csv")
    assert list(again.name) == list(table.name) and list(again.status) == list(table.status)
    records = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in records] == ["failed", "ok", "ok", "ok"]
    assert sweep.qlora_overhead(table) == pytest.approx(0.5)


def test_workers_run_in_parallel_with_their_share_of_threads(fake_notebook, tmp_path):
    g = sweep.load_grid(grid(rank={"r": [1, 2]}))
    table = sweep.run_sweep(g, tmp_path, notebook=fake_notebook, progress=False, workers=2)
    assert list(table.status) == ["ok", "ok"]
    assert set(table.threads) == {max(1, (os.cpu_count() or 1) // 2)}


def test_the_real_experiment_notebook_runs_one_configuration(tmp_path):
    cfg = sweep.load_grid(grid(one={"r": 2})).configs[0]
    row = sweep.run_config(cfg, tmp_path, {"MAX_STEPS": 2, "N_EVAL": 4, "DEVICE": "cpu", "THREADS": 1})
    assert row["status"] == "ok", row["error"]
    assert row["trainable_params"] == memory.lora_parameters(memory.config(models.resolve(models.TINY)), 2,
                                                             ["q_proj", "v_proj"])
    assert 0 <= row["exact_match"] <= 1 and row["step_seconds"] > 0 and row["peak_memory_bytes"] > 0
    assert row["base_dtype"] == "bfloat16" and row["steps"] == 2


# --------------------------------------------------------------------------------------------- the CLI

def lorakit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lorakit.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_rejects_a_bad_grid_before_any_run(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("studies:\n  rank: {r: [4, 0]}\n")
    res = lorakit("sweep", "--grid", str(bad), "--out", str(tmp_path / "out"))
    assert res.returncode == 2, res.stderr
    assert "r=0" in res.stderr and "'rank'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
    bad.write_text("studies:\n  t: {target_modules: [[q_proj, attn]]}\n")
    res = lorakit("sweep", "--grid", str(bad), "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and "'attn'" in res.stderr and not (tmp_path / "out").exists()
    res = lorakit("sweep", "--reduced", "--set", "MAX_STEPZ=3", "--dry-run")
    assert res.returncode == 2 and "MAX_STEPZ" in res.stderr


def test_cli_dry_run_lists_the_full_grid():
    res = lorakit("sweep", "--full", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "configurations in 6 studies" in res.stdout
    assert "qlora_r8_a16_q+v" in res.stdout and "lora_r19_a38_q+v" in res.stdout


# ------------------------------------------------------------------------------ the committed results

def test_committed_results_are_the_full_grid_and_say_how_they_were_made():
    table = sweep.committed_results()
    g = sweep.load_grid("full")
    assert list(zip(table.study, table.name)) == [(s, c.name) for s, c in g.entries], \
        "results_full.csv no longer matches grid_full.yml: re-run `lorakit sweep --full` and commit its results"
    assert (table.status == "ok").all(), table[table.status != "ok"][["name", "error"]]
    assert any("lorakit sweep --full" in line for line in sweep.provenance())
    assert table.trainable_params.gt(0).all() and table.exact_match.between(0, 1).all()
    # the same configuration trains the same number of parameters on a 16-bit and a 4-bit base
    pairs = table[table.study == "lora_vs_qlora"].groupby(["r", "target_modules"]).trainable_params.nunique()
    assert (pairs == 1).all()


# ------------------------------------------------------------------- reference answers and the checks

def table_of(rows):
    base = {"study": "s", "status": "ok", "alpha": 16, "target_modules": "q_proj+v_proj", "dropout": 0.0,
            "use_rslora": False, "params": "", "trainable_params": 100}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_best_under_budget_and_qlora_overhead():
    t = table_of([
        {"name": "a", "method": "lora", "r": 8, "exact_match": 0.9, "peak_memory_bytes": 300, "step_seconds": 1.0},
        {"name": "b", "method": "qlora", "r": 8, "exact_match": 0.8, "peak_memory_bytes": 100, "step_seconds": 1.4},
        {"name": "c", "method": "lora", "r": 2, "exact_match": 0.8, "peak_memory_bytes": 90, "step_seconds": 0.9},
        {"name": "d", "method": "qlora", "r": 2, "exact_match": 0.95, "peak_memory_bytes": 50, "step_seconds": 1.8,
         "status": "failed"},
    ])
    assert sweep.best_under_budget(t, 1000)["name"] == "a"
    assert sweep.best_under_budget(t, 200)["name"] == "c"  # tie at 0.8: less memory wins
    assert sweep.best_under_budget(t, 10) is None
    assert sweep.qlora_overhead(t) == pytest.approx(0.4)  # d failed, so only the r=8 pair counts
    with pytest.raises(ValueError, match="no QLoRA run"):
        sweep.qlora_overhead(t[t.r == 2])


def test_lab_checks_pass_the_reference_and_fail_wrong_answers():
    results = sweep.committed_results()
    check.best_under_budget(sweep.best_under_budget, results)
    check.qlora_overhead(sweep.qlora_overhead, results)

    def stub(*args, **kw):
        raise NotImplementedError()

    for fn, name in ((check.best_under_budget, "best"), (check.qlora_overhead, "overhead")):
        with pytest.raises(CheckFailed):
            fn(stub, results)
    with pytest.raises(CheckFailed):  # ignores the budget
        check.best_under_budget(lambda t, b, memory="peak_memory_bytes": t.sort_values("exact_match").iloc[-1], results)
    with pytest.raises(CheckFailed):  # mean of all QLoRA over all LoRA, no pairing
        check.qlora_overhead(lambda t, column="step_seconds": t[t.method == "qlora"][column].mean()
                             / t[t.method == "lora"][column].mean() - 1, results)


def test_prediction_check():
    results = sweep.committed_results()
    good = check.expected_prediction(results)
    check.prediction(dict(good), results)
    for key, wrong in (("trainable_r8_over_r2", 2), ("qlora_over_lora_trainable", 0.5),
                       ("qlora_holds_fewer_bytes", not good["qlora_holds_fewer_bytes"])):
        with pytest.raises(CheckFailed, match=key):
            check.prediction({**good, key: wrong}, results)
    with pytest.raises(CheckFailed, match="missing"):
        check.prediction({}, results)
