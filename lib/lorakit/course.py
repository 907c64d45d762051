"""The lesson pipeline: solutions/ -> lessons/ with nbgrader, solution notebooks run with papermill.

- `generate_lessons()` stamps each solution's header (Colab badge, setup cell), then runs nbgrader's
  generate_assignment so lessons/NN_topic/NN_topic.ipynb is the student version (outputs cleared,
  solutions stubbed, hidden tests removed).
- `run_lessons()` executes notebooks headless with papermill, injecting parameters (.ci/params.yml
  shrinks them for CI), writes executed copies to build/, and returns a table of lesson, status, seconds.
- `graded_cells()` reads an executed notebook back: which graded test cells passed; `stopped_cells()` which other
  cells raised (where Run All on a student version would stop before its end).
- `exercise()`, `test()`, `markdown()`, `code()`, `parameters()`, `notebook()` build nbgrader cells, for
  authors and for tests that make submissions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

__all__ = ["REPOSITORY", "BRANCH", "BADGE_IMAGE", "KERNEL", "NBGRADER_DIR", "CourseError", "course_root", "work_dir",
           "lessons", "select", "solution_path", "lesson_path", "markdown", "code", "parameters", "exercise", "test",
           "notebook", "colab_url", "colab_badge", "colab_requirement", "colab_install_commands", "setup_source",
           "stamp", "tools_env", "run_nbgrader", "generate_assignment", "generate_lessons", "write_clean",
           "load_params", "params_for", "RunResult", "execute", "graded_cells", "stopped_cells", "run_lessons",
           "describe_failure", "table"]

REPOSITORY = "https://github.com/lorakit/lorakit"  # the one place the course's public URL is configured
BRANCH = "main"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
KERNEL = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
# The course's nbgrader folder: nbgrader_config.py (nbgrader reads it from its working directory) and, in
# work/, what grading writes (gradebook, submissions, feedback, job folders; ignored by git). The name says
# whose configuration it is and is no package's name: a folder named nbgrader/ would shadow the nbgrader
# package for anything that puts the course folder on sys.path.
NBGRADER_DIR = "nbgrader_course"


class CourseError(Exception):
    """A problem with the course files or a command's arguments, explained for the person who ran it."""


# ---------------------------------------------------------------------------------------------- layout

def course_root(start: str | os.PathLike | None = None) -> Path:
    """The course directory: $LORAKIT_COURSE_DIR, or the nearest folder above `start` (default: the
    current directory, then this package) that holds solutions/ and nbgrader_course/nbgrader_config.py."""
    env = os.environ.get("LORAKIT_COURSE_DIR")
    if env:
        return Path(env).resolve()
    candidates = [Path(start or os.getcwd()).resolve(), Path(__file__).resolve()]
    for c in candidates:
        for d in (c, *c.parents):
            if (d / "solutions").is_dir() and (d / NBGRADER_DIR / "nbgrader_config.py").is_file():
                return d
    raise CourseError(f"could not find the course folder (one with solutions/ and {NBGRADER_DIR}/nbgrader_config.py): "
                      "run this from inside the lorakit repository or set LORAKIT_COURSE_DIR")


def work_dir(root: Path | None = None) -> Path:
    """Where grading writes (nbgrader_course/work/: gradebook, submissions, feedback, job folders)."""
    return (root or course_root()) / NBGRADER_DIR / "work"


def lessons(root: Path | None = None) -> list[str]:
    """Lesson names (NN_topic), in course order."""
    root = root or course_root()
    return sorted(p.name for p in (root / "solutions").iterdir()
                  if p.is_dir() and (p / f"{p.name}.ipynb").is_file())


def select(names: list[str] | None, root: Path | None = None) -> list[str]:
    """Validate lesson names; a bare number ("2" or "02") or topic ("lora") is accepted too."""
    valid = lessons(root)
    if not names:
        return valid
    out = []
    for n in names:
        n = Path(n).name.removesuffix(".ipynb")
        hits = [v for v in valid if v == n or v.split("_", 1)[0] == n.zfill(2) or v.split("_", 1)[1] == n]
        if len(hits) != 1:
            raise CourseError(f"unknown lesson {n!r}; valid lessons: {', '.join(valid)}")
        out.append(hits[0])
    return out


def solution_path(lesson: str, root: Path | None = None) -> Path:
    return (root or course_root()) / "solutions" / lesson / f"{lesson}.ipynb"


def lesson_path(lesson: str, root: Path | None = None) -> Path:
    return (root or course_root()) / "lessons" / lesson / f"{lesson}.ipynb"


# ---------------------------------------------------------------------------------------- cell builders

def _lines(src: str) -> str:
    return src.strip("\n")


