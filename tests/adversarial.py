"""Submissions that test the grader: honest ones (correct, wrong, partial) built from any lesson, and
adversarial ones for lesson 00 that try every trick we know of, written by someone who has read the whole
kit, the grader included. Used by tests/test_grading.py and benchmarks/bench_grading.py. It lives under
tests/, not in the package: the attack table is for the kit's own tests, not something the grader ships.

Each entry of `lesson00(...)` is (notebook or raw bytes, Expected): the honest score, the status and the
reason the grader must report, and whether it must be flagged. A cheat must never score more than its
honest score; one that breaks the protocol ends as an explicit failure with a reason.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import nbformat

from lorakit import course
from lorakit.grading.submission import cell_id


@dataclass
class Expected:
    score: float
    status: str = "graded"
    reason: str = ""
    flagged: bool = False


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


# Everything a page can be made to run or load by HTML, as learners could put it in a markdown cell or an output.
HOSTILE_HTML = ("<script>alert('script')</script><img src=x onerror=\"alert('onerror')\">"
                "<a href=\"javascript:alert('js-link')\">a link</a><div onclick=\"alert('onclick')\">click me</div>"
                "<svg onload=\"alert('svg')\"><script>alert('svg-script')</script></svg>"
                "<iframe src=\"https://example.org/\"></iframe><style>.flagged{display:none}</style>"
                "<div style=\"position:fixed;top:0;left:0;width:100%;height:100%;background:white\">cover</div>"
                "<form action=\"https://example.org/\"><input name=q></form><object data=\"x.swf\"></object>"
                "<b>bold stays</b>")


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
""")), Expected(0, flagged=True))

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
""")), Expected(0, flagged=True))

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
""")), Expected(0, flagged=True))

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

    # Learner HTML in the feedback page: a markdown cell and display outputs that would run script when the
    # page is opened, hide the grader's "flagged" lines, or fake a PNG that breaks out of its <img> tag. The
    # look through the process (gc) makes it flagged, so the test can see that the flag line is still on the page.
    nb = ok()
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(HOSTILE_HTML + "\n\n[click](javascript:alert('md-link'))"))
    nb.cells.insert(1, _code(f"""
from IPython.display import HTML, SVG, display
display(HTML({HOSTILE_HTML!r}))
import gc
print(len(gc.get_objects()) > 0)
display({{"image/png": '"><script>alert("png")</script>', "text/plain": "a fake plot"}}, raw=True)
import base64
display({{"image/png": base64.b64encode(b"\\x89PNG not really").decode()}}, raw=True)
"""))
    subs["html_injection"] = (nb, Expected(2, flagged=True))

    subs["invalid_json"] = (b'{"cells": [ this is not json', Expected(0, "failed", "invalid notebook"))
    subs.update(_against_the_protocol(ok, _wrong))
    return subs


def over_budget(memory_mb: int, disk_mb: int) -> dict[str, tuple]:
    """Submissions of lesson 00 that stay under every per-process limit but go over the budget of the whole
    submission (graded with Limits(memory_mb=memory_mb, disk_mb=disk_mb)): children that together hold more
    memory than the budget, children that together write more than the job folder holds, and one that
    reports the niceness of a `subprocess` child (every process of a submission runs niced)."""
    L = "00_setup"
    ok = lambda: student_notebook(L, minimal=True)  # noqa: E731
    child = int(memory_mb * 0.6)
    memory = f"""
import subprocess, sys
hold = "b = bytearray({child} * 2**20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(4)"
kids = [subprocess.Popen([sys.executable, "-c", hold]) for _ in range(2)]
print("children exited with", [k.wait() for k in kids])
"""
    part = int(disk_mb * 0.4)
    disk = f"""
import subprocess, sys
write = "import sys; open(f'part{{sys.argv[1]}}.bin', 'wb').write(b'x' * {part} * 2**20)"
kids = [subprocess.Popen([sys.executable, "-c", write, str(i)]) for i in range(3)]
print("children exited with", [k.wait() for k in kids])
import time; time.sleep(2)   # the grader notices a full job folder within a moment: the next test never runs
"""
    nice = """
import os, subprocess, sys
print("niceness of a subprocess child:", subprocess.run([sys.executable, "-c", "import os; print(os.nice(0))"],
      capture_output=True, text=True).stdout.strip(), "of the runner:", os.nice(0))
"""
    return {
        "correct": (ok(), Expected(2)),
        # the kernel stops one child; the notebook goes on and is judged, but the submission is marked failed
        "children_memory": (_insert_before(ok(), "ex00_weights_gb", _code(memory)), Expected(2, "failed", "resource limit")),
        "children_disk": (_insert_before(ok(), "ex00_weights_gb", _code(disk)), Expected(1, "failed", "resource limit")),
        "subprocess_nice": (_insert_before(ok(), "ex00_weights_gb", _code(nice)), Expected(2)),
    }


