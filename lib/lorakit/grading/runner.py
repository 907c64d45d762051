"""One submission, one process: execute the learner's cells, judge the test cells, report to the grader.

Two halves talk over a pair of pipes with one JSON message per line:

- `execute()` runs inside the sandbox (sandbox.py). It runs the learner's cells in an IPython shell with a
  time limit per cell. At a test cell it asks the grader for that cell's source (hidden tests included: they
  are never on disk in the sandbox, and no learner code runs before they arrive), then judges it:
  * the test is compiled here with plain `compile()`, so IPython input or AST transformers the learner
    installed never touch it;
  * it runs in a namespace where builtins and the names earlier test cells bound (`check`, ...) cannot be
    shadowed by the learner;
  * `Guard` captured the modules the tests rely on (builtins, lorakit.checks, the grader, the comparison
    helpers of math/torch/numpy, sys.modules entries, trace hooks) before any learner code ran, and verifies
    them before and after every test: a change is put back and reported as tampering;
  * stderr is captured and shown, never judged: only an exception fails a test.
- `Session` runs in the grader (outside the sandbox): it answers test requests once each, in order, with a
  fresh nonce, enforces the per-cell and per-submission deadlines, and turns whatever happens (a normal
  end, a timeout, a crash, a resource limit, a garbled message) into an explicit `Outcome`.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MAX_CELL_OUTPUT = 64 * 1024          # characters of text kept per cell
MAX_TOTAL_OUTPUT = 1024 * 1024       # characters kept per submission
MAX_MESSAGE = 8 * 1024 * 1024        # bytes: a longer line from the sandbox is a protocol violation
GRACE = 10.0                         # seconds a cell may run past its limit before the process is killed


# ------------------------------------------------------------------------------------------- protocol

class Channel:
    def __init__(self, rfd: int, wfd: int):
        self.r = os.fdopen(rfd, "rb", buffering=0)
        self.w = os.fdopen(wfd, "wb", buffering=0)
        self.buf = b""

    def send(self, msg: dict) -> None:
        self.w.write((json.dumps(msg) + "\n").encode())

    def recv(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.r.read(65536)
            if not chunk:
                raise EOFError("the grader closed the channel")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


# ------------------------------------------------------------------------------ inside the sandbox

class CellTimeout(BaseException):
    """Raised in a cell that ran past its time limit (a BaseException but not a KeyboardInterrupt, so
    `except KeyboardInterrupt` in learner code does not swallow it)."""


class _Capped:
    """A text stream that keeps at most `limit` characters (huge output cannot exhaust memory)."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, name: str, sink):
        self.name, self.sink = name, sink

    def write(self, s) -> int:
        if not isinstance(s, str):
            s = str(s)
        self.sink(self.name, s)
        return len(s)

    def writelines(self, lines):
        for l in lines:
            self.write(l)

    def flush(self):
        pass

    def isatty(self):
        return False

    def readable(self):
        return False

    def writable(self):
        return True


class Outputs:
    """Outputs of the cell being run, nbformat-shaped, capped."""

    def __init__(self):
        self.cell: list[dict] = []
        self.total = 0
        self.truncated = False

    def start(self):
        self.cell, self.cell_chars = [], 0

    def stream(self, name: str, text: str):
        room = min(MAX_CELL_OUTPUT - self.cell_chars, MAX_TOTAL_OUTPUT - self.total)
        if room <= 0:
            if not self.truncated:
                self.truncated = True
                self.cell.append({"output_type": "stream", "name": "stderr", "text": "\n[output truncated by the grader]\n"})
            return
        text = text[:room]
        self.cell_chars += len(text)
        self.total += len(text)
        if self.cell and self.cell[-1].get("output_type") == "stream" and self.cell[-1]["name"] == name:
            self.cell[-1]["text"] += text
        else:
            self.cell.append({"output_type": "stream", "name": name, "text": text})

    def display(self, data: dict):
        keep = {}
        for mime in ("image/png", "text/html", "text/plain"):
            if mime in data and isinstance(data[mime], str):
                size = len(data[mime])
                if self.total + size <= MAX_TOTAL_OUTPUT * 4:
                    keep[mime] = data[mime]
                    self.total += size
                    break
        if keep:
            self.cell.append({"output_type": "display_data", "data": keep, "metadata": {}})

    def error(self, ename: str, evalue: str, traceback: list[str] | None = None):
        tb = [t[:4000] for t in (traceback or [])][-20:]
        self.cell.append({"output_type": "error", "ename": ename, "evalue": evalue[:4000], "traceback": tb})


