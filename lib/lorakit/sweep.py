"""Hyperparameter sweeps: one parameterized experiment notebook, executed by papermill once per configuration
and seed. This module answers one question, "what runs, and how": the grid format, its validation, and running.
Reading the results (summaries over seeds, verdicts, the committed results) is lesson 06's, in `lorakit.lab`.

- a **grid file** (YAML) says what to run: `parameters` shared by every run (the experiment notebook's
  UPPER_CASE names), the `seeds` every configuration runs with, a `base` configuration, and `studies` that
  each vary a few fields of it (a list runs every value; several lists run every combination).
  `load_grid("reduced" | "full" | path)` expands it into `Config`s; a configuration that two studies share
  runs once per seed.
- `validate(grid)` rejects bad input **before anything runs**, naming the entry: `r`, `alpha` and `dropout` as
  `lorakit.lora` checks them, `method` "lora" or "qlora", seeds whole numbers, every target module must match
  a linear layer of the model by peft's rule (`lorakit.lora.target_matches`: "o_proj" and "self_attn.o_proj"
  alike), every parameter must be one the experiment notebook declares.
- `run_sweep(grid)` executes `experiments/finetune_experiment.ipynb` (lesson 05's recipe, built from
  lorakit.models / lorakit.data / lorakit.train and peft) per configuration and seed with `lorakit.runner`'s
  notebook runner (papermill) and a progress bar,
  records a run that fails as failed (with its error) and goes on, and writes the results table (one row per
  study, configuration and seed) as CSV and JSON.

Grid file example (the fields of a configuration: method, r, alpha, target_modules, dropout, use_rslora, and
UPPER_CASE experiment parameters such as N_TRAIN)::

    parameters: {MAX_STEPS: 60, N_EVAL: 200}
    seeds: [0, 1, 2]
    base: {method: lora, r: 8, alpha: 16, target_modules: all-linear, dropout: 0.0, use_rslora: false}
    studies:
      rank: {r: [1, 2, 4, 8, 16, 64]}            # alpha stays 16
      rank_alpha_2r: {r: [1, 2, 4, 8, 16, 64], alpha: 2r}
      lora_vs_qlora: {method: [lora, qlora]}
"""

from __future__ import annotations

import itertools
import json
import operator
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.runner import describe_failure, execute

__all__ = ["EXPERIMENTS", "GRIDS", "FIELDS", "NOTEBOOK_NAMES", "MEMORY_COLUMNS", "COLUMNS", "SweepError",
           "Config", "Grid", "load_grid", "notebook_parameters", "linear_modules", "linear_module_names",
           "validate", "run_config", "run_sweep", "default_out", "results_table"]

EXPERIMENTS = Path(__file__).parent / "experiments"
EXPERIMENT_NOTEBOOK = EXPERIMENTS / "finetune_experiment.ipynb"
GRIDS = {"reduced": EXPERIMENTS / "grid_reduced.yml", "full": EXPERIMENTS / "grid_full.yml",
         "inits": EXPERIMENTS / "grid_inits.yml"}   # lesson 07: the other initialisations and LoRA+

METHODS = ("lora", "qlora")
FIELDS = ("method", "r", "alpha", "target_modules", "dropout", "use_rslora")
DEFAULTS = {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0,
            "use_rslora": False}
# Configuration field -> the experiment notebook's parameter it sets.
NOTEBOOK_NAMES = {"method": "METHOD", "r": "LORA_R", "alpha": "LORA_ALPHA", "target_modules": "TARGET_MODULES",
                  "dropout": "LORA_DROPOUT", "use_rslora": "USE_RSLORA"}
# The training state a run holds, measured with lorakit.footprint.measure_training_step: part -> column.
MEMORY_COLUMNS = {"weights": "weight_bytes", "quantization constants": "quant_constant_bytes",
                  "adapters": "adapter_bytes", "gradients": "gradient_bytes", "optimizer states": "optimizer_bytes",
                  "activations": "activation_bytes"}
# The columns of a results table, in order (measurements come from the experiment notebook's JSON).
MEASUREMENTS = ("exact_match", "answer_loss", "trainable_params", "model_bytes", "training_bytes",
                *MEMORY_COLUMNS.values(), "estimated_training_bytes", "estimated_activation_bytes",
                "peak_rss_bytes", "step_seconds", "train_seconds", "final_loss")
