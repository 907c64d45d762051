"""Self-checks for lesson 06 (the LoRA vs QLoRA lab): the prediction made before the sweep ran, the best
configuration under a memory budget, and QLoRA's speed overhead computed from the measurements."""

from __future__ import annotations

import math

from . import CheckFailed, defined, expect, passed  # noqa: F401  (defined: used by the test cells)

# The three runs every grid of the lab contains (see lib/lorakit/experiments/grid_reduced.yml).
LORA_R2, LORA_R8, QLORA_R8 = "lora_r2_a16_q+v", "lora_r8_a16_q+v", "qlora_r8_a16_q+v"
GRADED = {
    "trainable_r8_over_r2": "trainable parameters of LoRA at r=8 divided by those at r=2 (same layers)",
    "qlora_over_lora_trainable": "trainable parameters of QLoRA r=8 divided by those of LoRA r=8",
    "qlora_holds_fewer_bytes": "True if the QLoRA model holds fewer bytes than the LoRA model (weights, "
                               "adapters and quantization constants), else False",
}
SHOWN = {"qlora_slower": "True if a QLoRA training step takes longer than a LoRA step on this machine"}


def _run(results, name: str):
    rows = results[(results["name"] == name) & (results["status"] == "ok")]
    expect(not rows.empty, f"the results have no successful run named {name!r}.",
           "run the sweep cell above again; every grid of this lab includes it.")
    return rows.iloc[0]


def expected_prediction(results) -> dict:
    """What the run says for each prediction."""
    lora2, lora8, qlora8 = (_run(results, n) for n in (LORA_R2, LORA_R8, QLORA_R8))
    return {"trainable_r8_over_r2": lora8.trainable_params / lora2.trainable_params,
            "qlora_over_lora_trainable": qlora8.trainable_params / lora8.trainable_params,
            "qlora_holds_fewer_bytes": bool(qlora8.model_bytes < lora8.model_bytes),
            "qlora_slower": bool(qlora8.step_seconds > lora8.step_seconds)}


def prediction(predicted, results) -> None:
    """Compare the learner's predictions with the run. The three structural ones are graded; the speed one
    depends on the machine and is only shown."""
    expect(isinstance(predicted, dict), f"`PREDICTION` should be a dict, found {type(predicted).__name__}.")
    missing = [k for k in GRADED if k not in predicted]
    expect(not missing, f"`PREDICTION` is missing {missing}.", "fill in one value per key: " +
           "; ".join(f"{k}: {v}" for k, v in GRADED.items()))
    truth = expected_prediction(results)
    for key in GRADED:
        got, want = predicted[key], truth[key]
        if isinstance(want, bool):
            ok = isinstance(got, bool) and got == want
        else:
            try:
                ok = not isinstance(got, bool) and math.isclose(float(got), float(want), rel_tol=1e-6)
            except (TypeError, ValueError):
                ok = False
        expect(ok, f"{key}: you predicted {got!r}, the run measured {want:g}." if not isinstance(want, bool) else
               f"{key}: you predicted {got!r}, the run says {want}.", _HINTS[key])
    for key, what in SHOWN.items():
        if key in predicted:
            verdict = "as you predicted" if predicted[key] == truth[key] else "not what you predicted"
            print(f"{key}: you said {predicted[key]}, this run says {truth[key]} ({verdict}; not graded: "
                  f"it depends on the machine)")
    passed("your predictions match the run: " + ", ".join(f"{k} = {truth[k]:g}" if not isinstance(truth[k], bool)
                                                          else f"{k} = {truth[k]}" for k in GRADED))


_HINTS = {
    "trainable_r8_over_r2": "every adapted layer trains r x (in + out) numbers: what happens when r is 4x larger?",
    "qlora_over_lora_trainable": "QLoRA quantizes the frozen base weights; are the adapters any different?",
    "qlora_holds_fewer_bytes": "NF4 stores about 4.1 bits per linear weight instead of 16; some layers "
                               "(embeddings, norms) are not quantized, but they do not grow.",
}


def _call(fn, *args, what: str, **kwargs):
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise CheckFailed(f"`{what}` still raises NotImplementedError: replace it with your code.") from None


# --------------------------------------------------------------------------------------------------
# Exercise: the best configuration under a memory budget
# --------------------------------------------------------------------------------------------------

def _table(rows):
    import pandas as pd
    base = {"study": "s", "status": "ok", "alpha": 16, "target_modules": "q_proj+v_proj", "dropout": 0.0,
            "use_rslora": False, "params": "", "trainable_params": 100, "model_bytes": 1000}
    return pd.DataFrame([{**base, **r} for r in rows])


_BUDGET_TABLE = [
    {"name": "big", "method": "lora", "r": 64, "exact_match": 0.95, "peak_memory_bytes": 900, "step_seconds": 1.0},
    {"name": "mid", "method": "qlora", "r": 8, "exact_match": 0.90, "peak_memory_bytes": 500, "step_seconds": 1.3},
    {"name": "tie", "method": "lora", "r": 8, "exact_match": 0.90, "peak_memory_bytes": 450, "step_seconds": 1.0,
     "trainable_params": 100},
    {"name": "broken", "method": "lora", "r": 4, "exact_match": 0.99, "peak_memory_bytes": 100, "step_seconds": 1.0,
     "status": "failed"},
    {"name": "small", "method": "qlora", "r": 1, "exact_match": 0.40, "peak_memory_bytes": 200, "step_seconds": 1.2},
]


