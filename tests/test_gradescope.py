"""`lorakit gradescope`: the autograder zip, unpacked and run the way Gradescope runs it.

The zip of lesson 00 is unpacked into a temporary root laid out like Gradescope's container (source/,
submission/, results/). setup.sh runs as Gradescope runs it when it builds the image, with one difference:
its kit install step installs against the local lock without reaching an index (`--no-index`), into a venv
that already sees the tested stack (a .pth file adding this environment's site-packages), so pip must
resolve the zip's wheel and its extra against the lock from what is there and install the wheel; the tests
then grade with that installed kit, not with the checkout. run_autograder then grades a correct, a blank
(the untouched student version) and a broken upload, plus an upload without a notebook, one with two, and one
that goes looking for the instructor's key; each results.json is validated against Gradescope's documented
format (gradescope-autograders.readthedocs.io/en/latest/specs/, "Output format") and searched for hidden
test source. The same upload is graded once more in a container that forbids namespaces (an `unshare` on
PATH that fails the way Docker's default seccomp profile makes it fail): the results must say which
protections were off, and the submission, under its own user id, still must not read the key.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import nbformat
import pytest

from lorakit import course
from lorakit.grading import gradescope, report, submission

import adversarial  # tests/adversarial.py: the kit's own submissions for tests

pytestmark = pytest.mark.slow
LESSON = "00_setup"

# Gradescope's results.json, as its specification documents it (top level and one test case).
VISIBILITY = {"enum": ["hidden", "after_due_date", "after_published", "visible"]}
FORMAT = {"enum": ["text", "html", "simple_format", "md", "ansi"]}
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "anyOf": [{"required": ["score"]}, {"required": ["tests"]}],
    "properties": {
        "score": {"type": "number"}, "max_score": {"type": "number"}, "execution_time": {"type": "number"},
        "output": {"type": "string"}, "output_format": FORMAT, "test_output_format": FORMAT,
        "test_name_format": FORMAT, "visibility": VISIBILITY, "stdout_visibility": VISIBILITY,
        "extra_data": {"type": "object"},
        "tests": {"type": "array", "items": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "score": {"type": "number"}, "max_score": {"type": "number"},
                "status": {"enum": ["passed", "failed"]}, "name": {"type": "string"}, "name_format": FORMAT,
                "number": {"type": "string"}, "output": {"type": "string"}, "output_format": FORMAT,
                "tags": {"type": "array", "items": {"type": "string"}}, "visibility": VISIBILITY,
                "extra_data": {"type": "object"}}}},
        "leaderboard": {"type": "array"},
    },
}


def _others_can_run(path: Path) -> bool:
    """Can a user other than root run `path` (every folder above it passable, the file executable)?"""
    path = path.resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


def _base_python(for_other_users: bool) -> str | None:
    """A Python of this environment's minor version to build the autograder's venv from; with
    `for_other_users`, one that a submission's own user id can run too (pyenv's often lives under /root)."""
    want = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for cand in (getattr(sys, "_base_executable", None), shutil.which(want), f"/usr/bin/{want}", f"/usr/local/bin/{want}"):
        if not cand or not Path(cand).exists() or (for_other_users and not _others_can_run(Path(cand))):
            continue
        res = subprocess.run([cand, "-c", "import sys, venv; print(sys.version_info[:2])"], capture_output=True, text=True)
        if res.returncode == 0 and res.stdout.strip() == str(tuple(sys.version_info[:2])):
            return cand
    return None


class Autograder:
    """One unpacked autograder: setup.sh run once, then run_autograder per upload."""

    def __init__(self, root: Path, zip_path: Path, python: str):
        self.root, self.zip = root, zip_path
        (root / "source").mkdir(parents=True)
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(root / "source")
            for info in zf.infolist():   # zipfile does not restore modes: Gradescope's unzip does
                os.chmod(root / "source" / info.filename, (info.external_attr >> 16) or 0o644)
        self.venv = root / "venv"
        subprocess.run([python, "-m", "venv", "--without-pip", str(self.venv)], check=True)
        site = self.venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
        (site / "_tested_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        # the venv first; this environment's bin after it for the commands nbgrader runs (alembic)
        self.env = {**os.environ, "AUTOGRADER": str(root), "LORAKIT_VENV": str(self.venv), "LORAKIT_PYTHON": python,
                    "LORAKIT_PIP_ARGS": "--no-index",
                    "PATH": os.pathsep.join([str(self.venv / "bin"), "/usr/local/bin", "/usr/bin", "/bin",
                                             str(Path(sys.executable).parent)])}
        self.env.pop("LORAKIT_COURSE_DIR", None)
        self.setup = subprocess.run(["bash", str(root / "source" / "setup.sh")], env=self.env, capture_output=True,
                                    text=True, timeout=600)
        assert self.setup.returncode == 0, self.setup.stdout + self.setup.stderr

    def grade(self, files: dict[str, str | bytes], extra_path: str | None = None,
              metadata: dict | None = None) -> tuple[dict, str]:
        """Upload `files` (name -> content) and run run_autograder: (results.json, its stdout)."""
        for d in ("submission", "results"):
            shutil.rmtree(self.root / d, ignore_errors=True)
            (self.root / d).mkdir()
        meta = self.root / "submission_metadata.json"
        meta.unlink(missing_ok=True)
        if metadata is not None:
            meta.write_text(json.dumps(metadata))
        for name, content in files.items():
            path = self.root / "submission" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        env = dict(self.env)
        if extra_path:
            env["PATH"] = extra_path + os.pathsep + env["PATH"]
        res = subprocess.run([str(self.root / "source" / "run_autograder")], env=env, capture_output=True, text=True,
                             timeout=600, cwd=self.root)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out
        results = self.root / "results" / "results.json"
        assert results.is_file(), f"run_autograder wrote no results.json:\n{out}"
        return json.loads(results.read_text()), out


@pytest.fixture(scope="module")
def autograder():
    python = _base_python(for_other_users=True) or _base_python(for_other_users=False)
    assert python, f"no python{sys.version_info[0]}.{sys.version_info[1]} to build the autograder's venv from"
    # not under pytest's tmp_path (mode 0700): the submission's own user id must reach its job folder
    tmp = Path(tempfile.mkdtemp(prefix="lorakit-gradescope-test-"))
    os.chmod(tmp, 0o755)
    try:
        zip_path = gradescope.build(gradescope.Options(LESSON), tmp / f"{LESSON}.zip")
        yield Autograder(tmp / "autograder", zip_path, python)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _notebook(nb) -> str:
    return nbformat.writes(nb)


def _hidden_lines() -> set[str]:
    solution = nbformat.read(course.solution_path(LESSON), as_version=4)
    out = set()
    for cell in solution.cells:
        if submission.HIDDEN_BEGIN in cell.source:
            hidden = cell.source.split(submission.HIDDEN_BEGIN, 1)[1].split(submission.HIDDEN_END, 1)[0]
            out |= {line.strip() for line in hidden.split("\n") if line.strip()}
    assert out
    return out


def _valid(results: dict) -> None:
    import jsonschema
    jsonschema.validate(results, SCHEMA)
    text = json.dumps(results)
    for line in _hidden_lines():
        assert line not in text and json.dumps(line)[1:-1] not in text, f"results.json shows the hidden line {line!r}"
    assert "HIDDEN TESTS" not in text


def _scored(results: dict) -> dict[str, tuple[float, float]]:
    return {t["name"]: (t["score"], t["max_score"]) for t in results["tests"] if "score" in t}


def test_the_zip_is_laid_out_as_gradescope_expects(autograder):
    with zipfile.ZipFile(autograder.zip) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        for name in ("setup.sh", "run_autograder"):   # at the root of the archive, executable
            assert name in infos and (infos[name].external_attr >> 16) & 0o111, name
        wheels = [n for n in infos if n.startswith("wheels/lorakit-") and n.endswith(".whl")]
        assert len(wheels) == 1, list(infos)
        holders = [n for n in infos if n.endswith((".ipynb", ".db", ".py", ".json"))
                   and b"BEGIN HIDDEN TESTS" in zf.read(n)]
        assert holders == [f"course/solutions/{LESSON}/{LESSON}.ipynb"], holders   # the key, and only the key
        assert zf.read("tested.txt") == Path(course.course_root() / "lib/lorakit/tested.txt").read_bytes()
        assert {"tooling/bootstrap.py", "install.py", "pyproject.toml"} <= set(infos), "the installer setup.sh runs, and what it imports"
    # the key and the gradebook are root's alone after setup
    key = autograder.root / "source" / "course" / "solutions"
    assert stat.S_IMODE(key.stat().st_mode) == 0o700
    db = autograder.root / "source" / "course" / "nbgrader_course" / "work" / "gradebook.db"
    assert db.is_file() and stat.S_IMODE(db.stat().st_mode) == 0o600
    assert "every locked package at its tested version" in autograder.setup.stderr + autograder.setup.stdout


def test_setup_installs_the_zips_wheel_not_the_checkout(autograder):
    py = autograder.venv / "bin" / "python"
    res = subprocess.run([str(py), "-c", "import lorakit; print(lorakit.__file__)"], capture_output=True, text=True,
                         env={**autograder.env, "PYTHONPATH": ""})
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).is_relative_to(autograder.venv), res.stdout


def test_a_correct_upload_scores_full_marks(autograder):
    metadata = {"users": [{"email": "ada@example.edu", "id": 1, "name": "Ada"}], "submission_method": "upload"}
    results, log = autograder.grade({f"{LESSON}.ipynb": _notebook(adversarial.student_notebook(LESSON))},
                                    metadata=metadata)
    _valid(results)
    assert results["score"] == results["max_score"] == 2, (results, log)
    assert results["extra_data"]["student"] == "ada@example.edu"
    assert _scored(results) == {"ex00_bytes_per_param_test": (1, 1), "ex00_weights_gb_test": (1, 1)}
    hidden = [t for t in results["tests"] if "score" not in t]
    assert hidden and all(t["visibility"] == "hidden" and t["status"] == "passed" for t in hidden), hidden
    assert results["output"].startswith("graded") and "sandbox:" in results["output"]


def test_a_blank_upload_scores_zero_and_says_why(autograder):
    blank = course.lesson_path(LESSON).read_text()
    results, log = autograder.grade({"my upload.ipynb": blank})
    _valid(results)
    assert results["score"] == 0 and results["max_score"] == 2, (results, log)
    assert results["extra_data"]["status"] == "graded"
    assert all(t["status"] == "failed" for t in results["tests"] if "score" in t)
    assert "NotImplementedError" in " ".join(t["output"] for t in results["tests"])


def test_a_broken_upload_is_recorded_as_broken(autograder):
    results, _ = autograder.grade({f"{LESSON}.ipynb": b'{"cells": [ this is not json'})
    _valid(results)
    assert results["score"] == 0 and results["extra_data"]["status"] == "failed"
    assert results["output"].startswith("failed: invalid notebook") and "not valid notebook JSON" in results["output"]
    assert set(_scored(results)) == {"ex00_bytes_per_param_test", "ex00_weights_gb_test"}
    assert all("not run (invalid notebook)" in t["output"] for t in results["tests"])


def test_an_upload_without_one_notebook_is_told_what_to_upload(autograder):
    results, _ = autograder.grade({"answers.py": "print(1)"})
    _valid(results)
    assert results["score"] == 0 and "no notebook (.ipynb) in your upload (it has answers.py)" in results["output"]
    assert set(_scored(results)) == {"ex00_bytes_per_param_test", "ex00_weights_gb_test"}
    nb = _notebook(adversarial.student_notebook(LESSON, minimal=True))
    results, _ = autograder.grade({"a.ipynb": nb, "b.ipynb": nb})
    _valid(results)
    assert results["score"] == 0 and f"2 notebooks (a.ipynb, b.ipynb): upload only your {LESSON}.ipynb" in results["output"]
    results, _ = autograder.grade({f"{LESSON}.ipynb": nb, "scratch/old.ipynb": nb})   # the lesson's own name wins
    assert results["score"] == 2


def _snooping_upload(autograder) -> str:
    """Correct work that answers wrongly when it could read the key, the gradebook, or write the results."""
    course_dir = autograder.root / "source" / "course"
    paths = [str(course_dir / "solutions" / LESSON / f"{LESSON}.ipynb"), str(course_dir / "nbgrader_course" / "work" / "gradebook.db")]
    forged = str(autograder.root / "results" / "forged.json")
    probe = (f"# ex00_bytes_per_param\nLEAKED = []\nfor p in {paths!r}:\n    try:\n        open(p, 'rb').read(1)\n"
             f"        LEAKED.append(p)\n    except OSError:\n        pass\ntry:\n    open({forged!r}, 'w').write('{{}}')\n"
             f"    LEAKED.append('results')\nexcept OSError:\n    pass\nprint('LEAKED', LEAKED)\n")
    nb = adversarial.student_notebook(LESSON, minimal=True)
    for cell in nb.cells:
        if submission.cell_id(cell) == "ex00_bytes_per_param":
            correct = adversarial.CORRECT["ex00_bytes_per_param"].split("\n", 1)[1]
            cell.source = probe + correct + "\nif LEAKED:\n    bytes_per_param = {k: 2 * v for k, v in bytes_per_param.items()}"
    return _notebook(nb)


def test_an_upload_cannot_read_the_key(autograder):
    results, log = autograder.grade({f"{LESSON}.ipynb": _snooping_upload(autograder)})
    assert results["score"] == 2, (results, log)          # it ran, found nothing, and answered correctly
    assert not (autograder.root / "results" / "forged.json").exists()


def test_without_namespaces_the_results_say_so_and_the_key_stays_unreadable(autograder):
    if not _others_can_run(autograder.venv / "bin" / "python"):
        pytest.skip("no Python here that a submission's own user id can run (pyenv under /root): "
                    "the fallback's separate user cannot start")
    fake = autograder.root / "no-namespaces"
    fake.mkdir(exist_ok=True)
    (fake / "unshare").write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    (fake / "unshare").chmod(0o755)
    results, log = autograder.grade({f"{LESSON}.ipynb": _snooping_upload(autograder)}, extra_path=str(fake))
    _valid(results)
    assert "this container allows no Linux namespaces" in results["output"], results["output"]
    assert "sandbox protections OFF: network isolation" in results["output"]
    assert "separate user per worker" in results["output"]
    assert results["score"] == 2, (results, log)          # under its own uid: the key is root's alone
    assert not (autograder.root / "results" / "forged.json").exists()


def test_hidden_check_names_are_shown_as_the_instructor_chose():
    """The visibility of the checks on inputs drawn when graded follows `--hidden-names` (no zip needed)."""
    from lorakit.grading.judge import CallResult, TestResult
    from lorakit.grading.session import Outcome
    calls = [CallResult("setup.weights_gb", False, True, "ok"), CallResult("setup.weights_gb", True, False, "wrong")]
    t = TestResult("ex00_weights_gb_test", 0.0, 1.0, False, "\n".join(c.line for c in calls), calls)
    g = report.Graded("s", LESSON, "", Outcome("graded", tests={t.grade_id: t}), 1.0)
    for choice in report.VISIBILITIES:
        data = report.results_json(g, choice)
        [cell, hidden] = data["tests"]
        assert cell["visibility"] == "visible" and hidden["visibility"] == choice
        assert "1 check(s) on inputs drawn when graded: 1 failed" in cell["output"]
        assert "wrong" not in cell["output"] and hidden["output"] == "wrong"
    with pytest.raises(course.CourseError, match="choose one of hidden, after_due_date"):
        gradescope.Options(LESSON, hidden_names="later")