# What a learner who has read the grader can do from inside the sandboxed process: find the channel to the
# grader (gc), read every thread's frames, patch the transport, forge, replay and garble messages, answer with
# objects that lie, or let lorakit's own reference answer. Shared by several attacks below:
_FIND = """
import gc
from lorakit.grading import protocol, sandboxed
CHAN = next(o for o in gc.get_objects() if isinstance(o, protocol.Channel))
SPEC = next(o for o in gc.get_objects() if isinstance(o, dict) and "cells" in o and "cell_timeout" in o)
TESTS = [i for i, c in enumerate(SPEC["cells"]) if c["kind"] == "test"]
"""
# The answers of the visible calls (seed 0), worked out in advance: all a cheat can know before grading.
_MEMORIZED = """
from lorakit.checks import setup as _s
_cases = _s.weights_gb.inputs(0)["cases"]
MEMO = {(n, d): n * {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "nf4": 0.5}[d] / 1e9 for n, d in _cases}
"""


def _against_the_protocol(ok, wrong) -> dict[str, tuple]:
    subs: dict[str, tuple] = {}
    # Forge the whole conversation: claim every test cell, answer every probe "passed", say done, exit.
    subs["forged_conversation"] = (_insert_before(wrong(), "ex00_bytes_per_param_test", _code(_FIND + """
import json, os
for i in TESTS:
    CHAN.send({"op": "test", "index": i})
    while True:
        req = CHAN.recv()
        if req["op"] == "next":
            break
        if req["op"] == "probe":
            CHAN.send({"op": "answer", "id": req["id"], "outputs": []},
                      raw={"reply": json.dumps({"ok": True, "answer": {"passed": True, "sizes": [13.48] * 6}})})
CHAN.send({"op": "done"})
os._exit(0)
""")), Expected(0, flagged=True))
    # Answers only for the visible inputs (memorized), nothing else: the hidden call fails.
    nb = ok()
    _replace(nb, "ex00_weights_gb", "# ex00_weights_gb" + _MEMORIZED + "def weights_gb(n_params, dtype):\n"
                                    "    return MEMO.get((n_params, dtype), 0.0)")
    subs["memorized"] = (nb, Expected(1))
    # Patch the transport: every weights_gb reply becomes the visible call's right answers.
    subs["patched_transport"] = (_insert_before(wrong(), "ex00_bytes_per_param_test", _code(_MEMORIZED + """
import json
from lorakit.checks import judged
real = judged.run_probe
def run_probe(check, inputs, objects=(), kw_objects=None):
    if check.name.endswith("weights_gb"):
        return json.dumps({"ok": True, "answer": {"sizes": [MEMO.get((n, d), 13.476831232) for n, d in inputs["cases"]]}})
    return real(check, inputs, objects, kw_objects)
judged.run_probe = run_probe
""")), Expected(0, flagged=True))
    # Replay: answer the visible call honestly (memorized), then send that same reply again for the hidden call.
    nb = ok()
    _replace(nb, "ex00_weights_gb", "# ex00_weights_gb" + _MEMORIZED + "def weights_gb(n_params, dtype):\n"
                                    "    return MEMO.get((n_params, dtype), 0.0)")
    subs["replayed_reply"] = (_insert_before(nb, "ex00_bytes_per_param_test", _code(_FIND + """
visible = {}
real_send = protocol.Channel.send
def send(self, msg, raw=None):
    if msg.get("op") == "answer" and raw:
        if msg["id"] == 0:
            visible["reply"] = raw["reply"]
        else:
            raw = {"reply": visible["reply"]}
    return real_send(self, msg, raw)
protocol.Channel.send = send
""")), Expected(1, flagged=True))
    # A thread that reads every other thread's frames while the checks run; a last cell prints what it found.
    nb = _insert_before(ok(), "ex00_bytes_per_param_test", _code("""
import sys, threading, time
FOUND = []
def spy():
    for _ in range(2000):
        for frame in sys._current_frames().values():
            while frame is not None:
                for k, v in list(frame.f_locals.items()):
                    if isinstance(v, dict) and "op" in v or isinstance(v, str) and ("HIDDEN" in v or "seed=" in v):
                        text = repr(v)[:2000]
                        if text not in FOUND:
                            FOUND.append(text)
                frame = frame.f_back
        time.sleep(0.002)
threading.Thread(target=spy, daemon=True).start()
"""))
    nb.cells.append(_code("import time\ntime.sleep(0.5)\nprint('the spy found:', *FOUND, sep='\\nSPY ')"))
    subs["frame_reader"] = (nb, Expected(2, flagged=True))
    # Messages the grader did not ask for, garbage, and an oversized line, sent after the first test passed.
    subs["unasked_answer"] = (_insert_before(ok(), "ex00_weights_gb", _code(_FIND + """
CHAN.send({"op": "answer", "id": 7, "outputs": []}, raw={"reply": '{"ok": true, "answer": {"sizes": []}}'})
""")), Expected(1, "failed", "protocol error", flagged=True))
    subs["garbage"] = (_insert_before(ok(), "ex00_weights_gb", _code(_FIND + """
import os
os.write(CHAN.wfd, b"\\x00\\xff this is not a message }{\\n")
""")), Expected(1, "failed", "protocol error", flagged=True))
    subs["oversized"] = (_insert_before(ok(), "ex00_weights_gb", _code(_FIND + """
import os
chunk = b"7" * 2**20
for _ in range(protocol.MAX_MESSAGE // len(chunk) + 2):
    os.write(CHAN.wfd, chunk)
""")), Expected(1, "failed", "protocol error", flagged=True))
    # Replies that are not data the check can use: a tensor whose bytes do not match its shape, and a dtype
    # that does not exist. The check fails with the reason; the rest of the notebook is graded.
    subs["malformed_reply"] = (_insert_before(ok(), "ex00_bytes_per_param_test", _code("""
import json
from lorakit.checks import judged
real = judged.run_probe
def run_probe(check, inputs, objects=(), kw_objects=None):
    if check.name.endswith("weights_gb"):
        bad = [{"$tensor": ["float32", [1000], "AAAA"]}, {"$tensor": ["complex64", [1], "AAAAAAAAAAA="]}]
        return json.dumps({"ok": True, "answer": {"sizes": bad}})
    return real(check, inputs, objects, kw_objects)
judged.run_probe = run_probe
""")), Expected(1, flagged=True))
    # The sandbox closes its end of the channel and goes on: nothing more arrives.
    subs["closed_channel"] = (_insert_before(ok(), "ex00_bytes_per_param_test", _code(_FIND + """
import os
os.close(CHAN.wfd)
""")), Expected(0, "failed", "crashed", flagged=True))
    # A probe that never answers: the learner's function swallows the grader's interrupt.
    nb = ok()
    _replace(nb, "ex00_weights_gb", "# ex00_weights_gb\nimport time\ndef weights_gb(n_params, dtype):\n"
                                    "    while True:\n        try:\n            time.sleep(0.05)\n"
                                    "        except BaseException:\n            pass")
    subs["silent_probe"] = (nb, Expected(1, "failed", "timeout"))
    # Answers of the right type that lie in __eq__ and __bool__.
    nb = wrong()
    _replace(nb, "ex00_bytes_per_param", """# ex00_bytes_per_param
class Liar(float):
    def __eq__(self, other):
        return True
    __ne__ = lambda self, other: False
    __bool__ = lambda self: True
    __hash__ = float.__hash__
class LiarDict(dict):
    def __contains__(self, key):
        return True
    def __getitem__(self, key):
        return Liar(8)
    def __eq__(self, other):
        return True
bytes_per_param = LiarDict(fp32=Liar(8), fp16=Liar(8), bf16=Liar(8), int8=Liar(8), nf4=Liar(8))""")
    _replace(nb, "ex00_weights_gb", "# ex00_weights_gb\ndef weights_gb(n_params, dtype):\n    return Liar(-1)")
    subs["lying_answers"] = (nb, Expected(0))
    # lorakit's own reference answers the exercises: withheld from the sandbox while lesson 00 is graded (the
    # stub raises), and flagged for the instructor.
    nb = ok()
    _replace(nb, "ex00_bytes_per_param", "# ex00_bytes_per_param\nfrom lorakit.memory import BYTES as bytes_per_param")
    _replace(nb, "ex00_weights_gb", "# ex00_weights_gb\nfrom lorakit import memory\ndef weights_gb(n_params, dtype):\n"
                                    "    return n_params * memory.BYTES[dtype] / 1e9")
    subs["reference_import"] = (nb, Expected(0, flagged=True))
    subs.update(_around_the_flagger(ok))
    return subs


