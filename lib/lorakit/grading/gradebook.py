"""The gradebook: nbgrader's own database, the one record of grades that the formgrader and nbgrader's exports read.

Any SQLAlchemy URL works: SQLite by default, PostgreSQL for a team or for several machines grading shards of
one class at once (the races of that case are handled here: two machines creating the same tables, students
or submissions at the same moment). Only the grader's process writes here, never a sandbox; a submission that
could not be graded, or that is flagged for the instructor, has its notebook flagged so that it shows up in
nbgrader's formgrader. Trusted: called only with results the judge decided.
"""

from __future__ import annotations

import time


def gradebook(db_url: str):
    """nbgrader's Gradebook at `db_url`, open. Two machines that create a new PostgreSQL gradebook's tables at
    the same moment collide (a unique violation in the catalog); the loser waits and opens it again."""
    from nbgrader.api import Gradebook
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    from lorakit import course
    from lorakit.env import scoped_environ
    for attempt in range(6):
        try:
            # nbgrader runs the `alembic` command (installed beside this Python, whose folder need not be on
            # PATH) when it creates a gradebook's tables, with this process's environment: it takes no env.
            with scoped_environ(PATH=course.tools_env()["PATH"]):
                return Gradebook(db_url)
        except (IntegrityError, ProgrammingError):
            if attempt == 5:
                raise
            time.sleep(0.3 * (attempt + 1))


def write_gradebook(db_url: str, g, test_ids: list[str]) -> None:
    """Record `g` (a report.Graded) in the gradebook: one auto_score per test cell, the notebook flagged when it failed."""
    from nbgrader.api import InvalidEntry, MissingEntry
    from sqlalchemy.exc import IntegrityError
    import warnings
    for attempt in range(5):  # another machine may create the same student at the same moment
        try:
            with warnings.catch_warnings(), gradebook(db_url) as gb:
                warnings.simplefilter("ignore")  # nbgrader's own SQLAlchemy autoflush warnings
                gb.update_or_create_student(g.student)
                try:
                    gb.find_submission(g.lesson, g.student)
                except MissingEntry:
                    gb.add_submission(g.lesson, g.student)
                for gid in test_ids:
                    grade = gb.find_grade(gid, g.lesson, g.lesson, g.student)
                    t = g.outcome.tests.get(gid)
                    grade.auto_score = 0.0 if t is None else float(t.points)
                    grade.manual_score = None
                nb = gb.find_submission_notebook(g.lesson, g.lesson, g.student)
                nb.flagged = g.status != "graded" or bool(g.outcome.flags)
                gb.db.commit()
            return
        except (InvalidEntry, IntegrityError):  # the other machine won the race: read it back and go on
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def read_gradebook(db_url: str, lesson: str) -> dict[str, float]:
    """student -> auto score of `lesson` (for tests and for checking a shared gradebook)."""
    out = {}
    with gradebook(db_url) as gb:
        for sub in gb.find_assignment(lesson).submissions:
            out[sub.student.id] = float(sub.score)
    return out
