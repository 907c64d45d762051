"""Lesson 06, the LoRA vs QLoRA lab: the task and seeds it compares configurations on, its results files,
summaries over seeds, the verdict rule, and the reference answers of the lesson's exercises.

A comparison is only worth printing when it is larger than the noise. Every configuration runs with several
seeds (`SEEDS`: the seed changes the adapters' initialisation and the order of the training batches, not the
held-out examples), and `verdict` names a winner only when the difference exceeds the seed spread: the worst
run of the better configuration beats the best run of the other. Otherwise the lab says "not
distinguishable on this task". A run that failed counts as no run; a side with fewer than `MIN_SEEDS`
successful runs cannot be compared.

Other lessons reuse the same pieces (lesson 07 compares LoRA initialisations with them):

    from lorakit import lab
    lab.TASK, lab.SEEDS                          # the task and seeds of the lab
    lab.verdict([0.61, 0.58, 0.64], [0.31, 0.40, 0.35])   # "A": A's worst run beats B's best
    lab.compare(results, "lora_r8_a16_all-linear", "qlora_r8_a16_all-linear")   # a sentence, or "not distinguishable"

Results files: `lorakit sweep` writes one row per study, configuration and seed (`lorakit.sweep.COLUMNS`).
`ship` writes the full grid's table into the kit with a provenance header (`lorakit sweep --full --ship`);
`committed_results()` reads it back. Lesson 07's grid ships the same way beside it (`lorakit sweep --grid inits
--ship` writes `results_path("inits")`). The step-time benchmark (`benchmarks/bench_step_time.py --ship`) writes
`step_times.csv` beside it, read by `committed_step_times()`.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import platform
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from lorakit.sweep import EXPERIMENTS, FIELDS

__all__ = ["TASK", "SEEDS", "METRICS", "NOT_DISTINGUISHABLE", "STEP_TIMES", "write_results", "read_results",
           "provenance", "committed_results", "committed_step_times", "machine", "ship", "summarize",
           "seed_values", "verdict", "Comparison", "compare", "pairs", "best_under_budget", "qlora_overhead",
           "step_time_table", "SHIPPED_GRIDS", "results_path"]

TASK = "where_found"       # lorakit.data task: copy the place of the find from the story
SEEDS = (0, 1, 2)          # the seeds every configuration of the full grid runs with
MIN_SEEDS = 2              # a configuration needs this many successful runs to be compared
METRICS = {"exact_match": True, "answer_loss": False}   # metric -> is higher better?
LABELS = {"exact_match": "held-out exact match", "answer_loss": "held-out answer loss (nats per token)"}
NOT_DISTINGUISHABLE = "not distinguishable on this task"
COMMITTED_RESULTS = EXPERIMENTS / "results_full.csv"
SHIPPED_GRIDS = ("full", "inits")   # the grids whose results ship with the kit (lorakit.sweep.GRIDS names)
STEP_TIMES = EXPERIMENTS / "step_times.csv"
# A QLoRA run and its LoRA partner agree on everything but the method.
PAIR_KEYS = ("r", "alpha", "target_modules", "dropout", "use_rslora", "params")


# --------------------------------------------------------------------------------------------------
# Results files
# --------------------------------------------------------------------------------------------------

def write_results(table, path: str | os.PathLike, header: list[str] | None = None) -> Path:
    """Write a results table as CSV, with provenance lines (`# ...`) on top."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"# {line}\n" for line in (header or [])) + table.to_csv(index=False))
    return path


def read_results(path: str | os.PathLike | None = None):
    """A results table written by `lorakit sweep` or `write_results` (leading `# ...` lines are provenance);
    default: the committed full-grid results."""
    import pandas as pd

    lines = Path(path or COMMITTED_RESULTS).read_text().splitlines(keepends=True)
    body = "".join(itertools.dropwhile(lambda line: line.startswith("#"), lines))
    table = pd.read_csv(io.StringIO(body), keep_default_na=False, na_values=[""])
    for col in ("error", "params", "base_dtype", "device", "method"):
        if col in table:
            table[col] = table[col].astype(object).fillna("")
    return table


def provenance(path: str | os.PathLike | None = None) -> list[str]:
    """The `# ...` lines on top of a results file (default: the committed full-grid results): the command that
    produced it, where and when."""
    out = []
    for line in Path(path or COMMITTED_RESULTS).read_text().splitlines():
        if not line.startswith("#"):
            break
        out.append(line[1:].strip())
    return out


def results_path(grid: str) -> Path:
    """Where the shipped results of the grid named `grid` live: results_<grid>.csv beside the grid files."""
    if grid not in SHIPPED_GRIDS:
        raise ValueError(f"no shipped results for grid {grid!r}: the kit ships {list(SHIPPED_GRIDS)}")
    return COMMITTED_RESULTS if grid == "full" else EXPERIMENTS / f"results_{grid}.csv"


def committed_results():
    """The full grid's results that ship with the kit (`provenance()` says how they were made)."""
    return read_results(COMMITTED_RESULTS)


