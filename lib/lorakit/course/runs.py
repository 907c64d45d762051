"""How did the course's notebooks run? Solution notebooks (or student versions) executed headless with the
parameters CI shrinks (.ci/params.yml), one row per lesson, and read back: which graded cells passed
(`graded_cells`), which other cells stopped Run All (`stopped_cells`). Executing one notebook is
`lorakit.runner`'s, which lesson 06's sweep shares.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from lorakit.course.layout import CourseError, course_root, lesson_path, lessons, select, solution_path
from lorakit.runner import describe_failure, execute

__all__ = ["load_params", "params_for", "RunResult", "graded_cells", "stopped_cells", "run_lessons", "table"]

# -------------------------------------------------------------------------------------- running lessons

def load_params(path: str | os.PathLike | None) -> dict:
    """Read a parameters file: {lesson or 'all': {NAME: value}}. Missing file -> a clear error."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise CourseError(f"parameters file {str(path)!r} not found; the CI one is .ci/params.yml")
    import yaml
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise CourseError(f"{path}: expected a mapping of lesson name (or 'all') to a mapping of parameters")
    valid = set(lessons()) | {"all"}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise CourseError(f"{path}: unknown lesson(s) {unknown}; valid: {', '.join(sorted(valid))}")
    return data


def params_for(lesson: str, params: dict) -> dict:
    return {**params.get("all", {}), **params.get(lesson, {})}


@dataclass
class RunResult:
    lesson: str
    status: str  # "ok" or "failed"
    seconds: float
    output: Path
    error: str = ""
    graded: list = field(default_factory=list)


def graded_cells(nb: nbformat.NotebookNode) -> list[tuple[str, bool, str]]:
    """(grade_id, passed, error) for each graded code cell of an executed notebook."""
    out = []
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type != "code" or not meta.get("grade"):
            continue
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        err = f"{errors[0]['ename']}: {errors[0]['evalue']}" if errors else ""
        out.append((meta.get("grade_id", "?"), not errors, err))
    return out


def _stub_raises_at_top_level(source: str) -> bool:
    """An exercise whose stub is module-level code (`raise NotImplementedError()` outside any function, an answer that
    is a value such as a dict): its cell cannot run before the exercise is solved."""
    import ast
    try:
        return any(isinstance(node, ast.Raise) for node in ast.parse(source).body)
    except SyntaxError:
        return False


def stopped_cells(nb: nbformat.NotebookNode) -> list[str]:
    """The cells of an executed student version that raised, other than its graded test cells and the exercises whose
    stub itself raises at the top level: where Run All would stop before the lesson's end. One line per cell, with its
    index and error."""
    out = []
    for i, cell in enumerate(nb.cells):
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if cell.cell_type != "code" or not errors:
            continue
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("grade") or (meta.get("solution") and _stub_raises_at_top_level(cell.source)):
            continue
        label = meta.get("grade_id") or (cell.source.strip().splitlines() or [""])[0][:60]
        out.append(f"cell {i} ({label}): {errors[0]['ename']}: {errors[0]['evalue']}")
    return out


def run_lessons(names: list[str] | None = None, params_file: str | None = None, out_dir: Path | None = None,
                student: bool = False, root: Path | None = None, echo=print) -> list[RunResult]:
    """Run solution notebooks (or, with student=True, the student versions, going on past errors)."""
    root = root or course_root()
    chosen = select(names, root)
    params = load_params(params_file)
    out_dir = Path(out_dir or root / "build" / ("lessons" if student else "solutions"))
    results = []
    for lesson in chosen:
        src = lesson_path(lesson, root) if student else solution_path(lesson, root)
        dst = out_dir / f"{lesson}.ipynb"
        t0 = time.perf_counter()
        status, error, graded = "ok", "", []
        try:
            nb = execute(src, dst, params_for(lesson, params), allow_errors=student, cwd=src.parent)
            graded = graded_cells(nb)
        except Exception as e:  # papermill's execution error names the cell; keep the run going
            status, error = "failed", describe_failure(e, dst, lesson)
        results.append(RunResult(lesson, status, time.perf_counter() - t0, dst, error, graded))
        if echo:
            echo(f"{lesson:<28} {status:<7} {results[-1].seconds:7.1f} s")
            if error:
                echo("    " + error.replace("\n", "\n    "))
    return results


def table(results: list[RunResult]) -> str:
    rows = [("lesson", "status", "seconds")] + [(r.lesson, r.status, f"{r.seconds:.1f}") for r in results]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}" for a, b, c in rows)