COLUMNS = ("study", "name", *FIELDS, "params", "seed", "status", "error", *MEASUREMENTS, "base_dtype", "device",
           "threads", "steps", "batch_size", "n_train", "n_eval", "run_seconds")


class SweepError(ValueError):
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
        """What multiplies B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA (`lorakit.lora.lora_scaling`)."""
        from lorakit.lora import lora_scaling
        return lora_scaling(self.r, self.alpha, self.use_rslora)

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
    """An expanded grid: shared experiment parameters, the seeds, and (study, Config) pairs in file order."""
    name: str
    parameters: dict = field(default_factory=dict)
    entries: list = field(default_factory=list)   # [(study, Config)]
    source: str = ""                               # the file it came from, for messages
    seeds: tuple = (0,)                            # every configuration runs once per seed

    @property
    def configs(self) -> list[Config]:
        """The distinct configurations (one that two studies share runs once)."""
        return list(dict.fromkeys(c for _, c in self.entries))

    def studies(self) -> list[str]:
        return list(dict.fromkeys(s for s, _ in self.entries))

    @property
    def runs(self) -> list[tuple[Config, int]]:
        """Every (configuration, seed) the sweep executes, configuration by configuration."""
        return [(cfg, seed) for cfg in self.configs for seed in self.seeds]

    def with_seeds(self, seeds) -> "Grid":
        """The same grid run with other seeds (checked like a grid file's `seeds`)."""
        return Grid(self.name, dict(self.parameters), list(self.entries), self.source,
                    _seeds(seeds, self.source))


def _num(x):
    return int(x) if isinstance(x, float) and x.is_integer() else x


def load_grid(source="reduced") -> Grid:
    """A grid from "reduced", "full", "inits", a YAML file, or a dict with the same keys. Raises SweepError when the
    file is missing or malformed (validation of the values is `validate`)."""
    if isinstance(source, Grid):
        return source
    if isinstance(source, dict):
        spec, label, name = source, "grid", source.get("name", "grid")
    else:
        path = GRIDS.get(str(source), Path(source))
        if not Path(path).is_file():
            raise SweepError(f"grid {str(source)!r} not found: use one of {list(GRIDS)} or the path of a YAML grid file")
        import yaml
        try:
            spec = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise SweepError(f"{path}: not valid YAML ({e})") from None
        label = str(path)
        name = spec.get("name", Path(path).stem) if isinstance(spec, dict) else ""
    if not isinstance(spec, dict):
        raise SweepError(f"{label}: expected a mapping with 'parameters', 'base' and 'studies'")
    unknown = sorted(set(spec) - {"name", "description", "parameters", "seeds", "base", "studies"})
    if unknown:
        raise SweepError(f"{label}: unknown key(s) {unknown}; a grid has 'parameters', 'seeds', 'base' and 'studies'")
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
    return Grid(str(name), dict(parameters), entries, label, _seeds(spec.get("seeds", [0]), label))