def committed_step_times():
    """The step-time benchmark's measurements that ship with the kit (`provenance(STEP_TIMES)`)."""
    return read_results(STEP_TIMES)


def machine() -> str:
    """One line about where a measurement ran: the GPU, or the CPU's class (`lorakit.env.cpu_class`: cores,
    kernels, native bf16 or not), and the versions that decide speed."""
    import torch

    from lorakit.env import cpu_class, versions

    where = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
             else f"{cpu_class()} ({platform.machine()}), no GPU")
    v = versions()
    stack = ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "peft", "bitsandbytes") if v.get(k))
    return f"{where}; {stack}; {date.today().isoformat()}"


def ship(table, command: str, seconds: float, path: str | os.PathLike | None = None,
         grid_source: str = "") -> Path:
    """Write a grid's results table into the kit with its provenance header: the command, the wall time, how many
    runs failed, the machine and the versions (default: the full grid's file; `lorakit sweep --full --ship` and
    `lorakit sweep --grid inits --ship` call this)."""
    runs = len(table.drop_duplicates(["name", "seed"]))
    failed = len(table[table.status != "ok"].drop_duplicates(["name", "seed"]))
    seeds = sorted(set(int(s) for s in table.seed))
    header = [f"Results of the grid {grid_source or 'lib/lorakit/experiments/grid_full.yml'}, produced by:",
              f"    {command}",
              f"{runs} runs ({table.name.nunique()} configurations x seeds {seeds}) in {seconds:.0f} s, "
              f"{failed} failed.",
              f"Machine: {machine()}.",
              "One row per study, configuration and seed; lorakit.lab.summarize gives mean and spread per "
              "configuration."]
    return write_results(table, path or COMMITTED_RESULTS, header)


# --------------------------------------------------------------------------------------------------
# Summaries over seeds
# --------------------------------------------------------------------------------------------------

def summarize(results, metrics=tuple(METRICS)):
    """One row per study and configuration: its fields, how many runs succeeded (`n`) and failed, and for each
    metric the mean over successful seeds, the spread (max - min) and the min and max. Failed runs are left
    out of the statistics. Memory and time columns are averaged too when present."""
    import pandas as pd

    extra = [c for c in ("trainable_params", "model_bytes", "training_bytes", "activation_bytes",
                         "estimated_training_bytes", "step_seconds", "n_eval") if c in results]
    keys = [c for c in ("study", "name", "method", *FIELDS[1:], "params") if c in results]
    rows = []
    for _, group in results.groupby(["study", "name"], sort=False):
        ok = group[group["status"] == "ok"]
        row = {k: group.iloc[0][k] for k in keys}
        row["n"], row["failed"] = len(ok), int((group["status"] != "ok").sum())
        for m in metrics:
            values = ok[m].astype(float)
            row[m] = values.mean() if len(values) else math.nan
            row[f"{m}_spread"] = values.max() - values.min() if len(values) else math.nan
            row[f"{m}_min"], row[f"{m}_max"] = (values.min(), values.max()) if len(values) else (math.nan, math.nan)
        for c in extra:
            row[c] = ok[c].astype(float).mean() if len(ok) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def seed_values(results, name: str, metric: str = "exact_match") -> list[float]:
    """The per-seed values of `metric` for the configuration `name`, NaN for a failed run (each seed once,
    even when two studies share the configuration)."""
    rows = results[results["name"] == name].drop_duplicates("seed")
    if rows.empty:
        raise KeyError(f"no run named {name!r} in these results; names: {sorted(results['name'].unique())}")
    return [float(v) if s == "ok" else math.nan for v, s in zip(rows[metric], rows["status"])]


# --------------------------------------------------------------------------------------------------
# The verdict rule
# --------------------------------------------------------------------------------------------------

def verdict(a, b, higher_is_better: bool = True, min_seeds: int = MIN_SEEDS) -> str | None:
    """"A" or "B" when one configuration is better beyond the seed spread, None when they cannot be told apart.

    `a` and `b` are the per-seed scores of two configurations (NaN or None for a failed run, which counts as no
    run). A wins only when its worst run beats B's best run (and the other way round): the difference between
    the two exceeds the spread of the seeds. With fewer than `min_seeds` successful runs on either side there
    is no verdict either."""
    a = [float(x) for x in a if x is not None and not math.isnan(float(x))]
    b = [float(x) for x in b if x is not None and not math.isnan(float(x))]
    if len(a) < min_seeds or len(b) < min_seeds:
        return None
    if not higher_is_better:
        a, b = [-x for x in a], [-x for x in b]
    if min(a) > max(b):
        return "A"
    if min(b) > max(a):
        return "B"
    return None


