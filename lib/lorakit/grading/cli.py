"""`lorakit grade` (instructors) and `lorakit check` (learners), registered on lorakit's command line."""

from __future__ import annotations


def _grade(args) -> int:
    from .. import course
    from . import Limits, grade
    params = None
    if args.params:
        params = course.params_for(course.select([args.lesson])[0], course.load_params(args.params))
    limits = Limits(memory_mb=args.memory, processes=args.processes, file_size_mb=args.file_size, threads=args.threads)
    results = grade(args.lesson, args.submissions, workers=args.workers, db=args.db, timeout=args.timeout,
                    cell_timeout=args.cell_timeout, out=args.out, shard=args.shard, limits=limits, params=params,
                    sandbox=not args.no_sandbox, keep_work=args.keep_work)
    from .report import table
    print()
    print(table(results))
    failed = sum(g.status == "failed" for g in results)
    errors = sum(g.status == "grader error" for g in results)
    flagged = sum(bool(g.outcome.flags) for g in results)
    print(f"\n{len(results) - failed - errors} graded, {failed} failed (see the status and reason columns of grades.csv)"
          + (f", {errors} with a grader error (a check's judge broke: a bug of the kit, reported in the detail "
             "column; the submissions' other checks are graded)" if errors else "")
          + (f", {flagged} flagged (the flags column)" if flagged else ""))
    return 1 if failed or errors else 0


def _check(args) -> int:
    from . import check
    got, total, _ = check(args.notebook, lesson=args.lesson, timeout=args.timeout)
    return 0 if got == total else 1


def add_commands(sub) -> None:
    p = sub.add_parser("grade", help="autograde a class's submissions of a lesson (sandboxed, in parallel)",
                       description="Grade every submission (a folder of .ipynb files, notebooks, or an LMS zip) "
                                   "into the nbgrader gradebook, grades.csv, feedback HTML and results.json. "
                                   "Every submission is reported; the exit status is 0 when all were graded, "
                                   "1 when any could not be graded (a timeout, a crash, an invalid notebook, a "
                                   "grader error: see the status and reason columns of grades.csv), 2 for a usage "
                                   "error.")
    p.add_argument("lesson", help="lesson name or number, e.g. 00_setup or 0")
    p.add_argument("submissions", nargs="+", help="folders of notebooks, notebooks, or .zip downloads")
    p.add_argument("--workers", type=int, default=2, help="submissions graded at once (default 2)")
    p.add_argument("--db", help="gradebook SQLAlchemy URL (default: sqlite in grading/work/gradebook.db)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per submission (default 600)")
    p.add_argument("--cell-timeout", type=float, default=120, help="seconds per cell (default 120)")
    p.add_argument("--out", help="folder for grades.csv, feedback/ and results/ (default grading/work/grades/LESSON)")
    p.add_argument("--shard", help="i/n: grade only the i-th of n deterministic slices (one per machine)")
    p.add_argument("--params", help="parameters file (e.g. grading/ci_params.yml) injected after the parameters cell")
    p.add_argument("--memory", type=int, default=4096, help="MB of address space per submission (default 4096)")
    p.add_argument("--processes", type=int, default=256, help="processes+threads per submission (default 256)")
    p.add_argument("--file-size", type=int, default=64, help="largest file a submission may write, MB (default 64)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per submission (default 1)")
    p.add_argument("--no-sandbox", action="store_true", help="run without namespaces, uid and limits (trusted code only)")
    p.add_argument("--keep-work", action="store_true", help="keep the job folders under grading/work/jobs")
    p.set_defaults(func=_grade)

    p = sub.add_parser("check", help="run a lesson notebook's visible checks and print a summary (for learners)")
    p.add_argument("notebook", help="your notebook (.ipynb), e.g. downloaded from Colab")
    p.add_argument("--lesson", help="the lesson, when it cannot be told from the notebook")
    p.add_argument("--timeout", type=float, default=600, help="seconds for the whole notebook (default 600)")
    p.set_defaults(func=_check)
