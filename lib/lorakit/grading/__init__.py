"""Hardened, parallel autograding on nbgrader: `lorakit grade` for instructors, `lorakit check` for learners.

    from lorakit import grading
    results = grading.grade("00_setup", ["submissions/"], workers=2)   # -> list[report.Graded]
    ok = grading.check("my_copy_of_00_setup.ipynb")                       # visible checks, printed

How a class is graded (each step in its own module):

1. submission.py: the lesson is registered in the gradebook by nbgrader itself, and its graded cells (with
   hidden tests) are read back from there, each test cell as calls of judged checks (testcells.py); submissions are
   collected from folders or an LMS zip; each one is laid over the key (edited or deleted test cells
   restored, stripped metadata recovered from first lines).
2. Two trust levels. Untrusted: sandbox.py starts every submission in its own process (namespaces, its own
   uid, rlimits, no network, a private view of the filesystem), several at a time, where sandboxed.py runs
   the learner's cells and answers probe requests with data. Trusted, in the grader's process, which never
   runs learner code: session.py holds the conversation (protocol.py: framing, size caps, schema), judge.py
   draws each check's inputs (hidden calls from a secret seed) and judges the replies. Between the two only
   data crosses, in the wire format of lorakit.checks.wire, which both sides import. No test-cell source
   ever enters the sandbox. Every submission ends as `graded` or `failed` with a reason.
3. reference_use.py flags a submission whose own code uses lorakit's reference for an exercise (graded,
   flagged for the instructor); gradebook.py records the grades in nbgrader's gradebook; report.py writes
   grades.csv, feedback HTML (each check's name and message, the learner's outputs, never a hidden line) and
   results.json.
"""

from __future__ import annotations

__all__ = ["grade", "check", "default_db_url", "Limits", "Protections", "detect"]

# Imported lazily: the sandbox's entry point (python -m lorakit.grading.sandbox) must start fast.
_WHERE = {"grade": "batch", "check": "batch", "default_db_url": "batch",
          "Limits": "sandbox", "Protections": "sandbox", "detect": "sandbox"}


def __getattr__(name):
    if name in _WHERE:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