def _seeds(seeds, label: str) -> tuple:
    """A grid's seeds: a non-empty list of distinct whole numbers >= 0 (a single number is one seed; numpy
    integers count as whole numbers)."""
    def whole(s):
        try:
            return None if isinstance(s, bool) else operator.index(s)
        except TypeError:
            return None

    if whole(seeds) is not None:
        seeds = [seeds]
    if (not isinstance(seeds, (list, tuple)) or not seeds
            or not all(whole(s) is not None and whole(s) >= 0 for s in seeds)):
        raise SweepError(f"{label}: seeds={seeds!r}: give a list of whole numbers >= 0, e.g. seeds: [0, 1, 2]")
    seeds = [whole(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{label}: seeds={list(seeds)!r} repeats a seed; each seed runs every configuration once")
    return tuple(seeds)


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
    from lorakit.lora_config import check_hyperparameters, check_rank, check_target_modules

    method = raw["method"]
    if method not in METHODS:
        raise SweepError(f"{where}: method={method!r} is not one of {list(METHODS)}",)
    r, alpha, dropout = raw["r"], raw["alpha"], raw["dropout"]
    try:
        r = check_rank(r)
        if isinstance(alpha, str):  # "2r", "r", "0.5r": a multiple of the rank
            m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)?\s*\*?\s*r\s*", alpha)
            if not m:
                raise ValueError(f"alpha={alpha!r}: give a number or a multiple of r such as '2r'")
            alpha = float(m.group(1) or 1) * r
        check_hyperparameters(r, alpha, dropout)
        targets = raw["target_modules"]
        if targets != "all-linear":  # one name is a list of one (peft would read a string as a regex)
            targets = tuple(check_target_modules([targets] if isinstance(targets, str) else targets))
    except (TypeError, ValueError) as e:
        raise SweepError(f"{where}: {e}") from None
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


def linear_modules(model_id: str) -> list[str]:
    """The full names of the linear layers in `model_id`'s blocks (model.layers.0.self_attn.q_proj, ...; not
    lm_head), read from its config by building the model on the meta device (no weights are loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit import models

    try:
        cfg = AutoConfig.from_pretrained(models.resolve(model_id))
    except OSError as e:
        raise SweepError(f"cannot read the config of MODEL_ID={model_id!r} to check target_modules ({e}); "
                         f"the embedded model is {models.TINY!r}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def linear_module_names(model_id: str) -> list[str]:
    """The distinct short names of the linear layers in `model_id`'s blocks (q_proj, ..., down_proj)."""
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linear_modules(model_id)))


def validate(grid: Grid, parameters: dict | None = None, notebook=EXPERIMENT_NOTEBOOK) -> None:
    """Reject a grid that cannot run, before any run starts: unknown experiment parameters, and target modules
    that the model does not have. (Ranks, methods, alphas and dropouts were checked by `load_grid`.)"""
    declared = notebook_parameters(notebook)
    shared = {**grid.parameters, **(parameters or {})}
    reserved = set(NOTEBOOK_NAMES.values()) | {"RESULT_JSON", "SEED"}
    for name in shared:
        if name not in declared:
            raise SweepError(f"{grid.source}: parameter {name!r} is not one of the experiment notebook's: "
                             f"{sorted(set(declared) - reserved)}")
        if name == "SEED":
            raise SweepError(f"{grid.source}: parameter 'SEED' is set per run: list the seeds under 'seeds', "
                             f"e.g. seeds: [0, 1, 2]")
        if name in reserved:
            raise SweepError(f"{grid.source}: parameter {name!r} is set per configuration: use the field "
                             f"{[k for k, v in NOTEBOOK_NAMES.items() if v == name] or ['(none)']} in 'base' or a study")
    for study, cfg in grid.entries:
        for name, _ in cfg.params:
            if name not in declared or name in reserved:
                raise SweepError(f"{grid.source}: study {study!r}, configuration {cfg.name}: {name!r} is not an "
                                 f"experiment parameter you can set here; choose from {sorted(set(declared) - reserved)}")
    from lorakit.lora import unmatched_targets

    linear_of: dict[str, list[str]] = {}
    for study, cfg in grid.entries:
        model_id = dict(cfg.params).get("MODEL_ID", shared.get("MODEL_ID", declared["MODEL_ID"]))
        if model_id not in linear_of:
            linear_of[model_id] = linear_modules(model_id)
        if not isinstance(cfg.target_modules, str):
            missing = unmatched_targets(linear_of[model_id], list(cfg.target_modules))
            linear = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linear_of[model_id]))
            if missing:
                raise SweepError(f"{grid.source}: study {study!r}, configuration {cfg.name}: target module(s) "
                                 f"{missing} do not exist in {model_id}; its linear layers are {linear} "
                                 f"(or use 'all-linear')")


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------

