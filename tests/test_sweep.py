"""`lorakit sweep` and lorakit.sweep: grids and their seeds, validation before any run, failures recorded mid-sweep,
the results table, and the command (dry run, bad grids, --ship)."""

import functools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from lorakit import cli, course, env, lab, memory, models, sweep
from lorakit.checks import lab as check


def grid(**studies):
    return {"name": "t", "parameters": {"MAX_STEPS": 2}, "base": {"r": 8, "alpha": 16}, "studies": studies}


# ----------------------------------------------------------------------------------------------- grids

def test_studies_expand_and_shared_configurations_run_once_per_seed():
    g = sweep.load_grid(grid(rank={"r": [2, 8]}, methods={"method": ["lora", "qlora"]}))
    assert [s for s, _ in g.entries] == ["rank", "rank", "methods", "methods"]
    assert [c.name for c in g.configs] == ["lora_r2_a16_q+v", "lora_r8_a16_q+v", "qlora_r8_a16_q+v"]
    assert g.seeds == (0,) and len(g.runs) == 3
    g3 = sweep.load_grid({**grid(rank={"r": [2, 8]}), "seeds": [0, 1, 2]})
    assert [(c.r, seed) for c, seed in g3.runs] == [(2, 0), (2, 1), (2, 2), (8, 0), (8, 1), (8, 2)]
    assert g3.with_seeds([5]).runs == [(c, 5) for c in g3.configs]


@pytest.mark.parametrize("seeds, words", [([], ["seeds=[]"]), ([0, 0], ["repeats a seed"]), ([-1], ["seeds=[-1]"]),
                                          (["a"], ["whole numbers"]), ([True], ["seeds=[True]"])])
def test_bad_seeds_are_rejected(seeds, words):
    with pytest.raises(sweep.SweepError) as e:
        sweep.load_grid({**grid(rank={"r": [2]}), "seeds": seeds})
    assert all(w in str(e.value) for w in words), str(e.value)


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
    ({"r": [4, 0]}, ["'rank'", "r=0", "positive integer"]),
    ({"r": 2.5}, ["r=2.5", "positive integer"]),
    ({"r": True}, ["r=True"]),
    ({"r": "8"}, ["r='8'"]),
    ({"method": ["lora", "qlora4"]}, ["method='qlora4'", "'lora', 'qlora'"]),
    ({"alpha": "two r"}, ["alpha='two r'", "'2r'"]),
    ({"alpha": -1}, ["alpha=-1"]),
    ({"dropout": 1.0}, ["dropout=1.0"]),
    ({"use_rslora": "yes"}, ["use_rslora='yes'"]),
    ({"rank": 8}, ["unknown field", "'rank'"]),
    ({"target_modules": []}, ["target_modules=[]", "is empty"]),
    ({"target_modules": [["q_proj", 3]]}, ["list of module names"]),
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
    with pytest.raises(sweep.SweepError, match="seeds: \\[0, 1, 2\\]"):
        sweep.validate(sweep.load_grid({**grid(a={"r": 2}), "parameters": {"SEED": 3}}))


def test_target_modules_are_matched_as_peft_and_lorakit_match_them():
    """A list entry names a module by its last parts, as in peft, lorakit.lora and lorakit.memory: 'o_proj' and
    'self_attn.o_proj' both adapt every block's attention output; 'attn.o_proj' (not a whole part) adapts none."""
    import peft
    from peft.tuners.tuners_utils import check_target_module_exists

    g = sweep.load_grid(grid(t={"target_modules": [["self_attn.o_proj", "mlp.down_proj"], ["o_proj"]]}))
    sweep.validate(g)
    cfg = memory.config(models.resolve(models.TINY))
    dotted, short = g.configs
    assert (memory.lora_targets(cfg, list(dotted.target_modules))
            == memory.lora_targets(cfg, ["o_proj", "down_proj"]))
    peft_cfg = peft.LoraConfig(target_modules=list(dotted.target_modules))
    for name in sweep.linear_modules(models.TINY):
        assert bool(check_target_module_exists(peft_cfg, name)) == any(
            name.endswith("." + t) for t in dotted.target_modules)
    with pytest.raises(sweep.SweepError) as e:
        sweep.validate(sweep.load_grid(grid(t={"target_modules": [["attn.o_proj"]]})))
    assert "['attn.o_proj']" in str(e.value) and "o_proj" in str(e.value)