def markdown(src: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(_lines(src))


def code(src: str, tags: list[str] | None = None) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(_lines(src))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def parameters(src: str) -> nbformat.NotebookNode:
    """The papermill `parameters` cell: what CI shrinks and what a GPU user changes."""
    return code(src, tags=["parameters"])


def _nbgrader(cell, grade_id: str, *, solution: bool, grade: bool, points: float = 0, locked: bool = False):
    if not _lines(cell.source).startswith(f"# {grade_id}"):
        cell.source = f"# {grade_id}\n" + cell.source
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3, "solution": solution}
    if grade:
        meta["points"] = points
    cell.metadata["nbgrader"] = meta
    return cell


def exercise(grade_id: str, src: str) -> nbformat.NotebookNode:
    """An autograded answer cell: `src` holds `### BEGIN SOLUTION` / `### END SOLUTION` markers."""
    if "### BEGIN SOLUTION" not in src:
        raise CourseError(f"exercise {grade_id}: the source needs ### BEGIN SOLUTION / ### END SOLUTION markers")
    return _nbgrader(code(src), grade_id, solution=True, grade=False)


def test(grade_id: str, src: str, points: float = 1) -> nbformat.NotebookNode:
    """An autograded test cell: a visible self-check, then optionally `### BEGIN HIDDEN TESTS` ... ."""
    return _nbgrader(code(src), grade_id, solution=False, grade=True, points=points, locked=True)


def notebook(cells: list) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    nb.metadata["kernelspec"] = dict(KERNEL)
    nb.metadata["language_info"] = {"name": "python"}
    return nb


# ---------------------------------------------------------------------------- header: badge, setup cell

def colab_url(lesson: str) -> str:
    slug = REPOSITORY.removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{slug}/blob/{BRANCH}/lessons/{lesson}/{lesson}.ipynb"


def colab_badge(lesson: str) -> str:
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(lesson)})"


def colab_requirement() -> str:
    """The pip requirement the setup cell installs on Colab: the kit from the repository."""
    return f"lorakit @ git+{REPOSITORY}@{BRANCH}"


def colab_install_commands() -> list[list[str]]:
    """What the setup cell runs on Colab: the kit alone (no dependencies), then the kit's own installer
    (`lorakit.install colab`), which adds the learner's dependencies with the course's stack at its tested
    versions and keeps what Colab already has in range, its CUDA torch first of all."""
    return [[sys.executable, "-m", "pip", "install", "-q", "--no-deps", colab_requirement()],
            [sys.executable, "-m", "lorakit.install", "colab"]]


SETUP_SOURCE = """\
# Setup: on Colab this installs the kit and its tested stack; on your own machine it does nothing.
import importlib.util, subprocess, sys
ON_COLAB = importlib.util.find_spec("google") is not None and importlib.util.find_spec("google.colab") is not None
if ON_COLAB:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "{requirement}"], check=True)
    subprocess.run([sys.executable, "-m", "lorakit.install", "colab"], check=True)
from lorakit.env import print_versions
print_versions()"""


def setup_source() -> str:
    return SETUP_SOURCE.format(requirement=colab_requirement())


def stamp(nb: nbformat.NotebookNode, lesson: str) -> bool:
    """Make the first cell carry this lesson's Colab badge and the cell tagged `setup` the standard setup
    source. Returns True when something changed."""
    changed = False
    if not nb.cells or nb.cells[0].cell_type != "markdown":
        raise CourseError(f"{lesson}: the first cell must be the markdown title cell")
    first = nb.cells[0]
    lines = first.source.split("\n")
    badge = colab_badge(lesson)
    idx = next((i for i, l in enumerate(lines) if "colab.research.google.com" in l), None)
    if idx is None:
        lines.insert(1, "")
        lines.insert(2, badge)
    elif lines[idx] != badge:
        lines[idx] = badge
    new = "\n".join(lines)
    if new != first.source:
        first.source, changed = new, True
    setups = [c for c in nb.cells if "setup" in c.metadata.get("tags", [])]
    if len(setups) != 1:
        raise CourseError(f"{lesson}: exactly one code cell must be tagged 'setup' (found {len(setups)})")
    if setups[0].source != setup_source():
        setups[0].source, changed = setup_source(), True
    return changed


# ------------------------------------------------------------------------------------ student versions

def tools_env() -> dict:
    """The environment for a subprocess that runs the course's tools: this one's, with this Python's bin
    folder first on PATH (nbgrader calls the `alembic` command it installs there). Nothing is changed in
    this process's own `os.environ`."""
    return dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def run_nbgrader(*args: str, root: Path | None = None) -> subprocess.CompletedProcess:
    """Run nbgrader in nbgrader_course/ (it reads nbgrader_config.py from its working directory), in `tools_env()`."""
    root = root or course_root()
    return subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=root / NBGRADER_DIR, env=tools_env(),
                          capture_output=True, text=True)


