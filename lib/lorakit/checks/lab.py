"""Checks for lesson 06 (the LoRA vs QLoRA lab), judged (see lorakit.checks.judged): the predictions made
before the sweep, the verdict rule, the best configuration under a memory budget, and QLoRA's step-time
overhead. Each probe calls the learner's function on tables drawn from the seed (synthetic results with
failed runs, ties and overlapping seeds); each judge recomputes the answer with `lorakit.lab`."""

from __future__ import annotations

import math

from lorakit.checks import close, expect
from lorakit.checks.judged import judged_check

# The three runs of the reduced grid (lib/lorakit/experiments/grid_reduced.yml), and how they differ.
LORA_R2, LORA_R8, QLORA_R8 = "lora_r2_a16_all-linear", "lora_r8_a16_all-linear", "qlora_r8_a16_all-linear"
GRADED = {
    "trainable_r8_over_r2": "trainable parameters of LoRA at r=8 divided by those at r=2 (same layers)",
    "qlora_over_lora_trainable": "trainable parameters of QLoRA r=8 divided by those of LoRA r=8",
    "qlora_holds_fewer_bytes": "True if the QLoRA model holds fewer bytes than the LoRA model (weights, "
                               "adapters and quantization constants), else False",
}
SHOWN = {"qlora_slower": "True if a QLoRA training step takes longer than a LoRA step on this machine"}
_HINTS = {
    "trainable_r8_over_r2": "every adapted layer trains r x (in + out) numbers: what happens when r is 4x larger?",
    "qlora_over_lora_trainable": "QLoRA quantizes the frozen base weights; are the adapters any different?",
    "qlora_holds_fewer_bytes": "NF4 stores about 4.1 bits per linear weight instead of 16 (bf16) or 32 (float32, "
                               "what a CPU without native bf16 computes in); some layers (embeddings, norms) are "
                               "not quantized, but they do not grow.",
}


def _truth() -> dict:
    """The graded predictions, computed from the embedded model's config (no run needed)."""
    from lorakit import memory, models

    cfg = memory.config(models.resolve(models.TINY))
    lora2, lora8 = (memory.lora_parameters(cfg, r, "all-linear") for r in (2, 8))
    held = {m: memory.estimate(cfg, m, r=8, target_modules="all-linear", activations=False) for m in ("lora", "qlora")}
    return {"trainable_r8_over_r2": lora8 / lora2, "qlora_over_lora_trainable": 1.0,
            "qlora_holds_fewer_bytes": held["qlora"].weights_bytes < held["lora"].weights_bytes}


def _value(v):
    """A learner's value as data: numbers and booleans (numpy's too) as plain Python values, anything else as
    its repr, so that the judge can say what it found."""
    if type(v) in (bool, int, float):
        return v
    if type(v).__module__ == "numpy" and hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return _value(v.item())
    return repr(v)[:60]


@judged_check
class prediction:
    """`my_prediction()`: the three structural predictions about the reduced grid's runs."""
    answer = {"is_dict": bool, "values": dict}
    reported = {"is_dict": "whether what the function returned is a dict"}

    def draw(rng):
        return {"keys": list(GRADED) + list(SHOWN)}  # nothing to draw: predictions are constants

    def probe(inputs, fn):
        predicted = fn()
        if not isinstance(predicted, dict):
            return {"is_dict": False, "values": {}}
        return {"is_dict": True, "values": {k: _value(predicted[k]) for k in inputs["keys"] if k in predicted}}

    def judge(inputs, answer):
        expect(answer["is_dict"], "`my_prediction()` should return a dict.")
        got = answer["values"]
        missing = [k for k in GRADED if k not in got]
        expect(not missing, f"the prediction is missing {missing}.",
               "fill in one value per key: " + "; ".join(f"{k}: {v}" for k, v in GRADED.items()))
        truth = _truth()
        for key in GRADED:
            want, found = truth[key], got[key]
            ok = (type(found) is bool and found == want) if isinstance(want, bool) else \
                (type(found) in (int, float) and close(found, want))
            expect(ok, f"{key}: you predicted {found!r}; the embedded model's config says {want!r}.", _HINTS[key])
        return "your predictions match what the configs imply: " + ", ".join(f"{k} = {truth[k]!r}" for k in GRADED)


# --------------------------------------------------------------------------------------------------
# The verdict rule
# --------------------------------------------------------------------------------------------------

def _scores(rng, n: int, center: float, width: float) -> list:
    return [round(center + rng.uniform(-width, width), 4) for _ in range(n)]