def test_numpy_integers_are_whole_numbers():
    g = sweep.load_grid({**grid(rank={"r": [np.int64(4)]}), "seeds": [np.int64(0), np.int32(1)]})
    assert [(c.r, s) for c, s in g.runs] == [(4, 0), (4, 1)]
    assert type(g.configs[0].r) is int and all(type(s) is int for s in g.seeds)
    assert g.with_seeds(np.int64(3)).seeds == (3,)


@pytest.mark.parametrize("name", ["reduced", "full"])
def test_shipped_grids_are_valid(name):
    g = sweep.load_grid(name)
    sweep.validate(g)
    assert {"rank", "lora_vs_qlora"} <= set(g.studies())


def test_full_grid_covers_the_issue_with_three_seeds_and_its_equal_budget_pair_is_equal():
    g = sweep.load_grid("full")
    assert len(g.seeds) >= 3 and g.parameters["N_EVAL"] >= 200 and g.parameters["TASK"] == lab.TASK
    assert tuple(g.seeds) == lab.SEEDS
    studies = {s: [c for t, c in g.entries if t == s] for s in g.studies()}
    assert sorted({c.r for c in studies["rank"]}) == [1, 4, 16, 64]
    assert all(c.alpha == 2 * c.r for c in studies["rank_alpha_2r"])
    assert all(c.use_rslora for c in studies["rank_rslora"])
    assert sorted(c.dropout for c in studies["dropout_small_data"]) == [0.0, 0.1]
    cfg = memory.config(models.resolve(models.TINY))
    a, b = studies["targets_equal_budget"]
    assert memory.lora_parameters(cfg, a.r, list(a.target_modules)) == memory.lora_parameters(cfg, b.r, b.target_modules)
    methods = [c.method for c in studies["lora_vs_qlora"]]
    assert methods.count("lora") == methods.count("qlora") >= 2
    reduced = sweep.load_grid("reduced")
    assert {c.name for c in reduced.configs} == {check.LORA_R2, check.LORA_R8, check.QLORA_R8}
    assert len(reduced.seeds) >= 2  # the live run shows a spread
    assert {check.LORA_R8, check.QLORA_R8} <= {c.name for c in g.configs}


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
SEED = 0
THREADS = 0
RESULT_JSON = ""
"""
FAKE_BODY = """
import json, pathlib
if LORA_R == 3:
    raise RuntimeError("this configuration breaks on purpose")
if LORA_R == 4 and SEED == 1:
    raise RuntimeError("one seed of this configuration breaks")
pathlib.Path(RESULT_JSON).write_text(json.dumps({
    "exact_match": 1 - 1 / LORA_R + SEED / 100, "answer_loss": 1 / LORA_R, "trainable_params": 768 * LORA_R,
    "model_bytes": 1000 if METHOD == "qlora" else 3000, "training_bytes": 10 * LORA_R,
    "step_seconds": 1.5 if METHOD == "qlora" else 1.0, "train_seconds": MAX_STEPS, "final_loss": 0.1,
    "steps": MAX_STEPS, "device": "cpu", "threads": THREADS}))
