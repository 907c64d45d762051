"""`grade()` a class in parallel and `check()` one notebook: the pipeline of lorakit.grading (see its
docstring), wired together."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from lorakit import course
from lorakit.grading import gradebook, reference_use, report, submission, withheld
from lorakit.grading.judge import TestResult
from lorakit.grading.sandbox import Limits, Sandbox, detect
from lorakit.grading.session import Outcome, Session

SYSTEM_DIRS = {"/", "/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc", "/proc", "/sys", "/dev", "/opt", "/var"}


def default_db_url(root: Path | None = None) -> str:
    """The course's gradebook, as configured in nbgrader_course/nbgrader_config.py."""
    return "sqlite:///" + str(course.work_dir(root) / "gradebook.db")


def _outside_course_sources(path: Path, root: Path) -> None:
    for protected in ("solutions", "lessons"):
        if path.resolve().is_relative_to((root / protected).resolve()):
            raise course.CourseError(f"--out {path} is inside {protected}/: the grader never writes there")


def grade(lesson: str, submissions: list[str | Path], *, workers: int = 2, db: str | None = None,
          timeout: float = 600, cell_timeout: float = 120, out: str | Path | None = None,
          shard: str | None = None, limits: Limits | None = None, params: dict | None = None,
          sandbox: bool = True, keep_work: bool = False, root: Path | None = None, echo=print) -> list[report.Graded]:
    """Grade every submission of `lesson` (see the module docstring); returns one result per submission.
    The batch always completes: a submission that cannot be graded is a `failed` row with its reason."""
    root = root or course.course_root()
    [lesson] = course.select([lesson], root)
    db_url = db or default_db_url(root)
    out = Path(out or course.work_dir(root) / "grades" / lesson).resolve()
    _outside_course_sources(out, root)
    run_id = f"{lesson}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir = course.work_dir(root) / "jobs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    echo = echo or (lambda *a, **k: None)
    try:
        key = submission.build_key(lesson, db_url, run_dir, root)
        subs = submission.shard(submission.collect(submissions, lesson, run_dir), shard)
        test_ids = [c.grade_id for c in key.tests]
        cells = [(c.grade_id, c.points) for c in key.tests]
        hidden = frozenset(key.hidden_lines)
        hide = [root, root.parent, out] + [Path(p).resolve() if Path(p).is_dir() else Path(p).resolve().parent for p in submissions]
        hide = [p for p in hide if str(p) not in SYSTEM_DIRS and len(p.parts) > 1]
        kit = None
        if sandbox and detect().namespaces:   # the graded lesson's answers withheld from the sandbox's view of the kit
            import nbformat
            plan = withheld.plan(key, nbformat.read(course.solution_path(lesson, root), as_version=4),
                                 earlier=withheld.earlier_answers(lesson, root))
            kit = withheld.build(plan, run_dir / "kit")
        box = Sandbox(limits or Limits(), enabled=sandbox, hide=hide, timeout=timeout, kit=kit)
        echo(box.protections.describe(box.limits) if sandbox else "sandbox: off (--no-sandbox)")
        echo(plan.describe() if kit else "answers withheld: none (no private filesystem for the sandbox); "
                                         "reference use is flagged only")
        echo(f"grading {len(subs)} submission(s) of {lesson} with {workers} worker(s); gradebook {db_url}")

        def one(sub: submission.Submission) -> tuple[report.Graded, object]:
            merged = None
            try:
                nb = submission.read_notebook(sub.path)
            except (ValueError, OSError) as e:
                outcome = Outcome("failed", "invalid notebook", str(e)).score_the_rest(cells, "invalid notebook")
                return report.Graded(sub.student, lesson, str(sub.path), outcome, key.max_score, hidden), None
            try:
                m = submission.merge(nb, key, params)
                merged = m.notebook
                session = Session(key, merged, run_dir / "sub" / sub.student, sandbox=box,
                                  cell_timeout=cell_timeout, timeout=timeout)
                outcome = session.run()
                outcome.notes = m.notes
                outcome.flags = reference_use.flags(nb, key)
            except Exception as e:  # noqa: BLE001 - the batch always completes
                outcome = Outcome("failed", "grader error", f"{type(e).__name__}: {e}").score_the_rest(cells, "grader error")
            finally:
                if not keep_work:
                    shutil.rmtree(run_dir / "sub" / sub.student, ignore_errors=True)
            return report.Graded(sub.student, lesson, str(sub.path), outcome, key.max_score, hidden), merged

        results: list[report.Graded] = []
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = [pool.submit(one, s) for s in subs]
            for fut in as_completed(futures):
                g, merged = fut.result()
                gradebook.write_gradebook(db_url, g, test_ids)
                report.write_submission_reports(g, merged, out)
                results.append(g)
                o = g.outcome
                why = "" if o.status == "graded" else f"  failed: {o.reason}" + (f" ({o.detail})" if o.detail else "")
                why += f"  flagged: {len(o.flags)}" if o.flags else ""
                echo(f"  {g.student:<24} {g.score:g}/{g.max_score:g}  {o.seconds:5.1f} s{why}")
        report.write_csv(results, out / "grades.csv", test_ids)
        echo(f"wrote {out / 'grades.csv'}, feedback/ and results/ in {out}")
        return sorted(results, key=lambda g: g.student)
    finally:
        if not keep_work:
            shutil.rmtree(run_dir, ignore_errors=True)