@dataclass(frozen=True)
class Comparison:
    """Two configurations compared on one metric over their seeds; `str()` is the sentence the lab prints."""
    a: str
    b: str
    metric: str
    a_values: tuple
    b_values: tuple
    winner: str | None           # the name of the better configuration, None when not distinguishable

    def _stats(self, values):
        ok = [v for v in values if not math.isnan(v)]
        return (sum(ok) / len(ok), max(ok) - min(ok), len(ok)) if ok else (math.nan, math.nan, 0)

    @property
    def reason(self) -> str:
        short = [n for n, v in ((self.a, self.a_values), (self.b, self.b_values)) if self._stats(v)[2] < MIN_SEEDS]
        if short:
            return f"fewer than {MIN_SEEDS} successful runs for {', '.join(short)}"
        return "the seed ranges overlap" if self.winner is None else "beyond the seed spread"

    def __str__(self) -> str:
        fmt = "{:.1%}" if self.metric == "exact_match" else "{:.3f}"
        def show(name, values):
            mean, spread, n = self._stats(values)
            return f"{name} {fmt.format(mean)} (spread {fmt.format(spread)}, {n} seeds)"
        head = f"{LABELS.get(self.metric, self.metric)}: {show(self.a, self.a_values)} vs {show(self.b, self.b_values)}"
        if self.winner is None:
            return f"{head} -> {NOT_DISTINGUISHABLE} ({self.reason})"
        return f"{head} -> {self.winner} is better ({self.reason})"


def compare(results, a: str, b: str, metric: str = "exact_match") -> Comparison:
    """Compare the configurations named `a` and `b` of a results table on `metric` with `verdict`."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {list(METRICS)}")
    va, vb = seed_values(results, a, metric), seed_values(results, b, metric)
    side = verdict(va, vb, higher_is_better=METRICS[metric])
    return Comparison(a, b, metric, tuple(va), tuple(vb), {"A": a, "B": b}.get(side))


def pairs(results) -> list[tuple[str, str]]:
    """(LoRA name, QLoRA name) for every QLoRA configuration that has a LoRA partner with the same r, alpha,
    target modules, dropout, rsLoRA and parameters."""
    configs = results.drop_duplicates("name")
    keys = [k for k in PAIR_KEYS if k in configs]
    lora = {tuple(r[k] for k in keys): r["name"] for _, r in configs[configs["method"] == "lora"].iterrows()}
    return [(lora[key], r["name"]) for _, r in configs[configs["method"] == "qlora"].iterrows()
            if (key := tuple(r[k] for k in keys)) in lora]


# --------------------------------------------------------------------------------------------------
# Reference answers of lesson 06's exercises
# --------------------------------------------------------------------------------------------------

def best_under_budget(summary, budget_bytes: float, memory: str = "training_bytes"):
    """The configuration with the highest mean exact match whose mean `memory` is at most `budget_bytes`
    (ties: the less memory, then the fewer trainable parameters), among configurations with at least one
    successful run; None when nothing fits. `summary` has one row per configuration (`summarize`); a
    configuration that two studies share appears twice, which does not change the answer. Returns the row."""
    ok = summary[(summary["n"] > 0) & (summary[memory] <= budget_bytes)].drop_duplicates("name")
    if ok.empty:
        return None
    return ok.sort_values(["exact_match", memory, "trainable_params"], ascending=[False, True, True],
                          kind="stable").iloc[0]


def qlora_overhead(step_times) -> dict:
    """QLoRA's extra time per training step at each model width of the step-time benchmark:
    median(QLoRA step seconds) / median(LoRA step seconds) - 1 over the repeats (0.25 = 25% slower).
    Returns {width: overhead}, widths in increasing order."""
    import statistics

    out = {}
    for width in sorted(set(step_times["width"])):
        at = step_times[step_times["width"] == width]
        lora, qlora = (at[at["method"] == m]["step_seconds"].tolist() for m in ("lora", "qlora"))
        if lora and qlora:
            out[int(width)] = statistics.median(qlora) / statistics.median(lora) - 1
    return out


def step_time_table(step_times):
    """The benchmark per width: median and spread (max - min) of each method's step time, QLoRA's overhead,
    and whether the two differ beyond the spread of the repeats (`verdict`, lower is better)."""
    import pandas as pd

    rows = []
    overhead = qlora_overhead(step_times)
    for width, extra in overhead.items():
        at = step_times[step_times["width"] == width]
        lora, qlora = (at[at["method"] == m]["step_seconds"].tolist() for m in ("lora", "qlora"))
        side = verdict(qlora, lora, higher_is_better=False)
        rows.append({"width": width, "params": int(at["params"].iloc[0]) if "params" in at else None,
                     "lora ms": 1e3 * _median(lora), "lora spread ms": 1e3 * (max(lora) - min(lora)),
                     "qlora ms": 1e3 * _median(qlora), "qlora spread ms": 1e3 * (max(qlora) - min(qlora)),
                     "qlora overhead": extra,
                     "verdict": {"A": "QLoRA faster", "B": "QLoRA slower"}.get(side, "not distinguishable")})
    return pd.DataFrame(rows)


def _median(values):
    import statistics
    return statistics.median(values)