def generate_assignment(lesson: str, release_dir: Path, db_url: str, root: Path | None = None,
                        check: bool = True) -> subprocess.CompletedProcess:
    """nbgrader's `generate_assignment` for one lesson: the student version into `release_dir`/<lesson>, its
    cells registered in the gradebook at `db_url`. With `check`, a failure raises CourseError with nbgrader's
    output; without, the caller reads the returned process (grading retries while another machine registers
    the same lesson)."""
    res = run_nbgrader("generate_assignment", lesson, "--force", "--create",
                       f"--CourseDirectory.release_directory={release_dir}", f"--CourseDirectory.db_url={db_url}",
                       "--log-level=WARN", root=root)
    if check and res.returncode != 0:
        raise CourseError(f"nbgrader generate_assignment failed for {lesson}:\n{res.stdout}{res.stderr}")
    return res


def generate_lessons(names: list[str] | None = None, release_dir: Path | None = None,
                     root: Path | None = None, stamp_sources: bool = True) -> list[Path]:
    """Student versions of `names` (default all) written to release_dir (default lessons/)."""
    root = root or course_root()
    out = []
    for lesson in select(names, root):
        src = solution_path(lesson, root)
        if stamp_sources:
            nb = nbformat.read(src, as_version=4)
            if stamp(nb, lesson):
                write_clean(nb, src)
        target = Path(release_dir or root / "lessons")
        with tempfile.TemporaryDirectory() as tmp:
            generate_assignment(lesson, target, f"sqlite:///{tmp}/gradebook.db", root)
        path = target / lesson / f"{lesson}.ipynb"
        write_clean(nbformat.read(path, as_version=4), path)
        out.append(path)
    return out


def write_clean(nb: nbformat.NotebookNode, path: Path) -> None:
    """Write a notebook with outputs and execution counts cleared, in a stable format."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    nb.metadata.pop("papermill", None)
    nb.metadata.pop("widgets", None)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(nbformat.writes(nb) + "\n", encoding="utf-8")


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


def _cell_label(cell) -> str:
    gid = cell.metadata.get("nbgrader", {}).get("grade_id")
    return f" ({gid})" if gid else ""


def execute(path: Path, output: Path, parameters: dict | None = None, *, allow_errors: bool = False,
            timeout: int = 1800, cwd: Path | None = None, quiet_kernel: bool = False) -> nbformat.NotebookNode:
    """Execute a notebook with papermill-style parameter injection; returns the executed notebook.
    With allow_errors the run goes on past failing cells (used for student versions and `check`).
    `quiet_kernel` silences the kernel's own start-up log: a notebook run from inside another notebook (the
    sweep in lesson 06) would otherwise print its warnings there."""
    import papermill as pm
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    extra = ["--IPKernelApp.log_level=CRITICAL"] if quiet_kernel else []
    # The kernel inherits this process's environment as it is: offline where the caller is (tests and CI
    # set HF_HUB_OFFLINE=1), free to download a hub MODEL_ID elsewhere. The embedded model needs no hub.
    # Nothing here changes os.environ, which the threads of a parallel sweep share.
    if not allow_errors:
        pm.execute_notebook(str(path), str(output), parameters=parameters or {}, kernel_name="python3",
                            cwd=str(cwd or path.parent), progress_bar=False, execution_timeout=timeout,
                            extra_arguments=extra)
        return nbformat.read(output, as_version=4)
    from nbclient import NotebookClient
    from papermill.parameterize import parameterize_notebook
    from papermill.iorw import load_notebook_node
    nb = parameterize_notebook(load_notebook_node(str(path)), parameters or {}, kernel_name="python3")
    client = NotebookClient(nb, kernel_name="python3", allow_errors=True, timeout=timeout, extra_arguments=extra,
                            resources={"metadata": {"path": str(cwd or path.parent)}})
    client.execute()
    nbformat.write(nb, output)
    return nb


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


def describe_failure(exc: Exception, executed: Path, label: str = "") -> str:
    """One line on why a notebook run failed: the cell (with its grade_id when it has one) and the error, and
    where the executed copy is; `label` (the lesson, the sweep's run) goes first."""
    from papermill.exceptions import PapermillExecutionError
    head = f"{label}: " if label else ""
    if isinstance(exc, PapermillExecutionError):
        cell_label = ""
        try:  # the executed copy has papermill's banner cell on top: find the cell that errored
            nb = nbformat.read(executed, as_version=4)
            cell = next(c for c in nb.cells if any(o.get("output_type") == "error" for o in c.get("outputs", [])))
            cell_label = _cell_label(cell)
        except Exception:
            pass
        return (f"{head}cell {exc.exec_count or exc.cell_index}{cell_label} failed with "
                f"{exc.ename}: {exc.evalue} (executed copy: {executed})")
    return f"{head}{type(exc).__name__}: {exc}"


def table(results: list[RunResult]) -> str:
    rows = [("lesson", "status", "seconds")] + [(r.lesson, r.status, f"{r.seconds:.1f}") for r in results]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}" for a, b, c in rows)
