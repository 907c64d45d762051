"""One class graded on many machines: a Slurm array job or a Kubernetes Indexed Job, each task running
`lorakit grade LESSON SUBMISSIONS --shard i/n` into one PostgreSQL gradebook.

`lorakit grade --shard i/n` takes the i-th of n fixed slices of the class (by a hash of the student id,
submission.shard), so n tasks that start at once grade every submission exactly once, whatever machine each
lands on, and all of them write to the gradebook named by `--db` (gradebook.write_gradebook settles two tasks
creating the same row at once). `render()` fills in the templates in lorakit/assets/shards/ for an engine
instructors already have:

- slurm: grade.sbatch, an array job (`#SBATCH --array=1-n`); task i reads SLURM_ARRAY_TASK_ID;
- kubernetes: grade-job.yaml, an Indexed Job (`completionMode: Indexed`, n completions); pod k reads
  JOB_COMPLETION_INDEX (0-based) and grades shard k + 1.

The gradebook's URL, password included, is never written into the file: Slurm tasks read LORAKIT_DB from the
environment sbatch passes on, pods from a Kubernetes secret.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

from lorakit import course

TEMPLATES = Path(__file__).resolve().parent.parent / "assets" / "shards"
ENGINES = {"slurm": "grade.sbatch", "kubernetes": "grade-job.yaml"}


def render(engine: str, lesson: str, submissions: str, shards: int, *, results: str, course_dir: str | None = None,
           workers: int = 1, lorakit: str | None = None, image: str | None = None, secret: str = "lorakit-gradebook",
           claim: str = "lorakit-course") -> str:
    """The job file for `engine` ("slurm" or "kubernetes"), its values filled in. Paths are used as given
    (they are the paths the cluster's machines see); `lorakit` is the command a Slurm task runs (default: this
    environment's), `image` the container image of a pod (kubernetes: required)."""
    if engine not in ENGINES:
        raise course.CourseError(f"unknown engine {engine!r}: choose {' or '.join(ENGINES)}")
    [lesson] = course.select([lesson])
    if shards < 1 or workers < 1:
        raise course.CourseError(f"--shards {shards} --workers {workers}: both at least 1")
    if engine == "kubernetes" and not image:
        raise course.CourseError("kubernetes needs --image: a container image with Python 3.11+ and the kit at the "
                                 "tested versions (`lorakit` on PATH)")
    course_dir = course_dir or str(course.course_root())
    if engine == "slurm":
        quote = shlex.quote
        values = {"lorakit": quote(lorakit or str(Path(sys.executable).parent / "lorakit"))}
    else:
        def quote(value: str) -> str:   # a YAML scalar (JSON is YAML) or, inside the shell line, a shell word
            return json.dumps(value)
        values = {"image": quote(image), "secret": quote(secret), "claim": quote(claim),
                  "name": re.sub(r"[^a-z0-9-]+", "-", lesson.lower()).strip("-"),
                  "memory": f"{4 * workers}Gi"}
    if engine == "slurm" and re.search(r"\s", results):
        raise course.CourseError(f"--results {results!r}: Slurm's #SBATCH --output cannot hold a path with spaces")
    values.update(lesson=lesson, shards=str(shards), workers=str(workers), course=quote(course_dir), log_dir=results)
    for key, value in (("submissions", submissions), ("results", results)):
        values[key] = shlex.quote(value) if engine == "slurm" else _in_shell_line(value)
    text = (TEMPLATES / ENGINES[engine]).read_text()
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], text)


def _in_shell_line(value: str) -> str:
    """A path inside the pod's `sh -c` line (a YAML folded scalar): a shell word with no line break."""
    if "\n" in value:
        raise course.CourseError(f"{value!r}: a path with a line break cannot go into the job file")
    return shlex.quote(value)