def run_config(cfg: Config, out_dir: Path, parameters: dict | None = None, notebook=EXPERIMENT_NOTEBOOK,
               timeout: int = 3600, seed: int = 0) -> dict:
    """Execute the experiment notebook for one configuration and seed; returns its measurements plus `status`
    ("ok" or "failed"), `error` and `run_seconds`. Never raises for a failing run."""
    out_dir = Path(out_dir)
    result_json = out_dir / "runs" / f"{cfg.name}_seed{seed}.json"
    executed = out_dir / "runs" / f"{cfg.name}_seed{seed}.ipynb"
    result_json.parent.mkdir(parents=True, exist_ok=True)
    result_json.unlink(missing_ok=True)
    params = {**(parameters or {}), **cfg.notebook_parameters(), "SEED": seed,
              "RESULT_JSON": str(result_json.resolve())}
    t0 = time.perf_counter()
    row = {"status": "ok", "error": ""}
    try:
        # The kernel's own log is quieted: when the sweep runs inside a notebook (lesson 06), each run's
        # kernel would otherwise print its start-up warnings there.
        execute(Path(notebook), executed, params, timeout=timeout, cwd=out_dir, quiet_kernel=True)
        row.update(json.loads(result_json.read_text()))
    except Exception as e:  # a failing configuration is recorded, the sweep goes on
        row["status"], row["error"] = "failed", _describe(e, executed)
    row["run_seconds"] = time.perf_counter() - t0
    return row


def _describe(exc: Exception, executed: Path) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"the experiment notebook wrote no results ({exc.filename})"
    return describe_failure(exc, executed)


def run_sweep(grid="reduced", out_dir: str | os.PathLike | None = None, *, parameters: dict | None = None,
              seeds=None, workers: int = 1, progress: bool = True, notebook=EXPERIMENT_NOTEBOOK,
              timeout: int = 3600, echo=None):
    """Validate `grid`, then run each configuration once per seed with papermill; returns the results as a
    pandas DataFrame (one row per study, configuration and seed, in grid order) and writes results.csv and
    results.json to `out_dir` (default build/sweep/<grid name>). `parameters` override the grid's shared
    experiment parameters (e.g. MODEL_ID, DEVICE); `seeds` overrides the grid's seeds. With `workers` > 1 runs
    go in parallel, each with cpu_count // workers torch threads."""
    from tqdm.auto import tqdm

    grid = load_grid(grid)
    if seeds is not None:
        grid = grid.with_seeds(seeds)
    validate(grid, parameters, notebook)
    shared = {**grid.parameters, **(parameters or {})}
    if workers > 1 and "THREADS" not in shared:
        shared["THREADS"] = max(1, (os.cpu_count() or 1) // workers)
    out_dir = Path(out_dir) if out_dir else default_out(grid)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = grid.runs
    results: dict[tuple, dict] = {}
    bar = tqdm(total=len(runs), desc=f"sweep {grid.name}", unit="run", disable=not progress)
    try:
        def one(run):
            cfg, seed = run
            return run, run_config(cfg, out_dir, shared, notebook, timeout, seed=seed)

        if workers <= 1:
            for run in runs:
                bar.set_postfix_str(f"{run[0].name} seed {run[1]}")
                _, results[run] = one(run)
                _report(bar, echo, run, results[run])
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for run, row in pool.map(one, runs):
                    results[run] = row
                    _report(bar, echo, run, row)
    finally:
        bar.close()
    rows = [{"study": study, **cfg.row(), "seed": seed, **results[(cfg, seed)]}
            for study, cfg in grid.entries for seed in grid.seeds]
    table = results_table(rows)
    table.to_csv(out_dir / "results.csv", index=False)
    table.to_json(out_dir / "results.json", orient="records", indent=1)
    return table


def _report(bar, echo, run, row):
    bar.update(1)
    if echo:
        cfg, seed = run
        extra = (f"exact match {row['exact_match']:.1%}, answer loss {row['answer_loss']:.3f}"
                 if row["status"] == "ok" else row["error"])
        echo(f"{cfg.name:<36} seed {seed:<3} {row['status']:<7} {row['run_seconds']:6.1f} s  {extra}")


def default_out(grid: Grid, root: str | os.PathLike | None = None) -> Path:
    """Where `run_sweep` writes when no folder is given: build/sweep/<grid name> in `root` (default: the current
    folder; `lorakit sweep` passes the course's root)."""
    return Path(root or Path.cwd()) / "build" / "sweep" / grid.name


def results_table(rows):
    """Rows of measurements as a DataFrame with exactly the columns of `COLUMNS`, in order (missing ones empty)."""
    import pandas as pd
    table = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in table:
            table[col] = None
    return table[list(COLUMNS)]