# Modules whose every attribute (and every function's code) is guarded: nobody has a reason to change them.
STRICT = ["builtins", "math", "operator", "lorakit.checks", "lorakit.grading.runner"]
# Comparison helpers guarded in large libraries (the rest of those libraries may be changed by other libraries).
HELPERS = {
    "torch": ["allclose", "isclose", "equal", "all", "any", "testing", "is_tensor", "isfinite", "abs"],
    "torch.testing": ["assert_close", "assert_allclose"],
    "numpy": ["allclose", "isclose", "array_equal", "array_equiv", "testing", "all", "any", "abs"],
    "numpy.testing": None,   # None: every attribute
    "unittest": ["TestCase"],
}
CLASSES = {"torch": ["Tensor"]}  # Python classes whose methods are guarded


class Guard:
    """References captured before any learner code runs, verified (and restored) around every test.

    Libraries with comparison helpers (torch, numpy) are captured when they are first imported: an import
    hook records them the moment the import finishes, before the importing cell goes on."""

    def __init__(self, strict_modules: list[str]):
        self.entries: list[tuple[str, object, str, object]] = []   # (label, owner, attr, value)
        self.codes: list[tuple[str, object, tuple]] = []           # (label, function, (code, defaults, kwdefaults))
        self.modules: dict[str, object] = {}
        import types
        self._types = types
        for name in strict_modules:
            mod = sys.modules.get(name)
            if mod is None:
                continue
            self.modules[name] = mod
            for attr, value in list(vars(mod).items()):
                self.entries.append((f"{name}.{attr}", mod, attr, value))
                self._function(f"{name}.{attr}", value, types)
                if isinstance(value, type) and value.__module__ == name:
                    for a, v in list(vars(value).items()):
                        if a not in ("__dict__", "__weakref__", "__doc__"):
                            self.entries.append((f"{name}.{attr}.{a}", value, a, v))
                            self._function(f"{name}.{attr}.{a}", v, types)
        self.helpers_done: set[str] = set()
        for name in HELPERS:
            if name in sys.modules:
                self.capture(name)
        self.hook = _CaptureOnImport(self)
        sys.meta_path.insert(0, self.hook)
        self.meta_path = list(sys.meta_path)

    def capture(self, name: str) -> None:
        """Record the helpers of module `name` (just imported, or already there)."""
        mod = sys.modules.get(name)
        if mod is None or name in self.helpers_done:
            return
        self.helpers_done.add(name)
        self.modules[name] = mod
        attrs = HELPERS.get(name)
        for attr in (attrs if attrs is not None else [a for a in vars(mod) if not a.startswith("_")]):
            if attr in vars(mod):
                value = vars(mod)[attr]
                self.entries.append((f"{name}.{attr}", mod, attr, value))
                self._function(f"{name}.{attr}", value, self._types)
        for cname in CLASSES.get(name, []):
            cls = vars(mod).get(cname)
            if isinstance(cls, type):
                for a, v in list(vars(cls).items()):
                    if a not in ("__dict__", "__weakref__", "__doc__"):
                        self.entries.append((f"{name}.{cname}.{a}", cls, a, v))
        for sub in HELPERS:  # e.g. torch.testing, imported by torch itself
            if sub.startswith(name + ".") and sub in sys.modules:
                self.capture(sub)

    def _function(self, label, value, types):
        if isinstance(value, types.FunctionType):
            self.codes.append((label, value, (value.__code__, value.__defaults__, value.__kwdefaults__)))

    def verify(self) -> list[str]:
        """Put back whatever changed; return a description of each change (empty: intact)."""
        changes = []
        if self.hook not in sys.meta_path:
            changes.append("the grader's import hook was removed from sys.meta_path")
            sys.meta_path.insert(0, self.hook)
        for finder in sys.meta_path[:sys.meta_path.index(self.hook)]:
            if finder not in self.meta_path and not _library_object(finder):
                changes.append(f"an import hook defined by the notebook ({type(finder).__name__}) was installed")
                sys.meta_path.remove(finder)
        if sys.gettrace() is not None or sys.getprofile() is not None:
            changes.append("a trace or profile hook was installed (sys.settrace/sys.setprofile)")
            sys.settrace(None)
            sys.setprofile(None)
        for name, mod in self.modules.items():
            if sys.modules.get(name) is not mod:
                changes.append(f"sys.modules[{name!r}] was replaced")
                sys.modules[name] = mod
        for label, owner, attr, value in self.entries:
            d = vars(owner)
            if attr not in d or d[attr] is not value:
                changes.append(f"{label} was {'deleted' if attr not in d else 'replaced'}")
                try:
                    setattr(owner, attr, value)
                except (AttributeError, TypeError):
                    pass
        for label, fn, (code, defaults, kwdefaults) in self.codes:
            if fn.__code__ is not code or fn.__defaults__ is not defaults or fn.__kwdefaults__ is not kwdefaults:
                changes.append(f"the code of {label} was changed")
                fn.__code__, fn.__defaults__, fn.__kwdefaults__ = code, defaults, kwdefaults
        return changes


