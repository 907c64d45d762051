"""Hyperparameter sweeps: one parameterized experiment notebook, executed by papermill once per configuration.

`lorakit sweep` and lesson 06 use the same pieces:

- a **grid file** (YAML) says what to run: `parameters` shared by every run (the experiment notebook's
  UPPER_CASE names), a `base` configuration, and `studies` that each vary a few fields of it (a list runs
  every value; several lists run every combination). `load_grid("reduced" | "full" | path)` expands it into
  `Config`s; a configuration that two studies share runs once.
- `validate(grid)` rejects bad input **before anything runs**, naming the entry: `r` must be a positive whole
  number, `method` "lora" or "qlora", every target module must exist in the model, every parameter must be one
  the experiment notebook declares.
- `run_sweep(grid)` executes `experiments/finetune_experiment.ipynb` (lesson 05's recipe, built from
  lorakit.models / lorakit.data / lorakit.train and peft) per configuration with a progress bar, records a
  configuration that fails as failed (with its error) and goes on, and writes the results table as CSV and JSON.
- `committed_results()` reads the full grid's results that ship with the kit (the command that produced them
  is in the file's first lines); `best_under_budget` and `qlora_overhead` are the reference answers to two
  of lesson 06's exercises.

Grid file example (the fields of a configuration: method, r, alpha, target_modules, dropout, use_rslora, and
UPPER_CASE experiment parameters such as N_TRAIN)::

    parameters: {MAX_STEPS: 60, N_EVAL: 100}
    base: {method: lora, r: 8, alpha: 16, target_modules: [q_proj, v_proj], dropout: 0.0, use_rslora: false}
    studies:
      rank: {r: [1, 2, 4, 8, 16, 64]}            # alpha stays 16
      rank_alpha_2r: {r: [1, 2, 4, 8, 16, 64], alpha: 2r}
      lora_vs_qlora: {method: [lora, qlora]}
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .course import CourseError

EXPERIMENTS = Path(__file__).parent / "experiments"
EXPERIMENT_NOTEBOOK = EXPERIMENTS / "finetune_experiment.ipynb"
GRIDS = {"reduced": EXPERIMENTS / "grid_reduced.yml", "full": EXPERIMENTS / "grid_full.yml"}
COMMITTED_RESULTS = EXPERIMENTS / "results_full.csv"

METHODS = ("lora", "qlora")
FIELDS = ("method", "r", "alpha", "target_modules", "dropout", "use_rslora")
DEFAULTS = {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0,
            "use_rslora": False}
# Configuration field -> the experiment notebook's parameter it sets.
NOTEBOOK_NAMES = {"method": "METHOD", "r": "LORA_R", "alpha": "LORA_ALPHA", "target_modules": "TARGET_MODULES",
                  "dropout": "LORA_DROPOUT", "use_rslora": "USE_RSLORA"}
# The columns of a results table, in order (measurements come from the experiment notebook's JSON).
MEASUREMENTS = ("exact_match", "trainable_params", "model_bytes", "peak_memory_bytes", "step_seconds",
                "train_seconds", "final_loss")
COLUMNS = ("study", "name", *FIELDS, "params", "status", "error", *MEASUREMENTS, "peak_memory_kind",
           "base_dtype", "device", "threads", "steps", "n_train", "n_eval", "run_seconds")


class SweepError(CourseError):
    """A grid that cannot run, explained (the `lorakit` command exits with status 2)."""


# --------------------------------------------------------------------------------------------------
# Grids and configurations
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """One point of a sweep: a LoRA/QLoRA configuration plus experiment parameters it overrides."""
    method: str = "lora"
    r: int = 8
    alpha: float = 16
    target_modules: tuple | str = ("q_proj", "v_proj")   # a tuple of names, or "all-linear"
    dropout: float = 0.0
    use_rslora: bool = False
    params: tuple = ()                                    # sorted (NAME, value) pairs for the notebook

    @property
    def name(self) -> str:
        """A short, file-name-safe label: lora_r8_a16_q+v, qlora_r4_a8_all-linear_d0.1_rslora, ..."""
        targets = (self.target_modules if isinstance(self.target_modules, str)
                   else "+".join(t.removesuffix("_proj") for t in self.target_modules))
        parts = [self.method, f"r{self.r}", f"a{_num(self.alpha)}", targets]
        if self.dropout:
            parts.append(f"d{_num(self.dropout)}")
        if self.use_rslora:
            parts.append("rslora")
        parts += [f"{k}={_num(v) if isinstance(v, (int, float)) else v}" for k, v in self.params]
        return re.sub(r"[^A-Za-z0-9_.+=-]", "-", "_".join(parts))

    @property
    def scaling(self) -> float:
        """What multiplies B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def notebook_parameters(self) -> dict:
        """The parameters papermill injects into the experiment notebook for this configuration."""
        out = {NOTEBOOK_NAMES[f]: getattr(self, f) for f in FIELDS}
        out["TARGET_MODULES"] = (self.target_modules if isinstance(self.target_modules, str)
                                 else list(self.target_modules))
        out.update(dict(self.params))
        return out

    def row(self) -> dict:
        """The configuration's columns of the results table."""
        return {"name": self.name, "method": self.method, "r": self.r, "alpha": self.alpha,
                "target_modules": (self.target_modules if isinstance(self.target_modules, str)
                                   else "+".join(self.target_modules)),
                "dropout": self.dropout, "use_rslora": self.use_rslora,
                "params": json.dumps(dict(self.params), sort_keys=True) if self.params else ""}