@judged_check
class verdict:
    """`verdict(a, b, higher_is_better=True)`: "A", "B" or None (not distinguishable beyond the seed spread)."""
    answer = {"verdicts": [(str, None)]}
    reference = ("lorakit.lab.verdict",)

    def draw(rng):
        n = rng.integer(3, 5)
        cases = [
            [[0.62, 0.58, 0.65], [0.31, 0.40, 0.35], True],               # separable: A
            [[0.50, 0.58, 0.41], [0.45, 0.55, 0.60], True],               # overlapping: None
            [[0.20, 0.25, 0.22], [0.21, 0.19, 0.26], False],              # overlapping losses: None
            [[0.30, 0.33, 0.31], [0.20, 0.22, 0.21], False],              # lower is better: B
            [[0.9, math.nan, math.nan], [0.1, 0.2, 0.15], True],          # one run left of A: None
            [[0.9, math.nan, 0.8], [0.1, 0.2, 0.15], True],               # a failed run, two left: A
            [[0.1, 0.2, 0.15], [0.9, math.nan, 0.8], True],               # the same on B's side: B
            [[0.1, 0.2, 0.15], [0.9, math.nan, math.nan], True],          # one run left of B: None
            [[0.5, 0.6, 0.7], [0.7, 0.8, 0.9], True],                     # touching ranges: None
            [[0.7, 0.8, 0.9], [0.5, 0.6, 0.7], True],                     # touching the other way: None
        ]
        for _ in range(5):  # drawn: centres and widths decide whether the ranges overlap
            a_mid, b_mid, width = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.005, 0.1)
            a, b = _scores(rng, n, a_mid, width), _scores(rng, n, b_mid, width)
            if rng.integer(0, 3) == 0:
                rng.choice([a, b])[rng.integer(0, n - 1)] = math.nan
            cases.append([a, b, rng.choice([True, False])])
        order = rng.sample(range(len(cases)), len(cases))
        return {"cases": [cases[i] for i in order]}

    def probe(inputs, fn):
        verdicts = []
        for a, b, higher in inputs["cases"]:
            got = fn(list(a), list(b), higher_is_better=higher)
            verdicts.append(got if got is None or type(got) is str else repr(got)[:40])
        return {"verdicts": verdicts}

    def judge(inputs, answer):
        from lorakit import lab

        expect(len(answer["verdicts"]) == len(inputs["cases"]), "`verdict` should return one answer per call.")
        for (a, b, higher), got in zip(inputs["cases"], answer["verdicts"]):
            want = lab.verdict(a, b, higher_is_better=higher)
            expect(got == want,
                   f"verdict({_show(a)}, {_show(b)}, higher_is_better={higher}): expected {want!r}, found {got!r}.",
                   "leave out failed runs (NaN); with fewer than 2 runs left on a side return None; otherwise name "
                   "a winner only when its worst run beats the other's best run (for a loss, lower is better).")
        return "verdict names a winner only beyond the seed spread, and leaves failed runs out"


def _show(values) -> str:
    return "[" + ", ".join("nan" if isinstance(v, float) and math.isnan(v) else f"{v:g}" for v in values) + "]"


# --------------------------------------------------------------------------------------------------
# The best configuration under a memory budget
# --------------------------------------------------------------------------------------------------