def _library_object(obj) -> bool:
    """Whether obj's class comes from an installed library (not from notebook code)."""
    mod = sys.modules.get(type(obj).__module__)
    path = getattr(mod, "__file__", None) or ""
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
    import lorakit
    roots.add(os.path.dirname(os.path.realpath(lorakit.__file__)))
    return bool(path) and any(os.path.realpath(path).startswith(r + os.sep) for r in roots)


class _CaptureOnImport:
    """A meta-path finder that lets the normal finders do the work, then captures helper modules (HELPERS)
    as soon as their import completes."""

    def __init__(self, guard: Guard):
        self.guard = guard

    def find_spec(self, name, path=None, target=None):
        if name not in HELPERS and name not in CLASSES:
            return None
        import importlib.machinery
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        loader, guard = spec.loader, self.guard

        class Loader:
            def create_module(self, s):
                return loader.create_module(s)

            def exec_module(self, module):
                module.__loader__ = loader
                loader.exec_module(module)
                guard.capture(name)

            def __getattr__(self, attr):  # resources, get_code, ...: the real loader answers
                return getattr(loader, attr)
        spec.loader = Loader()
        return spec


def _error_parts(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


def execute(spec: dict, rfd: int, wfd: int) -> int:
    """Run the merged notebook described by `spec` (see Session.spec); returns the exit code."""
    import builtins
    import importlib
    import types

    chan = Channel(rfd, wfd)
    runner_pid = os.getpid()

    def _forked():  # a copy of this process made by learner code must not speak for the grader...
        try:
            os.nice(19)  # ...nor starve it (a fork bomb's copies get what CPU the runner leaves)
        except OSError:
            pass
        for fd in (rfd, wfd):
            try:
                os.close(fd)
            except OSError:
                pass
    os.register_at_fork(after_in_child=_forked)

    for name in ["lorakit.checks", *spec.get("imports", [])]:
        try:
            importlib.import_module(name)
        except Exception:
            pass  # a test that imports something missing fails when it runs, with the real error
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.core.displaypub import DisplayPublisher
    from traitlets.config import Config

    outputs = Outputs()
    stdout = _Capped("stdout", outputs.stream)
    stderr = _Capped("stderr", outputs.stream)
    real_stdout, real_stderr = sys.stdout, sys.stderr

    class Publisher(DisplayPublisher):
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kw):
            outputs.display(dict(data))

        def clear_output(self, wait=False):
            pass

    cfg = Config()
    cfg.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=cfg)
    shell.display_pub = Publisher(shell=shell)

    def _showtraceback(etype, evalue, stb):
        outputs.error(etype.__name__ if isinstance(etype, type) else str(etype), str(evalue),
                      [shell.InteractiveTB.stb2text(stb)] if stb else [])
    shell._showtraceback = _showtraceback

    strict = STRICT + [m for m in sys.modules if m.startswith("lorakit.checks.")] + \
        [m for m in spec.get("imports", []) if m.startswith("lorakit.") and m in sys.modules]
    guard = Guard(sorted(set(strict)))
    guard_verify = guard.verify
    real_builtins = builtins
    trusted: dict = {}
    cell_timeout = float(spec["cell_timeout"])

    def _alarm(signum, frame):
        signal.setitimer(signal.ITIMER_REAL, 1.0)  # keep interrupting a cell that swallows the first one
        raise CellTimeout(f"the cell ran longer than {cell_timeout:g} s")

    os.chdir(spec["workdir"])
    for index, cell in enumerate(spec["cells"]):
        meta = cell
        if cell["kind"] not in ("code", "test") or not cell["source"].strip():
            continue
        if os.getpid() != runner_pid:  # a forked copy reached the main loop: it stops here
            os._exit(0)
        chan.send({"op": "cell", "index": index})
        outputs.start()
        tampering: list[str] = []
        passed, hidden, err = None, False, None
        sys.stdout, sys.stderr = stdout, stderr
        if meta.get("kind") == "test":
            gid = meta["grade_id"]
            sys.stdout, sys.stderr = real_stdout, real_stderr
            chan.send({"op": "test", "grade_id": gid, "index": index})
            reply = chan.recv()
            source, nonce, hidden_line = reply["source"], reply["nonce"], reply.get("hidden_line")
            tampering += guard_verify()
            g = dict(shell.user_ns)
            for name in list(g):
                if name in vars(real_builtins) and g[name] is not vars(real_builtins)[name]:
                    del g[name]  # a learner's `abs = ...` cannot change what a test means
            g.update(trusted)
            g["__builtins__"] = real_builtins
            g["__name__"] = "__main__"
            filename = f"<test {gid}>"
            before = dict(g)
            code = None
            sys.stdout, sys.stderr = stdout, stderr
            try:
                code = compile(source, filename, "exec", dont_inherit=True)
                signal.signal(signal.SIGALRM, _alarm)
                signal.setitimer(signal.ITIMER_REAL, cell_timeout)
                try:
                    exec(code, g)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                passed = True
            except BaseException as e:  # noqa: BLE001 - any exception, SystemExit and timeouts included, fails the test
                signal.setitimer(signal.ITIMER_REAL, 0)
                passed = False
                ename, evalue = _error_parts(e)
                line = None
                tb = e.__traceback__
                while tb is not None:
                    if tb.tb_frame.f_code.co_filename == filename:
                        line = tb.tb_lineno
                    tb = tb.tb_next
                hidden = bool(hidden_line and line and line > hidden_line)
                err = {"ename": ename, "evalue": evalue[:2000], "line": line}
                if hidden:
                    outputs.error(ename, "a hidden test failed", [])
                else:
                    outputs.error(ename, evalue, [])
            sys.stdout, sys.stderr = real_stdout, real_stderr
            tampering += guard_verify()
            del source, code
            for name, value in g.items():
                if name.startswith("__") and name.endswith("__"):
                    continue
                if name not in before or before[name] is not value:
                    trusted[name] = value
                    shell.user_ns[name] = value
            chan.send({"op": "result", "grade_id": gid, "nonce": nonce, "passed": bool(passed) and not tampering,
                       "error": err, "hidden": hidden, "tampering": tampering, "outputs": outputs.cell})
        else:
            signal.signal(signal.SIGALRM, _alarm)
            signal.setitimer(signal.ITIMER_REAL, cell_timeout)
            try:
                result = shell.run_cell(cell["source"], store_history=False)
            except BaseException as e:  # noqa: BLE001
                result = None
                outputs.error(*_error_parts(e))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                sys.stdout, sys.stderr = real_stdout, real_stderr
            if os.getpid() != runner_pid:
                os._exit(0)
            chan.send({"op": "output", "index": index, "outputs": outputs.cell})
    chan.send({"op": "done"})
    return 0