# Every way a reader of the flagger found to take lesson 00's answer (lorakit.memory.BYTES) without a flag.
# Each one scores nothing (the answer is withheld from the sandbox) and is flagged (the flagger fails closed).
BYPASSES = {
    # imported by a cell that is no exercise, used by the exercise through the name it bound
    "import_elsewhere": ["import lorakit.memory as facts", "# ex00_bytes_per_param\nbytes_per_param = dict(facts.BYTES)"],
    # a cell whose first line repeats a test cell's id: run as the learner's own code by merge
    "repeated_test_id": ["# ex00_weights_gb_test\nfrom lorakit.memory import BYTES as bytes_per_param"],
    # names resolve in execution order: `kit` is lorakit.memory where it is used, math only later
    "rebound_later": ["import lorakit.memory as kit", "# ex00_bytes_per_param\nbytes_per_param = kit.BYTES",
                      "import math as kit"],
    "getattr_literal": ["# ex00_bytes_per_param\nimport lorakit.memory\nbytes_per_param = getattr(lorakit.memory, 'BYTES')"],
    "getattr_computed": ["# ex00_bytes_per_param\nimport lorakit.memory\nbytes_per_param = getattr(lorakit.memory, 'BY' + 'TES')"],
    "vars": ["# ex00_bytes_per_param\nimport lorakit.memory\nbytes_per_param = vars(lorakit.memory)['BY' + 'TES']"],
    "sys_modules": ["# ex00_bytes_per_param\nimport sys, lorakit.memory\nbytes_per_param = sys.modules['lorakit.memory'].BYTES"],
    "importlib_util": ["# ex00_bytes_per_param\nimport importlib.util as u\n"
                       "spec = u.find_spec('lorakit.memory')\nm = u.module_from_spec(spec)\nspec.loader.exec_module(m)\n"
                       "bytes_per_param = m.BYTES"],
    "cell_magic": ["%%capture\nfrom lorakit.memory import BYTES as bytes_per_param"],
    "line_magic": ["# ex00_bytes_per_param\n%time from lorakit.memory import BYTES as bytes_per_param"],
    "run_cell": ["# ex00_bytes_per_param\nget_ipython().run_cell('from lorakit.memory import BYTES as bytes_per_param')"],
    # a cell that is not Python, run through an input transformer registered by an earlier cell
    "unparseable": ["ip = get_ipython()\nip.input_transformers_cleanup.append(lambda lines: [l.replace('@@', "
                    "'from lorakit.memory import BYTES as bytes_per_param') for l in lines])",
                    "# ex00_bytes_per_param\n@@ this is no Python"],
    # the check module's own helpers, and the source file of the reference read and run
    "check_helper": ["# ex00_bytes_per_param\nfrom lorakit.checks import setup\nbytes_per_param = dict(setup._bytes())"],
    "source_file": ["# ex00_bytes_per_param\nimport lorakit, pathlib\n"
                    "text = (pathlib.Path(lorakit.__file__).parent / 'memory.py').read_text()\n"
                    "start = text.index('BYTES = ')\nbytes_per_param = eval(text[start + 8:text.index('}', start) + 1])"],
}


