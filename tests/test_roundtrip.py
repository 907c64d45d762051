"""The submission round trip, end to end, the way a learner does it.

A learner opens the committed student version of lesson 00, types the answers into the stubbed cells
(in place of `# YOUR CODE HERE` / `raise NotImplementedError()`, keeping the rest of the cell), runs the
notebook, and saves it - once as JupyterLab saves (through jupyter_server's contents manager: nbformat 4.5,
cell ids, nbgrader metadata kept) and once as Colab saves when you download the .ipynb (nbformat 4.0, no cell
ids, every cell's metadata replaced by Colab's own, so the nbgrader metadata and tags are gone, a `colab`
block and a GPU accelerator in the notebook metadata). Then:

- `lorakit check` on each saved copy reports every visible check passed (exit status 0);
- `lorakit grade` on a class made of both copies and other test submissions (the untouched stub, a
  half-done notebook) gives both learner copies full marks and the others exactly what they earned.

The grading pipeline's adversarial cases live in tests/test_grading.py; this test is the honest path.
"""

from __future__ import annotations

import copy
import csv
import json
import re
import uuid

import nbformat
import pytest

from lorakit import cli, course

LESSON = "00_setup"
pytestmark = pytest.mark.slow  # runs a notebook, grades a class
STUB = re.compile(r"^(?P<indent>[ \t]*)# YOUR CODE HERE\n(?P=indent)raise NotImplementedError\(\)[ \t]*$", re.M)


def _answers(lesson: str) -> dict[str, str]:
    """grade_id -> the lines between ### BEGIN SOLUTION and ### END SOLUTION in the instructor's notebook,
    dedented: what the learner types."""
    out = {}
    for cell in nbformat.read(course.solution_path(lesson), as_version=4).cells:
        meta = cell.metadata.get("nbgrader", {})
        if not meta.get("solution") or cell.cell_type != "code":
            continue
        lines = cell.source.split("\n")
        begin = next(i for i, l in enumerate(lines) if l.strip() == "### BEGIN SOLUTION")
        end = next(i for i, l in enumerate(lines) if l.strip() == "### END SOLUTION")
        body = lines[begin + 1:end]
        indent = min(len(l) - len(l.lstrip()) for l in body if l.strip())
        out[meta["grade_id"]] = "\n".join(l[indent:] for l in body)
    return out


def fill_in(student: nbformat.NotebookNode, answers: dict[str, str], only: set[str] | None = None) -> nbformat.NotebookNode:
    """The learner's edit: each stub replaced by the answer at the stub's indentation; nothing else touched."""
    nb = copy.deepcopy(student)
    done = set()
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid not in answers or (only is not None and gid not in only):
            continue
        m = STUB.search(cell.source)
        assert m, f"{gid}: the student version has no `# YOUR CODE HERE` / `raise NotImplementedError()` stub"
        typed = "\n".join(m["indent"] + l if l else l for l in answers[gid].split("\n"))
        cell.source = cell.source[:m.start()] + typed + cell.source[m.end():]
        done.add(gid)
    assert done == (set(answers) if only is None else only), f"stubs not found for {set(answers) - done}"
    return nb


