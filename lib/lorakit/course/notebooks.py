"""How is a lesson notebook built, and how does a solution become its student version? nbgrader cells for
authors and tests (`exercise`, `test`, `markdown`, `code`, `parameters`, `notebook`), the header every lesson
carries (Colab badge, setup cell: `stamp`), and nbgrader's generate_assignment writing lessons/ from solutions/
(`generate_lessons`, outputs cleared by `write_clean`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat

from lorakit.course.layout import NBGRADER_DIR, CourseError, course_root, select, solution_path

__all__ = ["REPOSITORY", "BRANCH", "BADGE_IMAGE", "KERNEL", "markdown", "code", "parameters", "exercise", "test",
           "notebook", "colab_url", "colab_badge", "colab_requirement", "colab_install_commands", "setup_source",
           "stamp", "tools_env", "run_nbgrader", "generate_assignment", "generate_lessons", "write_clean"]

REPOSITORY = "https://github.com/lorakit/lorakit"  # the one place the course's public URL is configured
BRANCH = "main"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
KERNEL = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


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