def _around_the_flagger(ok) -> dict[str, tuple]:
    subs = {}
    for name, cells in BYPASSES.items():
        nb, after = ok(), False
        for src in cells:          # cells before the exercise's go before it, cells after it at the end
            if src.startswith("# ex00_bytes_per_param\n"):
                _replace(nb, "ex00_bytes_per_param", src)
                after = True
            elif after:
                nb.cells.append(_code(src))
            else:
                _insert_before(nb, "ex00_bytes_per_param", _code(src))
        if not any(src.startswith("# ex00_bytes_per_param\n") for src in cells):
            _replace(nb, "ex00_bytes_per_param", "# ex00_bytes_per_param\npass  # answered above")
        subs[f"flagger_{name}"] = (nb, Expected(0, flagged=True))
    # a cell of the lesson's own, moved to where it does the learner's work
    release = nbformat.read(course.lesson_path("00_setup"), as_version=4)
    moved = next(c.source for c in release.cells if c.cell_type == "code" and "from lorakit import memory" in c.source)
    nb = ok()
    _insert_before(nb, "ex00_bytes_per_param", _code(moved))
    _replace(nb, "ex00_bytes_per_param", "# ex00_bytes_per_param\nbytes_per_param = dict(memory.BYTES)")
    subs["flagger_moved_instructor_cell"] = (nb, Expected(0, flagged=True))
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