# ------------------------------------------------------------------------------------- in the grader

@dataclass
class TestResult:
    grade_id: str
    points: float
    max_points: float
    passed: bool
    message: str = ""        # for the learner; hidden failures say only that a hidden test failed
    hidden: bool = False
    tampering: list = field(default_factory=list)


@dataclass
class Outcome:
    status: str                       # "graded" or "failed"
    reason: str = ""                  # timeout | crashed | invalid notebook | tampering detected | resource limit | grader error
    detail: str = ""
    tests: dict = field(default_factory=dict)       # grade_id -> TestResult
    outputs: dict = field(default_factory=dict)     # cell index -> outputs
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    @property
    def score(self) -> float:
        if self.reason in ("tampering detected", "invalid notebook", "grader error"):
            return 0.0
        return float(sum(t.points for t in self.tests.values()))


class ProtocolError(Exception):
    pass


class Session:
    """Grade one merged notebook in one sandboxed process (see the module docstring)."""

    def __init__(self, key, merged, jobdir: Path, *, sandbox, cell_timeout: float, timeout: float):
        self.key, self.merged, self.jobdir = key, merged, Path(jobdir)
        self.sandbox, self.cell_timeout, self.timeout = sandbox, cell_timeout, timeout

    def run(self) -> Outcome:
        t0 = time.monotonic()
        self.jobdir.mkdir(parents=True, exist_ok=True)
        (self.jobdir / "tmp").mkdir(exist_ok=True)
        cells = [{"kind": c.metadata.get("lorakit", {}).get("kind", "markdown") if c.cell_type == "code" else "markdown",
                  "grade_id": c.metadata.get("lorakit", {}).get("grade_id"),
                  "source": c.source if c.cell_type == "code" else ""} for c in self.merged.cells]
        spec = {"cells": cells, "workdir": str(self.jobdir), "cell_timeout": self.cell_timeout,
                "imports": self.key.imports()}
        tests = [c.metadata["lorakit"]["grade_id"] for c in self.merged.cells if c.metadata.get("lorakit", {}).get("kind") == "test"]
        out = Outcome("failed", "grader error", tests={})
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        proc = None
        try:
            proc = self.sandbox.spawn(spec, self.jobdir, p2c_r, c2p_w)
            os.close(p2c_r)
            os.close(c2p_w)
            out = self._converse(proc, p2c_w, c2p_r, tests, t0)
        finally:
            for fd in (p2c_w, c2p_r):
                try:
                    os.close(fd)
                except OSError:
                    pass
            if proc is not None and proc.poll() is None:
                self.sandbox.kill(proc)
        for gid in tests:  # tests never reached score nothing, and say why
            if gid not in out.tests:
                kc = self.key.cells[gid]
                out.tests[gid] = TestResult(gid, 0.0, kc.points, False, f"not run ({out.reason or 'an earlier cell stopped the notebook'})")
        out.seconds = time.monotonic() - t0
        return out

    def _converse(self, proc, wfd: int, rfd: int, tests: list[str], t0: float) -> Outcome:
        out = Outcome("failed", "crashed")
        sel = selectors.DefaultSelector()
        sel.register(rfd, selectors.EVENT_READ)
        buf = b""
        deadline = t0 + self.timeout
        cell_deadline = None
        cell_index = None
        asked: dict[str, str] = {}      # grade_id -> nonce
        order = list(tests)
        done = False
        grace = min(GRACE, max(2.0, self.cell_timeout))

        def describe(i):
            if i is None:
                return "before the first cell"
            gid = self.merged.cells[i].metadata.get("lorakit", {}).get("grade_id")
            return f"cell {i}" + (f" ({gid})" if gid else "")

        try:
            while not done:
                now = time.monotonic()
                limit = min(deadline, cell_deadline or deadline)
                if now >= limit:
                    self.sandbox.kill(proc)
                    if now >= deadline:
                        out.reason, out.detail = "timeout", f"the submission ran longer than {self.timeout:g} s (at {describe(cell_index)})"
                    else:
                        out.reason, out.detail = "timeout", (f"{describe(cell_index)} ran longer than {self.cell_timeout:g} s "
                                                             "and did not stop when interrupted")
                    return out
                events = sel.select(timeout=min(1.0, limit - now))
                if not events:
                    continue
                chunk = os.read(rfd, 1 << 16)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_MESSAGE and b"\n" not in buf:
                    raise ProtocolError("an oversized message")
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        msg = json.loads(line)
                        op = msg["op"]
                    except (ValueError, KeyError, TypeError):
                        raise ProtocolError("a garbled message") from None
                    if op == "cell":
                        cell_index = int(msg["index"])
                        cell_deadline = time.monotonic() + self.cell_timeout + grace
                    elif op == "output":
                        out.outputs[int(msg["index"])] = list(msg.get("outputs") or [])
                    elif op == "test":
                        gid = msg.get("grade_id")
                        if not order or gid != order[0] or gid in asked:
                            raise ProtocolError(f"a request for test {gid!r} out of order")
                        order.pop(0)
                        kc = self.key.cells[gid]
                        asked[gid] = secrets.token_hex(16)
                        os.write(wfd, (json.dumps({"source": kc.source, "nonce": asked[gid],
                                                   "hidden_line": kc.hidden_line}) + "\n").encode())
                        cell_deadline = time.monotonic() + self.cell_timeout + grace
                    elif op == "result":
                        gid = msg.get("grade_id")
                        if gid not in asked or msg.get("nonce") != asked[gid] or gid in out.tests:
                            raise ProtocolError(f"a result for test {gid!r} that was not asked for")
                        out.tests[gid] = self._result(gid, msg)
                        out.outputs[int(cell_index)] = list(msg.get("outputs") or [])
                        if msg.get("tampering"):
                            out.reason = "tampering detected"
                            out.detail = "; ".join(msg["tampering"])[:1000]
                    elif op == "done":
                        done = True
                    else:
                        raise ProtocolError(f"an unknown message {op!r}")
        except ProtocolError as e:
            self.sandbox.kill(proc)
            out.reason, out.detail = "tampering detected", f"the grading process sent {e} (at {describe(cell_index)})"
            return out
        except OSError as e:
            self.sandbox.kill(proc)
            out.reason, out.detail = "crashed", f"lost contact with the grading process: {e}"
            return out
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.sandbox.kill(proc)
            code = proc.wait()
        if out.reason == "tampering detected" and out.detail:
            return out
        if done and order:
            out.reason, out.detail = "tampering detected", f"tests {order} were never run"
            return out
        if done:
            out.status, out.reason = "graded", ""
            return out
        out.reason, out.detail = self.sandbox.explain_exit(code, describe(cell_index))
        return out

    def _result(self, gid: str, msg: dict) -> TestResult:
        kc = self.key.cells[gid]
        passed = bool(msg.get("passed"))
        err = msg.get("error") or {}
        if passed:
            message = "passed"
        elif msg.get("tampering"):
            message = "tampering detected: " + "; ".join(msg["tampering"])[:500]
        elif msg.get("hidden"):
            message = f"the visible check passed but a hidden test failed ({err.get('ename', 'error')})"
        else:
            message = f"{err.get('ename', 'error')}: {err.get('evalue', '')}".strip()
            if err.get("ename") == "NotImplementedError":
                message += " (an exercise still has `raise NotImplementedError()`: replace it with your code)"
        return TestResult(gid, kc.points if passed else 0.0, kc.points, passed, message[:4000],
                          hidden=bool(msg.get("hidden")), tampering=list(msg.get("tampering") or []))
