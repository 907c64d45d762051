"""Submissions that test the grader: honest ones (correct, wrong, partial) built from any lesson, and
adversarial ones for lesson 00 that try every trick we know of. Used by tests/test_grading.py and
benchmarks/bench_grading.py.

Each entry of `lesson00(...)` is (notebook or raw bytes, Expected): the honest score, the status and the
reason the grader must report. A cheat must never score more than its honest score.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import nbformat

from .. import course
from .submission import cell_id


@dataclass
class Expected:
    score: float
    status: str = "graded"
    reason: str = ""


def _solution_source(src: str) -> str:
    return "\n".join(l for l in src.split("\n") if l.strip() not in ("### BEGIN SOLUTION", "### END SOLUTION"))


def student_notebook(lesson: str, solved="all", minimal: bool = False) -> nbformat.NotebookNode:
    """The lesson as a learner would hand it in: the release version with the exercises in `solved`
    ("all", or a set of grade_ids) answered with the instructor's solution. `minimal` keeps only the
    exercise and test cells (a learner may delete the rest; it makes the grader's tests fast)."""
    release = nbformat.read(course.lesson_path(lesson), as_version=4)
    solution = nbformat.read(course.solution_path(lesson), as_version=4)
    answers = {cell_id(c): _solution_source(c.source) for c in solution.cells
               if c.metadata.get("nbgrader", {}).get("solution")}
    nb = copy.deepcopy(release)
    cells = []
    for c in nb.cells:
        gid = cell_id(c)
        meta = c.metadata.get("nbgrader", {})
        if gid in answers and (solved == "all" or gid in solved):
            c.source = answers[gid]
        if minimal and not meta:
            continue
        cells.append(c)
    nb.cells = cells
    return nb


def _code(src: str):
    return course.code(src)


def _insert_before(nb, gid: str, *cells):
    i = next(k for k, c in enumerate(nb.cells) if cell_id(c) == gid)
    nb.cells[i:i] = list(cells)
    return nb


def _replace(nb, gid: str, src: str):
    for c in nb.cells:
        if cell_id(c) == gid:
            c.source = src
    return nb


WRONG = {
    "ex00_bytes_per_param": '# ex00_bytes_per_param\nbytes_per_param = {"fp32": 8, "fp16": 4, "bf16": 4, "int8": 2, "nf4": 1}',
    "ex00_weights_gb": "# ex00_weights_gb\ndef weights_gb(n_params, dtype):\n    return 0.0",
}
CORRECT = {
    "ex00_bytes_per_param": '# ex00_bytes_per_param\nbytes_per_param = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "nf4": 0.5}',
    "ex00_weights_gb": "# ex00_weights_gb\ndef weights_gb(n_params, dtype):\n    return n_params * bytes_per_param[dtype] / 1e9",
}


def _wrong():
    nb = student_notebook("00_setup", minimal=True)
    for gid, src in WRONG.items():
        _replace(nb, gid, src)
    return nb


def lesson00(*, port: int = 9, secrets: list[str] = ()) -> dict[str, tuple]:
    """Every submission the grader is tested against, for lesson 00 (2 points: 1 per exercise).
    `port`: a TCP port listening on the grader's localhost (a sandbox must not reach it); `secrets`: paths the
    sandbox must not be able to read (the solution notebook, the gradebook)."""
    L = "00_setup"
    ok = lambda: student_notebook(L, minimal=True)  # noqa: E731
    subs: dict[str, tuple] = {}
    subs["correct_full"] = (student_notebook(L), Expected(2))
    subs["correct"] = (ok(), Expected(2))
    subs["wrong_stub"] = (student_notebook(L, solved=set(), minimal=True), Expected(0))
    subs["wrong_values"] = (_wrong(), Expected(0))
    subs["partial"] = (student_notebook(L, solved={"ex00_bytes_per_param"}, minimal=True), Expected(1))

    nb = ok()
    for gid, src in CORRECT.items():
        _replace(nb, gid, src.replace("\n", "\nimport sys, warnings\nprint('UserWarning: something is deprecated', file=sys.stderr)\n"
                                            "warnings.warn('this API is deprecated')\n", 1)
                 .replace("    return", "    import sys; print('warning from inside the function', file=sys.stderr)\n    return"))
    subs["stderr_warning"] = (nb, Expected(2))

    nb = _wrong()
    for c in nb.cells:
        if c.metadata.get("nbgrader", {}).get("grade"):
            c.source = f"# {cell_id(c)}\npass  # tests edited away"
    subs["edited_test"] = (nb, Expected(0))

    nb = _wrong()
    nb.cells = [c for c in nb.cells if not c.metadata.get("nbgrader", {}).get("grade")]
    subs["deleted_test"] = (nb, Expected(0))
    nb = ok()
    nb.cells = [c for c in nb.cells if not c.metadata.get("nbgrader", {}).get("grade")]
    subs["deleted_test_correct"] = (nb, Expected(2))

    nb = ok()
    for c in nb.cells:
        c.metadata = {}
    nb.metadata = {}
    subs["stripped_metadata"] = (nb, Expected(2))

    subs["monkeypatch"] = (_insert_before(_wrong(), "ex00_bytes_per_param_test", _code("""
import builtins, math, torch
import lorakit.checks as checks, lorakit.checks.setup as setup_checks
checks.expect = setup_checks.expect = lambda *a, **k: None
checks.close = setup_checks.close = lambda *a, **k: True
setup_checks.bytes_per_param = lambda table: None
setup_checks.weights_gb.__code__ = (lambda fn: None).__code__
torch.allclose = lambda *a, **k: True
math.isclose = lambda *a, **k: True
builtins.abs = lambda x: 0
""")), Expected(0, "failed", "tampering detected"))

    subs["input_transformer"] = (_insert_before(_wrong(), "ex00_bytes_per_param_test", _code("""
import ast
ip = get_ipython()
def neuter(lines):
    return [l.replace("assert ", "assert True or ").replace("check.", "(lambda *a, **k: None) or check.") for l in lines]
ip.input_transformers_post.append(neuter)
class NoAsserts(ast.NodeTransformer):
    def visit_Assert(self, node):
        return ast.Pass()
ip.ast_transformers.append(NoAsserts())
""")), Expected(0))

    nb = _wrong()
    _insert_before(nb, "ex00_weights_gb_test", _code("""
class _Anything:
    def __getattr__(self, name):
        return lambda *a, **k: None
check = _Anything()
abs = lambda x: 0
AssertionError = Exception
"""))
    subs["shadowing"] = (nb, Expected(0))

    subs["infinite_loop"] = (_insert_before(ok(), "ex00_weights_gb", _code("while True:\n    pass")), Expected(2))
    subs["swallow_interrupt"] = (_insert_before(ok(), "ex00_weights_gb", _code("""
import time
while True:
    try:
        time.sleep(0.05)
    except KeyboardInterrupt:
        pass
""")), Expected(2))
    subs["swallow_everything"] = (_insert_before(ok(), "ex00_weights_gb", _code("""
import time
while True:
    try:
        time.sleep(0.05)
    except BaseException:
        pass
""")), Expected(1, "failed", "timeout"))
    subs["os_exit"] = (_insert_before(ok(), "ex00_weights_gb", _code("import os\nos._exit(0)")), Expected(1, "failed", "crashed"))
    subs["memory_bomb"] = (_insert_before(ok(), "ex00_weights_gb", _code("""
def bomb():
    hog = []
    while True:
        hog.append(bytearray(256 * 2**20))
        hog[-1][::4096] = b"x" * len(hog[-1][::4096])
bomb()
""")), Expected(2))
    subs["fork_bomb"] = (_insert_before(ok(), "ex00_weights_gb", _code("import os\nwhile True:\n    os.fork()")), Expected(2))

    subs["network"] = (_insert_before(_wrong(), "ex00_bytes_per_param_test", _code(f"""
import socket
reached = []
for host, port in [("127.0.0.1", {port}), ("pypi.org", 443), ("1.1.1.1", 53)]:
    try:
        socket.create_connection((host, port), timeout=2).close()
        reached.append(host)
    except OSError:
        pass
if reached:  # a network would hand out the answers
{_indent(CORRECT["ex00_bytes_per_param"])}
{_indent(CORRECT["ex00_weights_gb"])}
""")), Expected(0))

    subs["read_hidden"] = (_insert_before(_wrong(), "ex00_bytes_per_param_test", _code(f"""
import glob, json, os
found = []
for path in {list(secrets)!r} + glob.glob("/work/*/solutions/*/*.ipynb") + glob.glob("/proc/*/root/**/solutions/**/*.ipynb", recursive=True)[:5]:
    try:
        with open(path, "rb") as f:
            found.append((path, f.read()))
    except OSError:
        pass
for path, data in found:
    if path.endswith(".ipynb"):  # run the instructor's solution cells: all the answers
        for cell in json.loads(data)["cells"]:
            if cell.get("metadata", {{}}).get("nbgrader", {{}}).get("solution"):
                exec("".join(cell["source"]))
""")), Expected(0))

    subs["write_gradebook"] = (_insert_before(_wrong(), "ex00_bytes_per_param_test", _code(f"""
import sqlite3
for path in {[s for s in secrets if s.endswith('.db')]!r}:
    try:
        con = sqlite3.connect(path)
        con.execute("UPDATE grade SET manual_score = 100, auto_score = 100")
        con.execute("DROP TABLE IF EXISTS student")
        con.commit()
    except Exception as e:
        print("could not write the gradebook:", e)
""")), Expected(0))

    subs["huge_output"] = (_insert_before(ok(), "ex00_weights_gb", _code("""
import sys
chunk = "x" * 10_000 + "\\n"
for _ in range(20_000):
    sys.stdout.write(chunk)
    sys.stderr.write(chunk)
""")), Expected(2))

    subs["invalid_json"] = (b'{"cells": [ this is not json', Expected(0, "failed", "invalid notebook"))
    return subs


def _indent(src: str) -> str:
    return "\n".join("    " + l for l in src.split("\n"))


def write(subs: dict[str, tuple], folder) -> None:
    """One notebook per submission: folder/NAME.ipynb (NAME becomes the student id)."""
    from pathlib import Path
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (nb, _) in subs.items():
        path = folder / f"{name}.ipynb"
        if isinstance(nb, (bytes, bytearray)):
            path.write_bytes(nb)
        else:
            path.write_text(json.dumps(nb, indent=1))