"""


@pytest.fixture(scope="module")
def fake_notebook(tmp_path_factory):
    path = tmp_path_factory.mktemp("nb") / "fake.ipynb"
    course.write_clean(course.notebook([course.parameters(FAKE_PARAMETERS), course.code(FAKE_BODY)]), path)
    return path


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_sweep_goes_on(fake_notebook, tmp_path):
    g = sweep.load_grid({**grid(rank={"r": [3, 2, 4]}, methods={"method": ["lora", "qlora"]}), "seeds": [0, 1]})
    table = sweep.run_sweep(g, tmp_path, notebook=fake_notebook, progress=False)
    assert list(table.columns) == list(sweep.COLUMNS)
    assert list(zip(table.name, table.seed, table.status)) == [
        ("lora_r3_a16_q+v", 0, "failed"), ("lora_r3_a16_q+v", 1, "failed"), ("lora_r2_a16_q+v", 0, "ok"),
        ("lora_r2_a16_q+v", 1, "ok"), ("lora_r4_a16_q+v", 0, "ok"), ("lora_r4_a16_q+v", 1, "failed"),
        ("lora_r8_a16_q+v", 0, "ok"), ("lora_r8_a16_q+v", 1, "ok"), ("qlora_r8_a16_q+v", 0, "ok"),
        ("qlora_r8_a16_q+v", 1, "ok")]
    assert "RuntimeError: this configuration breaks on purpose" in table.error[0]
    assert "one seed of this configuration breaks" in table.error[5]
    assert table.exact_match[2] == 0.5 and table.exact_match[3] == 0.51 and math.isnan(table.exact_match[0])
    assert table.steps[2] == 2  # the grid's shared parameters reached the notebook
    again = lab.read_results(tmp_path / "results.csv")
    assert list(again.name) == list(table.name) and list(again.status) == list(table.status)
    records = json.loads((tmp_path / "results.json").read_text())
    assert [r["seed"] for r in records] == list(table.seed)
    summary = lab.summarize(table).set_index("name")
    assert summary.loc["lora_r4_a16_q+v", "n"] == 1 and summary.loc["lora_r4_a16_q+v", "failed"] == 1
    assert summary.loc["lora_r2_a16_q+v", "exact_match"] == pytest.approx(0.505)
    assert summary.loc["lora_r2_a16_q+v", "exact_match_spread"] == pytest.approx(0.01)
    assert summary.loc["lora_r3_a16_q+v", "n"] == 0 and math.isnan(summary.loc["lora_r3_a16_q+v", "exact_match"])


@pytest.mark.slow
def test_workers_run_in_parallel_with_their_share_of_threads(fake_notebook, tmp_path):
    g = sweep.load_grid(grid(rank={"r": [1, 2]}))
    table = sweep.run_sweep(g, tmp_path, notebook=fake_notebook, progress=False, workers=2, seeds=[0, 7])
    assert list(table.status) == ["ok"] * 4 and list(table.seed) == [0, 7, 0, 7]
    assert set(table.threads) == {max(1, (os.cpu_count() or 1) // 2)}


@pytest.mark.slow
def test_the_real_experiment_notebook_runs_one_configuration(tmp_path):
    cfg = sweep.load_grid(grid(one={"r": 2})).configs[0]
    row = sweep.run_config(cfg, tmp_path, {"MAX_STEPS": 2, "N_EVAL": 4, "DEVICE": "cpu", "THREADS": 1}, seed=3)
    assert row["status"] == "ok", row["error"]
    assert row["trainable_params"] == memory.lora_parameters(memory.config(models.resolve(models.TINY)), 2,
                                                             ["q_proj", "v_proj"])
    assert 0 <= row["exact_match"] <= 1 and row["answer_loss"] > 0 and row["step_seconds"] > 0
    # bf16 where this CPU computes it natively, float32 elsewhere (a plain AVX2 CPU): the notebook asks env
    expected_dtype = str(env.compute_dtype("cpu")).removeprefix("torch.")
    assert row["base_dtype"] == expected_dtype and row["steps"] == 2 and (tmp_path / "runs" / f"{cfg.name}_seed3.json").exists()
    parts = [row[c] for c in sweep.MEMORY_COLUMNS.values()]
    assert all(p >= 0 for p in parts) and row["training_bytes"] == sum(parts)
    assert row["adapter_bytes"] == 4 * row["trainable_params"] == row["gradient_bytes"]
    assert row["activation_bytes"] > row["weight_bytes"] > 0 and row["estimated_training_bytes"] > 0
    assert row["peak_rss_bytes"] > row["training_bytes"]  # the process holds far more than the tensors


# --------------------------------------------------------------------------------------------- the CLI

def lorakit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lorakit.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
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


@pytest.mark.slow
def test_cli_dry_run_lists_the_full_grid_and_its_seeds():
    res = lorakit("sweep", "--full", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "16 configurations in 6 studies, seeds [0, 1, 2]: 48 runs" in res.stdout
    assert "qlora_r8_a16_all-linear" in res.stdout and "lora_r76_a152_q+v" in res.stdout
    res = lorakit("sweep", "--reduced", "--seeds", "3,4,5", "--dry-run")
    assert res.returncode == 0 and "seeds [3, 4, 5]: 9 runs" in res.stdout
    res = lorakit("sweep", "--reduced", "--seeds", "a,b", "--dry-run")
    assert res.returncode == 2 and "--seeds" in res.stderr
    res = lorakit("sweep", "--reduced", "--ship", "--dry-run")
    assert res.returncode == 2 and "--ship" in res.stderr and "--full" in res.stderr


@pytest.fixture()
def tiny_full_grid(tmp_path, monkeypatch, fake_notebook):
    """`--full` pointed at a two-configuration grid run by the fake notebook, shipping into tmp_path."""
    path = tmp_path / "grid.yml"
    path.write_text("name: full\nparameters: {MAX_STEPS: 3}\nseeds: [0, 1]\nstudies:\n  rank: {r: [2, 8]}\n")
    monkeypatch.setitem(sweep.GRIDS, "full", path)
    monkeypatch.setattr(sweep, "run_sweep", functools.partial(sweep.run_sweep, notebook=fake_notebook))
    monkeypatch.setattr(sweep, "validate", lambda grid, parameters=None, notebook=None: None)
    monkeypatch.setattr(lab, "COMMITTED_RESULTS", tmp_path / "shipped.csv")
    return path


@pytest.mark.slow
def test_ship_writes_the_results_with_their_provenance(tiny_full_grid, tmp_path, capsys):
    assert cli.main(["sweep", "--full", "--ship", "--out", str(tmp_path / "out")]) == 0
    shipped = tmp_path / "shipped.csv"
    assert "shipped:" in capsys.readouterr().out and shipped.exists()
    header = lab.provenance(shipped)
    assert header[1] == f"lorakit sweep --full --ship --out {tmp_path / 'out'}"
    assert header[2].startswith("4 runs (2 configurations x seeds [0, 1]) in ") and header[2].endswith(" s, 0 failed.")
    assert header[3].startswith("Machine: ") and "torch " in header[3] and "peft " in header[3]
    table = lab.read_results(shipped)
    assert list(table.columns) == list(sweep.COLUMNS)
    assert list(zip(table.name, table.seed)) == [("lora_r2_a16_q+v", 0), ("lora_r2_a16_q+v", 1),
                                                ("lora_r8_a16_q+v", 0), ("lora_r8_a16_q+v", 1)]
    assert table.equals(lab.read_results(tmp_path / "out" / "results.csv"))


@pytest.mark.slow
def test_ship_writes_lesson_07s_grid_beside_the_full_one(tiny_full_grid, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sweep.GRIDS, "inits", tiny_full_grid)
    monkeypatch.setattr(lab, "EXPERIMENTS", tmp_path)
    assert cli.main(["sweep", "--grid", "inits", "--ship", "--out", str(tmp_path / "out")]) == 0
    assert lab.provenance(tmp_path / "results_inits.csv")[1] == f"lorakit sweep --grid inits --ship --out {tmp_path / 'out'}"
    assert not (tmp_path / "shipped.csv").exists()   # the full grid's results are left alone
    capsys.readouterr()
    assert cli.main(["sweep", "--grid", str(tiny_full_grid), "--ship"]) == 2   # a grid file of one's own is not shipped
    assert "--grid inits" in capsys.readouterr().err


@pytest.mark.slow
def test_ship_refuses_incomplete_results(tiny_full_grid, tmp_path, capsys):
    tiny_full_grid.write_text("name: full\nseeds: [0, 1]\nstudies:\n  rank: {r: [2, 3]}\n")  # r=3 fails
    assert cli.main(["sweep", "--full", "--ship", "--out", str(tmp_path / "out")]) == 1
    assert "not shipped: 2 runs failed" in capsys.readouterr().err
    assert not (tmp_path / "shipped.csv").exists()


def test_experiment_parameters_can_vary_per_study_for_later_lessons():
    """A study may vary any experiment parameter, e.g. peft's init_lora_weights (lesson 07 compares them)."""
    g = sweep.load_grid(grid(init={"INIT_LORA_WEIGHTS": [True, "gaussian", "pissa"]}))
    sweep.validate(g)
    assert [c.notebook_parameters()["INIT_LORA_WEIGHTS"] for c in g.configs] == [True, "gaussian", "pissa"]
    assert sweep.notebook_parameters()["INIT_LORA_WEIGHTS"] is True  # peft's default: what the committed grid ran
