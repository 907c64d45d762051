"""Gradescope's cost per upload: `lorakit gradescope LESSON`'s zip, set up and run the way Gradescope runs it
(tests/test_gradescope.py's Gradescope-shaped root: setup.sh once, then run_autograder per upload), on the
instructor's own solution handed in as a learner would (the student version with every exercise answered).

    python benchmarks/bench_gradescope.py                      # 00_setup and 02_lora, as `make bench` runs it
    python benchmarks/bench_gradescope.py 00_setup 02_lora --runs 3
    python benchmarks/bench_gradescope.py 05_qlora_finetune --params .ci/params.yml --runs 2

Prints, per lesson, setup.sh's seconds and run_autograder's seconds per upload (mean and range over the runs)
with the score, and the peak resident memory of the largest process of the runs (the sandboxed notebook).
Run it alone (one heavy job at a time): the times are wall-clock on this machine's cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import nbformat  # noqa: E402

from lorakit import course  # noqa: E402
from lorakit.grading import gradescope  # noqa: E402

import adversarial  # noqa: E402  (tests/adversarial.py)
from test_gradescope import Autograder, _base_python  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("lessons", nargs="*", default=["00_setup", "02_lora"],
                    help="lessons to time (default: 00_setup 02_lora, what `make bench` runs)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--params", help="parameters file injected into the upload (e.g. .ci/params.yml)")
    args = ap.parse_args()
    python = _base_python(for_other_users=True) or _base_python(for_other_users=False)
    rows = []
    for lesson in course.select(args.lessons):
        params = course.params_for(lesson, course.load_params(args.params)) if args.params else {}
        tmp = Path(tempfile.mkdtemp(prefix="bench-gradescope-"))
        os.chmod(tmp, 0o755)
        try:
            zip_path = gradescope.build(gradescope.Options(lesson, params=params), tmp / f"{lesson}.zip")
            t0 = time.perf_counter()
            ag = Autograder(tmp / "autograder", zip_path, python)
            setup = time.perf_counter() - t0
            upload = {f"{lesson}.ipynb": nbformat.writes(adversarial.student_notebook(lesson))}
            seconds, scores = [], []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                results, log = ag.grade(upload)
                seconds.append(time.perf_counter() - t0)
                scores.append(f"{results['score']:g}/{results['max_score']:g}")
                if results["score"] != results["max_score"]:
                    print(log)
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            rows.append((lesson, setup, seconds, scores, peak))
            mean = sum(seconds) / len(seconds)
            print(f"{lesson}: setup.sh {setup:.1f} s; run_autograder {mean:.1f} s per upload "
                  f"(range {min(seconds):.1f}-{max(seconds):.1f}, {len(seconds)} runs), scores {scores}, "
                  f"peak RSS of one process so far {peak:.0f} MB", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{'lesson':<20} {'setup s':>8} {'per upload s':>14} {'range':>12}  scores")
    for lesson, setup, seconds, scores, _ in rows:
        print(f"{lesson:<20} {setup:8.1f} {sum(seconds) / len(seconds):14.1f} {min(seconds):5.1f}-{max(seconds):<6.1f}  "
              f"{' '.join(scores)}")
    return 0 if all(s.split("/")[0] == s.split("/")[1] for *_, scores, _ in rows for s in scores) else 1


if __name__ == "__main__":
    sys.exit(main())
