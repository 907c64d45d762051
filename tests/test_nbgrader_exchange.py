"""nbgrader's exchange, end to end, then `lorakit grade` on what `nbgrader collect` left, into the gradebook
nbgrader's formgrader reads.

The instructor releases two lessons' student versions (`nbgrader release_assignment`, from lessons/, the
course's release directory); two students each fetch lesson 00 into a home of their own, answer it (alice all
of it, bob one exercise; both keep only the exercise and test cells, which keeps the test short) and submit it (`nbgrader submit`), alice also submits lesson 01 untouched; the
instructor collects both lessons (`nbgrader collect`: submitted/STUDENT/LESSON/LESSON.ipynb) and runs
`lorakit grade 00_setup SUBMITTED` on that folder as it is. The grades must be in the gradebook nbgrader reads
(`nbgrader export`, the same Gradebook API the formgrader uses), and lesson 01's notebook must not have been
graded as a lesson 00 submission. The exchange, the submitted folder and the gradebook live in a temporary
folder (the course's own nbgrader_course/work is not touched); the commands are the ones docs/grading-elsewhere.md
shows, with these three locations added.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from lorakit import course
from lorakit.grading import batch, gradebook

import adversarial  # tests/adversarial.py: the kit's own submissions for tests

pytestmark = pytest.mark.slow
LESSON, OTHER = "00_setup", "01_memory"
WORK = {"alice": ("all", 2.0), "bob": ({"ex00_bytes_per_param"}, 1.0)}


def _nbgrader(*args: str, cwd: Path, home: Path | None = None) -> str:
    env = dict(course.tools_env())
    if home is not None:   # a student: their own home, no course config
        env["HOME"] = str(home)
    res = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{res.stdout}{res.stderr}"
    return res.stdout + res.stderr


def test_the_course_config_and_lorakit_grade_use_one_gradebook():
    """Without the test's overrides the two share nbgrader_config.py's gradebook, and `collect` writes the
    submitted/ folder the docs tell the instructor to grade."""
    from traitlets.config.loader import PyFileConfigLoader
    root = course.course_root()
    cfg = PyFileConfigLoader("nbgrader_config.py", path=str(root / "nbgrader_course")).load_config()
    assert cfg.CourseDirectory.db_url == batch.default_db_url(root)
    assert Path(root, cfg.CourseDirectory.submitted_directory) == root / "nbgrader_course" / "work" / "submitted"


def test_release_fetch_submit_collect_then_lorakit_grade(tmp_path):
    root = course.course_root()
    exchange, submitted = tmp_path / "exchange", tmp_path / "submitted"
    db = f"sqlite:///{tmp_path / 'gradebook.db'}"
    instructor = [f"--Exchange.root={exchange}", f"--CourseDirectory.submitted_directory={submitted}",
                  f"--CourseDirectory.db_url={db}"]
    for lesson in (LESSON, OTHER):
        _nbgrader("release_assignment", lesson, *instructor, cwd=root / "nbgrader_course")

    for student, (solved, _) in WORK.items():
        home = tmp_path / "home" / student
        home.mkdir(parents=True)
        lessons = (LESSON, OTHER) if student == "alice" else (LESSON,)
        for lesson in lessons:
            _nbgrader("fetch_assignment", lesson, "--course=lorakit", f"--Exchange.root={exchange}", cwd=home, home=home)
            fetched = home / lesson / f"{lesson}.ipynb"
            assert fetched.read_text() == course.lesson_path(lesson).read_text()   # the released student version
            if lesson == LESSON:   # the student's work on it
                nbformat.write(adversarial.student_notebook(LESSON, solved=solved, minimal=True), fetched)
            _nbgrader("submit", lesson, "--course=lorakit", f"--student={student}", f"--Exchange.root={exchange}",
                      cwd=home, home=home)

    for lesson in (LESSON, OTHER):
        _nbgrader("collect", lesson, *instructor, cwd=root / "nbgrader_course")
    assert sorted(p.relative_to(submitted).as_posix() for p in submitted.rglob("*.ipynb")) == [
        f"alice/{LESSON}/{LESSON}.ipynb", f"alice/{OTHER}/{OTHER}.ipynb", f"bob/{LESSON}/{LESSON}.ipynb"]

    out = tmp_path / "grades"
    res = subprocess.run([sys.executable, "-m", "lorakit.cli", "grade", LESSON, str(submitted), "--db", db,
                          "--out", str(out), "--workers", "2"], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "grading 2 submission(s)" in res.stdout, res.stdout           # lesson 01's notebook left out
    assert gradebook.read_gradebook(db, LESSON) == {s: score for s, (_, score) in WORK.items()}

    exported = tmp_path / "export.csv"
    _nbgrader("export", f"--CourseDirectory.db_url={db}", f"--to={exported}", cwd=root / "nbgrader_course")
    rows = {r["student_id"]: r for r in csv.DictReader(exported.open()) if r["assignment"] == LESSON}
    assert {s: float(r["score"]) for s, r in rows.items()} == {s: score for s, (_, score) in WORK.items()}, rows
    assert all(float(r["max_score"]) == 2 for r in rows.values()), rows
