"""`lorakit grade` and `lorakit gradescope` (instructors) and `lorakit check` (learners), registered on lorakit's
command line."""

from __future__ import annotations


def _grade(args) -> int:
    from lorakit import course
    from lorakit.grading import Limits, grade
    params = None
    if args.params:
        params = course.params_for(course.select([args.lesson])[0], course.load_params(args.params))
    limits = Limits(memory_mb=args.memory, processes=args.processes, file_size_mb=args.file_size, threads=args.threads,
                    disk_mb=args.disk)
    results = grade(args.lesson, args.submissions, workers=args.workers, db=args.db, timeout=args.timeout,
                    cell_timeout=args.cell_timeout, out=args.out, shard=args.shard, limits=limits, params=params,
                    sandbox=not args.no_sandbox, keep_work=args.keep_work)
    from lorakit.grading.report import table
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


def _gradescope(args) -> int:
    from lorakit import course
    from lorakit.grading.gradescope import Options, build
    params = {}
    if args.params:
        params = course.params_for(course.select([args.lesson])[0], course.load_params(args.params))
    options = Options(args.lesson, hidden_names=args.hidden_names, timeout=args.timeout,
                      cell_timeout=args.cell_timeout, memory_mb=args.memory, threads=args.threads, params=params)
    path = build(options, args.out)
    print(f"wrote {path}: upload it as the autograder of a Gradescope programming assignment "
          "(docs/grading-elsewhere.md says how, and what to set there)")
    return 0


def _shards(args) -> int:
    import sys
    from pathlib import Path

    from lorakit.grading.shards import render
    text = render(args.engine, args.lesson, args.submissions, args.shards, results=args.results,
                  course_dir=args.course, workers=args.workers, lorakit=args.lorakit, image=args.image,
                  secret=args.secret, claim=args.claim)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}: its first lines say how to run it", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _check(args) -> int:
    from lorakit.grading import check
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
    p.add_argument("--db", help="gradebook SQLAlchemy URL (default: sqlite in nbgrader_course/work/gradebook.db)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per submission (default 600)")
    p.add_argument("--cell-timeout", type=float, default=120, help="seconds per cell (default 120)")
    p.add_argument("--out", help="folder for grades.csv, feedback/ and results/ (default nbgrader_course/work/grades/LESSON)")
    p.add_argument("--shard", help="i/n: grade only the i-th of n deterministic slices (one per machine)")
    p.add_argument("--params", help="parameters file (e.g. .ci/params.yml) injected after the parameters cell")
    p.add_argument("--memory", type=int, default=4096,
                   help="MB of memory per submission, all its processes together where a cgroup is available, "
                        "else per process (default 4096)")
    p.add_argument("--processes", type=int, default=256, help="processes+threads per submission (default 256)")
    p.add_argument("--file-size", type=int, default=64, help="largest file a submission may write, MB (default 64)")
    p.add_argument("--disk", type=int, default=512, help="MB a submission may write in all (its job folder, default 512)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads, and CPUs with a cgroup, per submission (default 1)")
    p.add_argument("--no-sandbox", action="store_true", help="run without namespaces, uid and limits (trusted code only)")
    p.add_argument("--keep-work", action="store_true", help="keep the job folders under nbgrader_course/work/jobs")
    p.set_defaults(func=_grade)

    p = sub.add_parser("gradescope", help="build the Gradescope autograder zip of a lesson (same sandbox and judge)",
                       description="Write the autograder zip Gradescope expects (setup.sh, run_autograder, the kit and "
                                   "the versions CI tested, the lesson's key). Gradescope grades each upload in its "
                                   "own container with `lorakit grade`'s sandbox and trusted judge and shows the "
                                   "score, one test per test cell, and the checks on inputs drawn when graded.")
    p.add_argument("lesson", help="lesson name or number, e.g. 02_lora or 2")
    p.add_argument("--out", help="the zip to write (default nbgrader_course/work/gradescope/LESSON.zip)")
    p.add_argument("--hidden-names", default="hidden",
                   help="when students see the names and messages of the checks on inputs drawn when graded: "
                        "hidden (default: never; the cell's test says how many passed), after_due_date, "
                        "after_published or visible")
    p.add_argument("--timeout", type=float, default=480,
                   help="seconds per upload (default 480; set Gradescope's autograder timeout above it)")
    p.add_argument("--cell-timeout", type=float, default=120, help="seconds per cell (default 120)")
    p.add_argument("--memory", type=int, default=4096, help="MB of address space for the submission (default 4096)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads for the submission (default 1)")
    p.add_argument("--params", help="parameters file (e.g. .ci/params.yml) injected after the parameters cell")
    p.set_defaults(func=_gradescope)

    p = sub.add_parser("shards", help="write a Slurm array script or a Kubernetes Indexed Job that grades a class in "
                                      "n shards into one PostgreSQL gradebook",
                       description="Write the job file that runs `lorakit grade LESSON SUBMISSIONS --shard i/n` as n "
                                   "tasks of a Slurm array or n pods of a Kubernetes Indexed Job, all into the "
                                   "PostgreSQL gradebook whose URL each task reads from LORAKIT_DB (Slurm: the "
                                   "environment sbatch passes on; Kubernetes: a secret). Its first lines say how to run it.")
    p.add_argument("engine", choices=["slurm", "kubernetes"])
    p.add_argument("lesson", help="lesson name or number, e.g. 02_lora or 2")
    p.add_argument("submissions", help="the class's submissions, as the cluster's machines see them")
    p.add_argument("--shards", type=int, required=True, help="how many tasks (each grades 1/n of the class)")
    p.add_argument("--results", required=True, help="folder for each shard's grades.csv and feedback (and Slurm's logs)")
    p.add_argument("--course", help="the course folder as the machines see it (default: this one)")
    p.add_argument("--workers", type=int, default=1, help="submissions each task grades at once (default 1)")
    p.add_argument("--lorakit", help="slurm: the lorakit command the tasks run (default: this environment's)")
    p.add_argument("--image", help="kubernetes: the container image with the kit (required)")
    p.add_argument("--secret", default="lorakit-gradebook", help="kubernetes: the secret with the gradebook URL (key: url)")
    p.add_argument("--claim", default="lorakit-course", help="kubernetes: the volume claim with the course folder")
    p.add_argument("--out", help="write the job file here (default: print it)")
    p.set_defaults(func=_shards)

    p = sub.add_parser("check", help="run a lesson notebook's visible checks and print a summary (for learners)")
    p.add_argument("notebook", help="your notebook (.ipynb), e.g. downloaded from Colab")
    p.add_argument("--lesson", help="the lesson, when it cannot be told from the notebook")
    p.add_argument("--timeout", type=float, default=600, help="seconds for the whole notebook (default 600)")
    p.set_defaults(func=_check)