def _summary_rows(rng) -> list[dict]:
    """A synthetic summary (one row per configuration, as lorakit.lab.summarize gives): ties on exact match
    (broken by memory, and by trainable parameters), a configuration whose runs all failed, one with a
    single successful run, and one listed under two studies."""
    rows = []
    for i in range(rng.integer(6, 9)):
        method = rng.choice(["lora", "qlora"])
        r = rng.choice([1, 2, 4, 8, 16, 64])
        rows.append({"study": rng.choice(["rank", "targets", "lora_vs_qlora"]), "name": f"{method}_r{r}_cfg{i}",
                     "method": method, "r": r, "n": 3, "failed": 0,
                     "exact_match": round(rng.uniform(0.05, 0.65), 3),
                     "training_bytes": rng.integer(50, 400) * 100_000, "trainable_params": r * 14_592})
    rows[1]["exact_match"] = 0.7   # above the others: wherever it and its ties fit, the tie-breaks decide
    tie = dict(rows[1], name=rows[1]["name"] + "_tie", training_bytes=rows[1]["training_bytes"] - 100_000,
               trainable_params=rows[1]["trainable_params"] * 2)
    smaller = dict(tie, name=tie["name"] + "_smaller", trainable_params=tie["trainable_params"] // 2)
    failed = dict(rows[2], name=rows[2]["name"] + "_failed", n=0, failed=3, exact_match=math.nan,
                  training_bytes=1_000)
    single = dict(rows[3], name=rows[3]["name"] + "_single", n=1, failed=2, exact_match=0.9,
                  training_bytes=max(r["training_bytes"] for r in rows) + 100_000)
    shared = dict(rows[0], study="another_study")
    return rows + [tie, smaller, failed, single, shared]


@judged_check
class best_under_budget:
    """`best_under_budget(summary, budget_bytes, memory="training_bytes")` on drawn summaries."""
    answer = {"names": [(str, None)]}
    # lorakit.lab.best_under_budget answers this exercise, but is not named as its reference: the lesson's own
    # answer shares 90% of its code's fingerprints with it, so the flagger (grading.reference_use.SIMILAR) would
    # call every honest answer a copy.

    def draw(rng):
        rows = _summary_rows(rng)
        sizes = sorted({r["training_bytes"] for r in rows})
        # everything fits; only the failed configuration fits; nothing fits; drawn budgets
        budgets = [max(sizes) * 2, sizes[0], sizes[0] // 2] + [rng.choice(sizes) for _ in range(4)]
        budgets.append(next(r for r in rows if r["name"].endswith("_tie"))["training_bytes"] + 100_000)
        return {"rows": rows, "budgets": budgets, "memory": "training_bytes",
                "param_budget": rows[3]["trainable_params"]}

    def probe(inputs, fn):
        import pandas as pd

        summary = pd.DataFrame(inputs["rows"])
        picks = [fn(summary, b, memory=inputs["memory"]) for b in inputs["budgets"]]
        picks.append(fn(summary, inputs["param_budget"], memory="trainable_params"))
        return {"names": [None if p is None else _name(p) for p in picks]}

    def judge(inputs, answer):
        import pandas as pd

        from lorakit import lab

        summary = pd.DataFrame(inputs["rows"])
        cases = [(b, inputs["memory"]) for b in inputs["budgets"]] + [(inputs["param_budget"], "trainable_params")]
        expect(len(answer["names"]) == len(cases), "`best_under_budget` should return one row per call.")
        for (budget, memory), got in zip(cases, answer["names"]):
            best = lab.best_under_budget(summary, budget, memory=memory)
            want = None if best is None else best["name"]
            expect(got == want, f"budget {budget:,} ({memory}): expected {want!r}, found {got!r}.",
                   f"keep configurations with at least one successful run (n > 0) whose {memory} <= budget; take "
                   "the highest mean exact_match (ties: less memory, then fewer trainable parameters); return "
                   "that row, or None when nothing fits.")
        return "best_under_budget picks the same configurations as the reference, ties and failures included"


def _name(row):
    try:
        return str(row["name"])
    except (KeyError, TypeError, IndexError):
        return repr(row)[:60]


# --------------------------------------------------------------------------------------------------
# QLoRA's step-time overhead, from the benchmark's repeats
# --------------------------------------------------------------------------------------------------

@judged_check
class qlora_overhead:
    """`qlora_overhead(step_times)`: {width: median QLoRA step / median LoRA step - 1} from a benchmark table."""
    answer = {"overheads": dict, "type": str}
    reference = ("lorakit.lab.qlora_overhead",)
    reported = {"type": "the type of what the function returned"}

    def draw(rng):
        rows = []
        widths = sorted(rng.sample([256, 512, 1024, 2048, 4096], rng.integer(2, 4)))
        for width in widths:
            base = width / 1000 * rng.uniform(0.5, 2.0)
            for method, factor in (("lora", 1.0), ("qlora", rng.uniform(0.9, 1.6))):
                for repeat in range(rng.integer(3, 7)):
                    rows.append({"width": width, "method": method, "repeat": repeat,
                                 "step_seconds": round(base * factor * rng.uniform(0.9, 1.3), 6)})
        rows.append({"width": 8192, "method": "lora", "repeat": 0, "step_seconds": 9.0})  # no QLoRA partner
        return {"rows": rng.sample(rows, len(rows))}

    def probe(inputs, fn):
        import pandas as pd

        got = fn(pd.DataFrame(inputs["rows"]))
        if not isinstance(got, dict):
            return {"overheads": {}, "type": type(got).__name__}
        return {"overheads": {str(k): _value(v) for k, v in got.items()}, "type": "dict"}

    def judge(inputs, answer):
        import pandas as pd

        from lorakit import lab

        expect(answer["type"] == "dict", f"`qlora_overhead` should return a dict {{width: overhead}}; found a "
                                         f"{answer['type']}.")
        want = lab.qlora_overhead(pd.DataFrame(inputs["rows"]))
        got = answer["overheads"]
        expect(sorted(got) == sorted(str(w) for w in want),
               f"expected overheads for the widths {sorted(want)}, found {sorted(got)}.",
               "one entry per width that has both LoRA and QLoRA timings; skip a width with only one method.")
        for width, value in want.items():
            found = got[str(width)]
            expect(type(found) in (int, float) and close(found, value, rel=1e-9, abs_=1e-12),
                   f"width {width}: expected {value:+.4f}, found {found!r}.",
                   "take the median of each method's step_seconds at that width (statistics.median) and return "
                   "median(qlora) / median(lora) - 1.")
        return (f"qlora_overhead matches the reference on a drawn benchmark table ({len(want)} widths, unpaired "
                f"width left out)")
