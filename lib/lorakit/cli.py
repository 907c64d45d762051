"""The `lorakit` command: a thin layer over lorakit.course, lorakit.grading, lorakit.sweep, lorakit.lab and
lorakit.env."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


# Commands that need more than the learner's install: nbgrader generates the student versions and grades.
NEEDS_EXTRA = {"lessons": "instructor", "grade": "instructor", "gradescope": "instructor"}


def _lessons(args) -> int:
    from lorakit import course
    for p in course.generate_lessons(args.lesson or None):
        print(f"wrote {p.relative_to(course.course_root())}")
    return 0


def _run(args) -> int:
    from lorakit import course
    results = course.run_lessons(args.lesson or None, args.params, args.out, student=args.student)
    print()
    print(course.table(results))
    return 0 if all(r.status == "ok" for r in results) else 1


def _env(args) -> int:
    from lorakit import env
    lines = env.report(args.device)
    return 1 if any(l.status == "missing" for l in lines) else 0


def _sweep(args) -> int:
    import time

    from lorakit import lab, sweep
    if args.workers < 1:
        raise sweep.SweepError(f"--workers {args.workers}: at least 1")
    which = args.grid or ("full" if args.full else "reduced")
    if args.ship and which not in lab.SHIPPED_GRIDS:
        raise sweep.SweepError(f"--ship writes the results the kit ships, of the grids {list(lab.SHIPPED_GRIDS)}: "
                               f"use it with --full or --grid inits")
    grid = sweep.load_grid(which)
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise sweep.SweepError(f"--seeds {args.seeds!r}: give whole numbers separated by commas, e.g. 0,1,2") from None
        grid = grid.with_seeds(seeds)
    overrides = _parse_overrides(args.overrides)
    sweep.validate(grid, overrides)
    configs = grid.configs
    print(f"grid {grid.name} ({grid.source}): {len(configs)} configurations in {len(grid.studies())} studies, "
          f"seeds {list(grid.seeds)}: {len(grid.runs)} runs")
    if args.dry_run:
        for cfg in configs:
            studies = [s for s, c in grid.entries if c == cfg]
            print(f"  {cfg.name:<40} {', '.join(studies)}")
        return 0
    out = Path(args.out) if args.out else sweep.default_out(grid, _root_or_cwd())
    t0 = time.perf_counter()
    from tqdm.auto import tqdm
    table = sweep.run_sweep(grid, out, parameters=overrides, workers=args.workers, timeout=args.timeout,
                            echo=tqdm.write)
    seconds = time.perf_counter() - t0
    failed = table[table.status != "ok"].drop_duplicates(["name", "seed"])
    print(f"\n{len(grid.runs)} runs in {seconds:.0f} s, {len(failed)} failed; results: {out / 'results.csv'}")
    if args.ship:
        if len(failed):
            print(f"not shipped: {len(failed)} runs failed, and the committed results must be complete",
                  file=sys.stderr)
            return 1
        path = lab.ship(table, args.command_line, seconds, lab.results_path(which),
                        grid_source=f"lib/lorakit/experiments/{Path(grid.source).name}")
        print(f"shipped: {path}")
    return 1 if len(failed) else 0


def _root_or_cwd() -> Path:
    """The course's root when the command runs inside a checkout (sweeps write to its build/), else here."""
    from lorakit import course
    try:
        return course.course_root()
    except course.CourseError:
        return Path.cwd()


def _parse_overrides(items: list[str]) -> dict:
    import yaml

    from lorakit.sweep import SweepError
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SweepError(f"--set {item!r}: expected NAME=VALUE, e.g. --set DEVICE=cuda")
        out[name.strip()] = yaml.safe_load(value)
    return out


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep", help="run a LoRA/QLoRA hyperparameter grid headless with papermill and write the results table",
        description="Run the experiment notebook once per configuration and seed of a grid (default: the reduced "
                    "grid CI uses) and write results.csv / results.json. Bad grids are rejected before any run.")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--grid", help="a YAML grid file (see lib/lorakit/experiments/grid_full.yml), or the name of "
                                      "one the kit ships: inits (lesson 07's initialisations and LoRA+)")
    which.add_argument("--reduced", action="store_true", help="the reduced grid CI runs (the default)")
    which.add_argument("--full", action="store_true", help="the full grid of lesson 06 (long on a CPU)")
    p.add_argument("--out", help="folder for results and executed runs (default build/sweep/<grid name>)")
    p.add_argument("--workers", type=int, default=1, help="runs at once, each with its share of the CPU threads "
                                                          "(default 1)")
    p.add_argument("--seeds", help="seeds to run every configuration with, e.g. 0,1,2 (default: the grid's)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="overrides",
                   help="override an experiment parameter for every run, e.g. --set DEVICE=cuda "
                        "--set MODEL_ID=HuggingFaceTB/SmolLM2-135M (repeatable)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds one run may take")
    p.add_argument("--dry-run", action="store_true", help="validate and list the configurations, run nothing")
    p.add_argument("--ship", action="store_true",
                   help="with --full or --grid inits: write the results into the kit "
                        "(lib/lorakit/experiments/results_<grid>.csv) with a provenance header, when every run succeeded")
    p.set_defaults(func=_sweep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA and QLoRA, built by hand: the course kit.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("env", help="print the environment check (device, dtype, 4-bit support, versions)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_env)

    p = sub.add_parser("lessons", help="regenerate the student versions in lessons/ from solutions/")
    p.add_argument("lesson", nargs="*", help="lesson names (default: all)")
    p.set_defaults(func=_lessons)

    p = sub.add_parser("run", help="execute solution notebooks headless with papermill and print a table")
    p.add_argument("lesson", nargs="*", help="lesson names (default: all)")
    p.add_argument("--params", help="parameters file (YAML: lesson or 'all' -> NAME: value), e.g. .ci/params.yml")
    p.add_argument("--out", help="folder for executed copies (default build/solutions)")
    p.add_argument("--student", action="store_true", help="run the student versions from lessons/ instead, past errors")
    p.set_defaults(func=_run)

    from lorakit.grading import cli as grading_cli
    grading_cli.add_commands(sub)  # `grade`, `gradescope` and `check`
    _add_sweep(sub)                # `sweep`

    args = parser.parse_args(argv)
    args.command_line = "lorakit " + " ".join(sys.argv[1:] if argv is None else argv)
    from lorakit.course import CourseError
    from lorakit.install import InstallError, require_extra
    from lorakit.sweep import SweepError
    try:
        if args.command in NEEDS_EXTRA:
            require_extra(NEEDS_EXTRA[args.command])
        return args.func(args)
    except (CourseError, SweepError, InstallError) as e:
        print(f"lorakit {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