def _infer_lesson(nb, path: Path) -> str:
    for cell in nb.cells:
        gid = submission.cell_id(cell)
        if gid:
            return gid[2:4]
    return path.stem


def check(notebook: str | Path, *, lesson: str | None = None, timeout: float = 600, cell_timeout: float = 300,
          echo=print) -> tuple[float, float, list[TestResult]]:
    """Run a learner's notebook with the lesson's visible checks and print a summary; returns
    (points, max_points, results). Hidden tests are not run (learners do not have them)."""
    path = Path(notebook)
    if not path.is_file():
        raise course.CourseError(f"notebook {str(notebook)!r} not found")
    try:
        nb = submission.read_notebook(path)
    except ValueError as e:
        raise course.CourseError(f"{path}: {e}")
    name = lesson or _infer_lesson(nb, path)
    try:
        [name] = course.select([name])
        release = course.lesson_path(name)
        key = submission.key_from_notebook(name, submission.read_notebook(release) if release.is_file() else nb)
    except course.CourseError:
        if lesson:
            raise
        key = submission.key_from_notebook(name, nb)  # outside the course folder (e.g. on Colab): its own checks
    if not key.tests:
        raise course.CourseError(f"{path}: no graded test cells found (is this a lorakit lesson notebook?)")
    m = submission.merge(nb, key)
    with tempfile.TemporaryDirectory(prefix="lorakit-check-") as tmp:
        box = Sandbox(Limits(), enabled=False, timeout=timeout)
        outcome = Session(key, m.notebook, Path(tmp) / "job", sandbox=box, cell_timeout=cell_timeout, timeout=timeout).run()
    results = [outcome.tests[t.grade_id] for t in key.tests]
    got, total = sum(r.points for r in results), sum(r.max_points for r in results)
    echo(f"{key.lesson}: checking {path.name}")
    for note in m.notes:
        echo(f"  note: {note}")
    for r in results:
        mark = "\u2705" if r.passed else "\u274c"
        msg = "\n      " + r.message.replace("\n", "\n      ") if r.message else ""
        echo(f"  {mark} {r.grade_id:<32} {r.points:g}/{r.max_points:g}{msg}")
    if outcome.status != "graded":
        echo(f"  the notebook did not finish: {outcome.reason} ({outcome.detail})")
    echo(f"visible checks: {got:g} / {total:g} points. Hidden tests run when your notebook is graded.")
    return got, total, results