@dataclass
class Grid:
    """An expanded grid: shared experiment parameters and (study, Config) pairs in file order."""
    name: str
    parameters: dict = field(default_factory=dict)
    entries: list = field(default_factory=list)   # [(study, Config)]
    source: str = ""                               # the file it came from, for messages

    @property
    def configs(self) -> list[Config]:
        """The distinct configurations (one that two studies share runs once)."""
        return list(dict.fromkeys(c for _, c in self.entries))

    def studies(self) -> list[str]:
        return list(dict.fromkeys(s for s, _ in self.entries))


def _num(x):
    return int(x) if isinstance(x, float) and x.is_integer() else x


def load_grid(source="reduced") -> Grid:
    """A grid from "reduced", "full", a YAML file, or a dict with the same keys. Raises SweepError when the
    file is missing or malformed (validation of the values is `validate`)."""
    if isinstance(source, Grid):
        return source
    if isinstance(source, dict):
        spec, label, name = source, "grid", source.get("name", "grid")
    else:
        path = GRIDS.get(str(source), Path(source))
        if not Path(path).is_file():
            raise SweepError(f"grid {str(source)!r} not found: use 'reduced', 'full' or the path of a YAML grid file")
        import yaml
        try:
            spec = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise SweepError(f"{path}: not valid YAML ({e})") from None
        label = str(path)
        name = spec.get("name", Path(path).stem) if isinstance(spec, dict) else ""
    if not isinstance(spec, dict):
        raise SweepError(f"{label}: expected a mapping with 'parameters', 'base' and 'studies'")
    unknown = sorted(set(spec) - {"name", "description", "parameters", "base", "studies"})
    if unknown:
        raise SweepError(f"{label}: unknown key(s) {unknown}; a grid has 'parameters', 'base' and 'studies'")
    parameters = spec.get("parameters") or {}
    base = spec.get("base") or {}
    studies = spec.get("studies") or {}
    for key, val in (("parameters", parameters), ("base", base), ("studies", studies)):
        if not isinstance(val, dict):
            raise SweepError(f"{label}: '{key}' must be a mapping, found {type(val).__name__}")
    if not studies:
        raise SweepError(f"{label}: no studies: add at least one under 'studies', e.g. rank: {{r: [2, 8]}}")
    entries = []
    for study, varies in studies.items():
        # A study is one mapping (lists in it run every combination) or a list of such mappings (for
        # configurations that change several fields together, e.g. equal trainable-parameter budgets).
        parts = varies if isinstance(varies, list) else [varies or {}]
        for part in parts:
            if not isinstance(part, dict):
                raise SweepError(f"{label}: study {study!r} must map fields to values, e.g. {{r: [2, 8]}}, "
                                 f"or be a list of such mappings")
            keys = list(part)
            values = [v if _varies(k, v) else [v] for k, v in part.items()]
            if any(not v for v in values):
                raise SweepError(f"{label}: study {study!r} has an empty list of values")
            for combo in itertools.product(*values):
                raw = {**DEFAULTS, **base, **dict(zip(keys, combo))}
                where = (f"{label}: study {study!r}, configuration "
                         + ", ".join(f"{k}={v!r}" for k, v in zip(keys, combo)))
                entries.append((str(study), _config(raw, where)))
    return Grid(str(name), dict(parameters), entries, label)