def _name(row):
    return None if row is None else row["name"]


def best_under_budget(fn, results) -> None:
    """The learner's `best_under_budget(results, budget_bytes, memory="peak_memory_bytes")` against the
    reference on a small table (a failed run, a tie, nothing fits) and on the lab's results."""
    from lorakit import sweep

    expect(callable(fn), "`best_under_budget` should be a function of (results, budget_bytes, memory).")
    small = _table(_BUDGET_TABLE)
    cases = [(small, 1000, "peak_memory_bytes", "the best run overall when everything fits"),
             (small, 600, "peak_memory_bytes", "a tie on exact match: the one that needs less memory wins"),
             (small, 300, "peak_memory_bytes", "the failed run must not count, however good its numbers look"),
             (small, 50, "peak_memory_bytes", "nothing fits: return None")]
    for budget in sorted(set(results["model_bytes"]))[::max(1, len(set(results["model_bytes"])) // 3)]:
        cases.append((results, budget, "model_bytes", f"the lab's results with a budget of {budget:,} model bytes"))
    for table, budget, memory, why in cases:
        got = _call(fn, table, budget, memory=memory, what="best_under_budget")
        want = sweep.best_under_budget(table, budget, memory=memory)
        expect((got is None) == (want is None) and _name(got) == _name(want),
               f"budget {budget:,} ({memory}): expected {_name(want)!r}, found "
               f"{_name(got) if got is None or hasattr(got, '__getitem__') else got!r}.",
               f"{why}. Keep successful runs whose {memory} <= budget, take the highest exact_match (ties: less "
               f"memory, then fewer trainable parameters), return that row, or None.")
    passed("best_under_budget picks the same runs as the reference, including ties, failures and 'nothing fits'")


# --------------------------------------------------------------------------------------------------
# Exercise: QLoRA's speed overhead
# --------------------------------------------------------------------------------------------------

_OVERHEAD_TABLE = [
    {"name": "l8", "method": "lora", "r": 8, "step_seconds": 1.0, "exact_match": 0.9, "peak_memory_bytes": 1},
    {"name": "q8", "method": "qlora", "r": 8, "step_seconds": 1.5, "exact_match": 0.9, "peak_memory_bytes": 1},
    {"name": "l64", "method": "lora", "r": 64, "step_seconds": 2.0, "exact_match": 0.9, "peak_memory_bytes": 1},
    {"name": "q64", "method": "qlora", "r": 64, "step_seconds": 2.2, "exact_match": 0.9, "peak_memory_bytes": 1},
    {"name": "l2", "method": "lora", "r": 2, "step_seconds": 0.5, "exact_match": 0.9, "peak_memory_bytes": 1},
    {"name": "q2", "method": "qlora", "r": 2, "step_seconds": 0.6, "exact_match": 0.9, "peak_memory_bytes": 1},
    {"name": "q4", "method": "qlora", "r": 4, "step_seconds": 9.0, "exact_match": 0.9, "peak_memory_bytes": 1},
    {"name": "q16", "method": "qlora", "r": 16, "step_seconds": 0.1, "exact_match": 0.9, "peak_memory_bytes": 1,
     "status": "failed"},
]


def qlora_overhead(fn, results) -> None:
    """The learner's `qlora_overhead(results, column="step_seconds")` against the reference: pairs matched on
    everything but the method, unpaired and failed runs left out, the median of the ratios minus one."""
    from lorakit import sweep

    expect(callable(fn), "`qlora_overhead` should be a function of (results, column).")
    small = _table(_OVERHEAD_TABLE)
    for table, why in ((small, "pairs r=8 (+50%), r=64 (+10%) and r=2 (+20%); q4 has no LoRA partner and q16 "
                               "failed, so neither counts: the median is 0.2"),
                       (results, "the lab's results")):
        got = _call(fn, table, what="qlora_overhead")
        want = sweep.qlora_overhead(table)
        try:
            ok = math.isclose(float(got), want, rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            ok = False
        expect(ok, f"{why}: expected {want:.4f}, found {got!r}.",
               "pair each QLoRA run with the LoRA run that has the same r, alpha, target_modules, dropout, "
               "use_rslora and params; take qlora / lora - 1 per pair and return the median (statistics.median).")
    got = _call(fn, results, column="train_seconds", what="qlora_overhead")
    expect(math.isclose(float(got), sweep.qlora_overhead(results, "train_seconds"), rel_tol=1e-9),
           f"with column='train_seconds' expected {sweep.qlora_overhead(results, 'train_seconds'):.4f}, found {got!r}.",
           "use the `column` argument instead of always reading step_seconds.")
    passed(f"qlora_overhead matches the reference: QLoRA is {want:+.0%} per step in these results")
