"""Where is the course, and which lessons does it hold? The checkout's folders (solutions/, lessons/,
nbgrader_course/), lesson names and their paths, and the error every pipeline command raises for a learner or
instructor to read.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["NBGRADER_DIR", "CourseError", "course_root", "work_dir", "lessons", "select", "solution_path",
           "lesson_path"]

# The course's nbgrader folder: nbgrader_config.py (nbgrader reads it from its working directory) and, in
# work/, what grading writes (gradebook, submissions, feedback, job folders; ignored by git). The name says
# whose configuration it is and is no package's name: a folder named nbgrader/ would shadow the nbgrader
# package for anything that puts the course folder on sys.path.
NBGRADER_DIR = "nbgrader_course"


class CourseError(Exception):
    """A problem with the course files or a command's arguments, explained for the person who ran it."""


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