def _varies(key, value) -> bool:
    """A list in a study means "run each value", except that one list of module names is one value of
    target_modules: [q_proj, v_proj] is one choice, [[q_proj, v_proj], all-linear] two."""
    if not isinstance(value, list):
        return False
    if key == "target_modules":
        return any(isinstance(v, list) or v == "all-linear" for v in value)
    return True


def _config(raw: dict, where: str) -> Config:
    """Build a Config from a merged mapping, checking each value (not yet against a model)."""
    unknown = sorted(k for k in raw if k not in FIELDS and not (isinstance(k, str) and k.isupper()))
    if unknown:
        raise SweepError(f"{where}: unknown field(s) {unknown}; a configuration has {list(FIELDS)} and "
                         f"UPPER_CASE experiment parameters such as N_TRAIN")
    method = raw["method"]
    if method not in METHODS:
        raise SweepError(f"{where}: method={method!r} is not one of {list(METHODS)}",)
    r = raw["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise SweepError(f"{where}: r={r!r}: the rank must be a positive whole number (1, 2, 4, 8, ...)")
    alpha = raw["alpha"]
    if isinstance(alpha, str):  # "2r", "r", "0.5r": a multiple of the rank
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)?\s*\*?\s*r\s*", alpha)
        if not m:
            raise SweepError(f"{where}: alpha={alpha!r}: give a number or a multiple of r such as '2r'")
        alpha = float(m.group(1) or 1) * r
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise SweepError(f"{where}: alpha={alpha!r}: alpha must be a positive number (or a multiple of r like '2r')")
    targets = raw["target_modules"]
    if isinstance(targets, str):
        if targets != "all-linear":
            targets = [targets]
    if not isinstance(targets, str):
        if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise SweepError(f"{where}: target_modules={targets!r}: give a list of module names, e.g. "
                             f"[q_proj, v_proj], or 'all-linear'")
        targets = tuple(targets)
    dropout = raw["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise SweepError(f"{where}: dropout={dropout!r}: a probability from 0 up to (not including) 1")
    rslora = raw["use_rslora"]
    if not isinstance(rslora, bool):
        raise SweepError(f"{where}: use_rslora={rslora!r}: true or false")
    params = tuple(sorted((k, _hashable(v)) for k, v in raw.items() if k not in FIELDS))
    return Config(method, r, _num(float(alpha)), targets, _num(float(dropout)), rslora, params)


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


# --------------------------------------------------------------------------------------------------
# Validation against the experiment notebook and the model
# --------------------------------------------------------------------------------------------------

def notebook_parameters(notebook: str | os.PathLike = EXPERIMENT_NOTEBOOK) -> dict:
    """The names and default values in the experiment notebook's parameters cell."""
    import ast

    import papermill as pm

    def value(src):
        try:
            return ast.literal_eval(src)
        except (ValueError, SyntaxError):
            return src
    return {name: value(p["default"]) for name, p in pm.inspect_notebook(str(notebook)).items()}


def linear_module_names(model_id: str) -> list[str]:
    """The distinct names of the linear layers in `model_id`'s blocks (q_proj, ..., down_proj), read from
    its config by building the model on the meta device (no weights are loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import models

    try:
        cfg = AutoConfig.from_pretrained(models.resolve(model_id))
    except OSError as e:
        raise SweepError(f"cannot read the config of MODEL_ID={model_id!r} to check target_modules ({e}); "
                         f"the embedded model is {models.TINY!r}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return [n for n in dict.fromkeys(names) if n != "lm_head"]


def validate(grid: Grid, parameters: dict | None = None, notebook=EXPERIMENT_NOTEBOOK) -> None:
    """Reject a grid that cannot run, before any run starts: unknown experiment parameters, and target modules
    that the model does not have. (Ranks, methods, alphas and dropouts were checked by `load_grid`.)"""
    declared = notebook_parameters(notebook)
    shared = {**grid.parameters, **(parameters or {})}
    reserved = set(NOTEBOOK_NAMES.values()) | {"RESULT_JSON"}
    for name in shared:
        if name not in declared:
            raise SweepError(f"{grid.source}: parameter {name!r} is not one of the experiment notebook's: "
                             f"{sorted(set(declared) - reserved)}")
        if name in reserved:
            raise SweepError(f"{grid.source}: parameter {name!r} is set per configuration: use the field "
                             f"{[k for k, v in NOTEBOOK_NAMES.items() if v == name] or ['(none)']} in 'base' or a study")
    for study, cfg in grid.entries:
        for name, _ in cfg.params:
            if name not in declared or name in reserved:
                raise SweepError(f"{grid.source}: study {study!r}, configuration {cfg.name}: {name!r} is not an "
                                 f"experiment parameter you can set here; choose from {sorted(set(declared) - reserved)}")
    linear_of: dict[str, list[str]] = {}
    for study, cfg in grid.entries:
        model_id = dict(cfg.params).get("MODEL_ID", shared.get("MODEL_ID", declared["MODEL_ID"]))
        if model_id not in linear_of:
            linear_of[model_id] = linear_module_names(model_id)
        linear = linear_of[model_id]
        if not isinstance(cfg.target_modules, str):
            missing = [t for t in cfg.target_modules if t not in linear]
            if missing:
                raise SweepError(f"{grid.source}: study {study!r}, configuration {cfg.name}: target module(s) "
                                 f"{missing} do not exist in {model_id}; its linear layers are {linear} "
                                 f"(or use 'all-linear')")


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------

def run_config(cfg: Config, out_dir: Path, parameters: dict | None = None, notebook=EXPERIMENT_NOTEBOOK,
               timeout: int = 3600) -> dict:
    """Execute the experiment notebook for one configuration; returns its measurements plus `status`
    ("ok" or "failed"), `error` and `run_seconds`. Never raises for a failing run."""
    out_dir = Path(out_dir)
    result_json = out_dir / "runs" / f"{cfg.name}.json"
    executed = out_dir / "runs" / f"{cfg.name}.ipynb"
    result_json.parent.mkdir(parents=True, exist_ok=True)
    result_json.unlink(missing_ok=True)
    params = {**(parameters or {}), **cfg.notebook_parameters(), "RESULT_JSON": str(result_json.resolve())}
    t0 = time.perf_counter()
    row = {"status": "ok", "error": ""}
    try:
        _execute(Path(notebook), executed, params, timeout, out_dir)
        row.update(json.loads(result_json.read_text()))
    except Exception as e:  # a failing configuration is recorded, the sweep goes on
        row["status"], row["error"] = "failed", _describe(e, executed)
    row["run_seconds"] = time.perf_counter() - t0
    return row


def _execute(notebook: Path, output: Path, params: dict, timeout: int, cwd: Path) -> None:
    """papermill, as `lorakit.course.execute` runs lessons, with the kernel's own log quieted: when the sweep
    runs inside a notebook (lesson 06), each run's kernel would otherwise print its start-up warnings there."""
    import papermill as pm
    # The kernel inherits the caller's environment unchanged (offline in tests and CI; a hub MODEL_ID set
    # with --set may download elsewhere): nothing here changes os.environ, which worker threads share.
    pm.execute_notebook(str(notebook), str(output), parameters=params, kernel_name="python3", cwd=str(cwd),
                        progress_bar=False, execution_timeout=timeout,
                        extra_arguments=["--IPKernelApp.log_level=CRITICAL"])


def _describe(exc: Exception, executed: Path) -> str:
    from papermill.exceptions import PapermillExecutionError
    if isinstance(exc, PapermillExecutionError):
        return f"{exc.ename}: {exc.evalue} (cell {exc.exec_count}; executed copy {executed})"
    if isinstance(exc, FileNotFoundError):
        return f"the experiment notebook wrote no results ({exc.filename})"
    return f"{type(exc).__name__}: {exc}"


def run_sweep(grid="reduced", out_dir: str | os.PathLike | None = None, *, parameters: dict | None = None,
              workers: int = 1, progress: bool = True, notebook=EXPERIMENT_NOTEBOOK, timeout: int = 3600,
              echo=None):
    """Validate `grid`, then run each configuration with papermill; returns the results as a pandas DataFrame
    (one row per study and configuration) and writes results.csv and results.json to `out_dir` (default
    build/sweep/<grid name>). `parameters` override the grid's shared experiment parameters (e.g. MODEL_ID,
    DEVICE). With `workers` > 1 runs go in parallel, each with cpu_count // workers torch threads."""
    from tqdm.auto import tqdm

    grid = load_grid(grid)
    validate(grid, parameters, notebook)
    shared = {**grid.parameters, **(parameters or {})}
    if workers > 1 and "THREADS" not in shared:
        shared["THREADS"] = max(1, (os.cpu_count() or 1) // workers)
    out_dir = Path(out_dir) if out_dir else _default_out(grid)
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = grid.configs
    results: dict[Config, dict] = {}
    bar = tqdm(total=len(configs), desc=f"sweep {grid.name}", unit="config", disable=not progress)
    try:
        def one(cfg):
            return cfg, run_config(cfg, out_dir, shared, notebook, timeout)

        if workers <= 1:
            for cfg in configs:
                bar.set_postfix_str(cfg.name)
                _, results[cfg] = one(cfg)
                _report(bar, echo, cfg, results[cfg])
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for cfg, row in pool.map(one, configs):
                    results[cfg] = row
                    _report(bar, echo, cfg, row)
    finally:
        bar.close()
    rows = [{"study": study, **cfg.row(), **results[cfg]} for study, cfg in grid.entries]
    table = _frame(rows)
    write_results(table, out_dir / "results.csv")
    table.to_json(out_dir / "results.json", orient="records", indent=1)
    return table


def _report(bar, echo, cfg, row):
    bar.update(1)
    if echo:
        extra = (f"exact match {row['exact_match']:.1%}, {row['step_seconds']:.3f} s/step"
                 if row["status"] == "ok" else row["error"])
        echo(f"{cfg.name:<40} {row['status']:<7} {row['run_seconds']:6.1f} s  {extra}")


def _default_out(grid: Grid) -> Path:
    from . import course
    try:
        root = course.course_root()
    except CourseError:
        root = Path.cwd()
    return root / "build" / "sweep" / grid.name


def _frame(rows):
    import pandas as pd
    table = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in table:
            table[col] = None
    return table[list(COLUMNS)]


# --------------------------------------------------------------------------------------------------
# Results files
# --------------------------------------------------------------------------------------------------

def write_results(table, path: str | os.PathLike, header: list[str] | None = None) -> Path:
    """Write a results table as CSV, with optional provenance lines (`# ...`) on top."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"# {line}\n" for line in (header or [])) + table.to_csv(index=False)
    path.write_text(text)
    return path


def read_results(path: str | os.PathLike):
    """A results table written by `run_sweep` or `write_results` (leading `# ...` lines are provenance)."""
    import io

    import pandas as pd
    lines = Path(path).read_text().splitlines(keepends=True)
    body = "".join(itertools.dropwhile(lambda l: l.startswith("#"), lines))
    table = pd.read_csv(io.StringIO(body), keep_default_na=False, na_values=[""])
    for col in ("error", "params", "peak_memory_kind", "base_dtype", "device"):
        if col in table:
            table[col] = table[col].astype(object).fillna("")
    return table


def provenance(path: str | os.PathLike = COMMITTED_RESULTS) -> list[str]:
    """The `# ...` lines on top of a results file: the command that produced it, where and when."""
    out = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        out.append(line.lstrip("# ").rstrip())
    return out


def committed_results():
    """The full grid's results that ship with the kit (see `provenance()` for how they were made)."""
    return read_results(COMMITTED_RESULTS)


# --------------------------------------------------------------------------------------------------
# Reading results (the reference answers to lesson 06's exercises)
# --------------------------------------------------------------------------------------------------

PAIR_KEYS = ("r", "alpha", "target_modules", "dropout", "use_rslora", "params")


def best_under_budget(results, budget_bytes: float, memory: str = "peak_memory_bytes"):
    """The successful run with the highest exact match whose `memory` column is at most `budget_bytes`
    (ties: the less memory, then the fewer trainable parameters); None when nothing fits.
    Returns the row (a pandas Series)."""
    ok = results[results["status"] == "ok"].drop_duplicates("name")
    fits = ok[ok[memory] <= budget_bytes]
    if fits.empty:
        return None
    order = fits.sort_values(["exact_match", memory, "trainable_params"], ascending=[False, True, True],
                             kind="stable")
    return order.iloc[0]


def paired_ratios(results, column: str) -> list[float]:
    """qlora / lora of `column` for each successful QLoRA run paired with the successful LoRA run that
    matches it in everything but the method (r, alpha, target_modules, dropout, use_rslora, params).
    Pairs whose LoRA value is 0 are left out."""
    ok = results[results["status"] == "ok"].drop_duplicates("name")
    keys = [k for k in PAIR_KEYS if k in ok]
    lora = {tuple(row[k] for k in keys): row[column] for _, row in ok[ok["method"] == "lora"].iterrows()}
    return [row[column] / lora[key] for _, row in ok[ok["method"] == "qlora"].iterrows()
            if (key := tuple(row[k] for k in keys)) in lora and lora[key] != 0]


def qlora_overhead(results, column: str = "step_seconds") -> float:
    """QLoRA's slowdown relative to LoRA: the median over matched pairs (see `paired_ratios`) of
    qlora / lora - 1 (0.25 = 25% slower). Raises ValueError when there is no pair."""
    import statistics
    ratios = paired_ratios(results, column)
    if not ratios:
        raise ValueError("no QLoRA run has a LoRA run with the same r, alpha, target_modules, dropout and "
                         "use_rslora to compare with")
    return statistics.median(ratios) - 1


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------

LABELS = {"exact_match": "held-out exact match", "trainable_params": "trainable parameters",
          "model_bytes": "model bytes (weights + adapters)", "peak_memory_bytes": "peak memory (bytes)",
          "step_seconds": "seconds per step", "final_loss": "final training loss", "r": "rank r",
          "alpha": "alpha", "dropout": "dropout", "scaling": "scaling (alpha / r)"}


def plot_study(results, study: str, x: str = "r", y: str = "exact_match", hue: str | None = None, ax=None):
    """One study of a results table: `y` against `x`, one line per value of `hue` (default: the field
    that varies besides `x`, if any). Failed runs are left out. Returns the Axes."""
    import matplotlib.pyplot as plt
    rows = results[(results["study"] == study) & (results["status"] == "ok")].copy()
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.4))
    if rows.empty:
        ax.set_title(f"{study}: no successful runs")
        return ax
    if "scaling" not in rows:
        rows["scaling"] = [a / (math.sqrt(r) if rs else r) for a, r, rs in zip(rows.alpha, rows.r, rows.use_rslora)]
    if hue is None:
        varying = [c for c in ("method", "alpha", "use_rslora", "target_modules", "dropout")
                   if c != x and rows[c].nunique() > 1]
        hue = varying[0] if varying else None
    groups = rows.groupby(hue, sort=False) if hue else [("", rows)]
    numeric_x = rows[x].dtype.kind in "if"
    for label, g in groups:
        g = g.sort_values(x) if numeric_x else g
        xs = g[x].astype(float) if numeric_x else g[x].astype(str)
        # exact match on n examples: error bars of two standard errors, so that noise looks like noise
        yerr = (2 * (g[y] * (1 - g[y]) / g["n_eval"].astype(float)) ** 0.5
                if y == "exact_match" and "n_eval" in g else None)
        ax.errorbar(xs, g[y], yerr=yerr, marker="o", capsize=3, label=f"{hue}={label}" if hue else None)
    if numeric_x and x in ("r", "trainable_params", "model_bytes") and rows[x].max() / max(rows[x].min(), 1e-9) > 8:
        ax.set_xscale("log", base=2)
        if x == "r":
            ticks = sorted(rows[x].unique())
            ax.set_xticks(ticks, [str(int(t)) for t in ticks])
    if y == "exact_match":
        ax.set_ylim(0, 1)
    ax.set(xlabel=LABELS.get(x, x), ylabel=LABELS.get(y, y), title=study)
    if hue:
        ax.legend(fontsize=8)
    ax.figure.tight_layout()
    return ax