def run_cells(nb: nbformat.NotebookNode, cwd) -> nbformat.NotebookNode:
    """Run all cells like the learner does (errors stay in the outputs, as in the browser)."""
    from nbclient import NotebookClient
    nb = copy.deepcopy(nb)
    NotebookClient(nb, kernel_name="python3", allow_errors=True, timeout=300,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def save_as_jupyterlab(nb: nbformat.NotebookNode, path) -> None:
    """JupyterLab sends the notebook model to jupyter_server, whose contents manager writes it."""
    from jupyter_server.services.contents.filemanager import FileContentsManager
    model = json.loads(nbformat.writes(nb))
    model.setdefault("metadata", {})["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2, "version_minor": 0}}
    FileContentsManager(root_dir=str(path.parent)).save({"type": "notebook", "format": "json", "content": model}, path.name)


def save_as_colab(nb: nbformat.NotebookNode, path) -> None:
    """What File > Download .ipynb on Colab gives: nbformat 4.0, source as lists of lines, no cell ids, each
    cell's metadata replaced by Colab's (nbgrader metadata and tags dropped), Colab's notebook metadata."""
    data = json.loads(nbformat.writes(nb))
    data["nbformat_minor"] = 0
    data["metadata"] = {"colab": {"provenance": [], "gpuType": "T4"}, "accelerator": "GPU",
                        "kernelspec": {"name": "python3", "display_name": "Python 3"},
                        "language_info": {"name": "python"}}
    for cell in data["cells"]:
        cell.pop("id", None)
        cell["metadata"] = {"id": uuid.uuid4().hex[:12]}
        if cell["cell_type"] == "code":
            cell["metadata"]["colab"] = {"base_uri": "https://localhost:8080/"}
            for out in cell["outputs"]:
                out.setdefault("metadata", {}) if out["output_type"] in ("display_data", "execute_result") else None
        src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        cell["source"] = src.splitlines(keepends=True)
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("roundtrip")
    student = nbformat.read(course.lesson_path(LESSON), as_version=4)
    answers = _answers(LESSON)
    assert answers, f"{LESSON}: no exercises found in the solution notebook"
    executed = run_cells(fill_in(student, answers), tmp)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"the filled-in notebook fails when run: {errors[0]['ename']}: {errors[0]['evalue']}"
    subs = tmp / "submissions"
    subs.mkdir()
    save_as_jupyterlab(executed, subs / "ada_jupyterlab.ipynb")
    save_as_colab(executed, subs / "grace_colab.ipynb")
    save_as_jupyterlab(student, subs / "stub_untouched.ipynb")  # handed in without doing anything
    first = sorted(answers)[0]
    save_as_colab(fill_in(student, answers, only={first}), subs / "half_done.ipynb")
    return {"dir": subs, "tmp": tmp, "answers": answers, "first": first}


def test_the_saved_copies_look_like_jupyterlab_and_colab_files(saved):
    lab = json.loads((saved["dir"] / "ada_jupyterlab.ipynb").read_text())
    colab = json.loads((saved["dir"] / "grace_colab.ipynb").read_text())
    assert lab["nbformat_minor"] >= 5 and all("id" in c for c in lab["cells"])
    assert sum(1 for c in lab["cells"] if "nbgrader" in c["metadata"]) >= 2 * len(saved["answers"])
    assert colab["nbformat_minor"] == 0 and not any("nbgrader" in c["metadata"] or "tags" in c["metadata"] for c in colab["cells"])
    assert any(o.get("output_type") == "stream" for c in colab["cells"] if c["cell_type"] == "code" for o in c["outputs"])


@pytest.mark.parametrize("name", ["ada_jupyterlab.ipynb", "grace_colab.ipynb"])
def test_lorakit_check_passes_the_learners_copy(saved, name, capsys):
    status = cli.main(["check", str(saved["dir"] / name)])
    out = capsys.readouterr().out
    assert status == 0, f"`lorakit check {name}` failed:\n{out}"
    m = re.search(r"visible checks: ([\d.]+) / ([\d.]+) points", out)
    assert m and m[1] == m[2] and float(m[2]) > 0, out


def test_lorakit_grade_gives_full_marks(saved, capsys):
    out_dir = saved["tmp"] / "grades"
    db = saved["tmp"] / "gradebook.db"
    status = cli.main(["grade", LESSON, str(saved["dir"]), "--db", f"sqlite:///{db}", "--out", str(out_dir),
                       "--params", str(course.course_root() / ".ci" / "params.yml"), "--timeout", "300"])
    log = capsys.readouterr().out
    assert status == 0, log
    rows = {r["student"]: r for r in csv.DictReader(open(out_dir / "grades.csv"))}
    assert set(rows) == {"ada_jupyterlab", "grace_colab", "stub_untouched", "half_done"}, (sorted(rows), log)
    assert all(r["status"] == "graded" for r in rows.values()), log
    full = float(rows["ada_jupyterlab"]["max_score"])
    assert full > 0
    for learner in ("ada_jupyterlab", "grace_colab"):
        assert float(rows[learner]["score"]) == full, f"{learner}: {rows[learner]['score']} / {full}\n{log}"
    assert float(rows["stub_untouched"]["score"]) == 0, log
    # the half-done notebook earns exactly the points of the one test its answer satisfies
    solution = nbformat.read(course.solution_path(LESSON), as_version=4)
    points = {c.metadata["nbgrader"]["grade_id"]: c.metadata["nbgrader"]["points"] for c in solution.cells
              if c.metadata.get("nbgrader", {}).get("grade")}
    assert float(rows["half_done"]["score"]) == points[f"{saved['first']}_test"], log
