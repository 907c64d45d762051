"""Grading throughput: `lorakit grade` (sandbox on, 2 workers, verdicts from the trusted judge) vs stock
`nbgrader autograde` (one submission after another, checks run in the learner's kernel), side by side on the
same 20 submissions of lesson 00, into separate gradebooks.

    python benchmarks/bench_grading.py          # 20 submissions, exercise and test cells only (~1 min)
    python benchmarks/bench_grading.py --full   # 20 whole lesson notebooks (torch, bitsandbytes: ~5 min on 2 busy cores)

Both sides register the lesson in their gradebook before the clock starts. lorakit's time includes what
stock autograde does not do (drawing the hidden inputs and judging in the trusted process, feedback HTML,
results.json, grades.csv). Prints seconds, submissions per minute, the throughput ratio (the promise: >= 5x
on two cores) and whether the two agree on every submission's score (they must: all are honest). Exits 1
when a promise is not met.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import nbformat  # noqa: E402

from lorakit import course, grading  # noqa: E402
from lorakit.grading import gradebook, submission  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import adversarial  # noqa: E402  (the kit's submissions for tests: tests/adversarial.py)

LESSON = "00_setup"
PROMISE = 5.0   # lorakit grade at least this many times stock autograde's throughput


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="whole notebooks instead of exercise and test cells only")
    args = ap.parse_args()
    args.minimal = not args.full
    root = course.course_root()
    tmp = Path(tempfile.mkdtemp(prefix="bench-grading-", dir=root / "nbgrader_course" / "work"))
    try:
        kinds = ["all", {"ex00_bytes_per_param"}, set(), "all"]
        subs = tmp / "subs"
        for i in range(args.n):
            nb = adversarial.student_notebook(LESSON, solved=kinds[i % len(kinds)], minimal=args.minimal)
            path = tmp / "submitted" / f"s{i:02d}" / LESSON / f"{LESSON}.ipynb"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(nbformat.writes(nb))
        shutil.copytree(tmp / "submitted", subs)
        ours_db, stock_db = f"sqlite:///{tmp}/ours.db", f"sqlite:///{tmp}/stock.db"
        submission.build_key(LESSON, ours_db, tmp / "k1", root)
        submission.build_key(LESSON, stock_db, tmp / "k2", root)

        t0 = time.perf_counter()
        res = course.run_nbgrader("autograde", LESSON, "--force", f"--CourseDirectory.db_url={stock_db}",
                                  f"--CourseDirectory.submitted_directory={tmp / 'submitted'}",
                                  f"--CourseDirectory.autograded_directory={tmp / 'autograded'}",
                                  "--log-level=WARN", root=root)
        stock = time.perf_counter() - t0
        if res.returncode != 0:
            print(res.stdout, res.stderr)
            return 1

        t0 = time.perf_counter()
        results = grading.grade(LESSON, [subs], workers=args.workers, db=ours_db, out=tmp / "out", echo=None)
        ours = time.perf_counter() - t0

        ours_scores = gradebook.read_gradebook(ours_db, LESSON)
        stock_scores = gradebook.read_gradebook(stock_db, LESSON)
        agree = sum(ours_scores[s] == stock_scores.get(s) for s in ours_scores)
        failed = sum(g.status != "graded" for g in results)
        prot = grading.detect()
        print(f"lesson {LESSON}, {args.n} submissions ({'exercise cells only' if args.minimal else 'whole notebooks'}), "
              f"{os.cpu_count()} CPUs; sandbox: {'on' if prot.namespaces else 'partial: ' + ', '.join(prot.off())}; "
              f"limits per submission: {'cgroup ' + prot.cgroup if prot.cgroup else 'off (' + prot.cgroup_why + ')'}"
              f"{', job folder tmpfs' if prot.disk else ''}; answers withheld: {'yes' if prot.namespaces else 'no'}")
        print(f"{'grader':<40} {'seconds':>8} {'subs/min':>9}")
        print(f"{'stock nbgrader autograde (sequential)':<40} {stock:8.1f} {60 * args.n / stock:9.1f}")
        print(f"{f'lorakit grade ({args.workers} workers, sandbox on)':<40} {ours:8.1f} {60 * args.n / ours:9.1f}")
        ratio = stock / ours
        print(f"throughput ratio (lorakit / stock): {ratio:.2f}x   (promise >= {PROMISE:g}x)")
        print(f"scores agree with stock nbgrader on {agree}/{len(ours_scores)} submissions; lorakit failures: {failed}")
        met = ratio >= PROMISE and agree == len(ours_scores) == args.n and not failed
        print("promise met" if met else "PROMISE NOT MET")
        return 0 if met else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