# --------------------------------------------------------------------------------------------------
# The `lorakit sweep` command
# --------------------------------------------------------------------------------------------------

def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="run a LoRA/QLoRA hyperparameter grid headless with papermill and write the results table",
        description="Run the experiment notebook once per configuration of a grid (default: the reduced grid "
                    "CI uses) and write results.csv / results.json. Bad grids are rejected before any run.")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--grid", help="a YAML grid file (see lib/lorakit/experiments/grid_full.yml)")
    which.add_argument("--reduced", action="store_true", help="the reduced grid CI runs (the default)")
    which.add_argument("--full", action="store_true", help="the full grid of lesson 06 (long on a CPU)")
    p.add_argument("--out", help="folder for results and executed runs (default build/sweep/<grid name>)")
    p.add_argument("--workers", type=int, default=1, help="configurations run at once (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="overrides",
                   help="override an experiment parameter for every run, e.g. --set DEVICE=cuda "
                        "--set MODEL_ID=HuggingFaceTB/SmolLM2-135M (repeatable)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds one configuration may take")
    p.add_argument("--dry-run", action="store_true", help="validate and list the configurations, run nothing")
    p.set_defaults(func=_cli)


def _parse_overrides(items: list[str]) -> dict:
    import yaml
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SweepError(f"--set {item!r}: expected NAME=VALUE, e.g. --set DEVICE=cuda")
        out[name.strip()] = yaml.safe_load(value)
    return out


def _cli(args) -> int:
    if args.workers < 1:
        raise SweepError(f"--workers {args.workers}: at least 1")
    grid = load_grid(args.grid or ("full" if args.full else "reduced"))
    overrides = _parse_overrides(args.overrides)
    validate(grid, overrides)
    configs = grid.configs
    print(f"grid {grid.name} ({grid.source}): {len(configs)} configurations in {len(grid.studies())} studies")
    if args.dry_run:
        for cfg in configs:
            studies = [s for s, c in grid.entries if c == cfg]
            print(f"  {cfg.name:<40} {', '.join(studies)}")
        return 0
    out = Path(args.out) if args.out else _default_out(grid)
    t0 = time.perf_counter()
    from tqdm.auto import tqdm
    table = run_sweep(grid, out, parameters=overrides, workers=args.workers, timeout=args.timeout,
                      echo=tqdm.write)
    failed = table[table.status != "ok"].drop_duplicates("name")
    print(f"\n{len(configs)} configurations in {time.perf_counter() - t0:.0f} s, {len(failed)} failed; "
          f"results: {out / 'results.csv'}")
    return 1 if len(failed) else 0
