"""What runs inside the sandbox: the learner's cells, and the probes of judged checks. Nothing here decides a
grade, and nothing secret ever reaches this process.

`execute()` runs the learner's code cells in an IPython shell, in order, with a time limit per cell, and
captures their outputs (capped). A test cell arrives as a placeholder without source: there the process says
so and answers the grader's requests until told to go on:

- "bind": names the test cell's imports would bind (`check` -> `lorakit.checks.lora`), sent as data;
- "probe": evaluate the call's argument expressions (from the instructor's test cell) in the learner's
  namespace, run the check's `probe` on them with the grader's inputs (`judged.run_probe`) and send the
  reply back as data.

Learner code can reach everything in this process (the pipes included) and may write anything to them:
the grader checks every message (protocol.py) and judges every reply itself (judge.py), on inputs drawn
from a seed this process never sees.
"""

from __future__ import annotations

import os
import signal
import sys

from lorakit.checks import judged, wire
from lorakit.grading.protocol import Channel, close_fds

MAX_CELL_OUTPUT = 64 * 1024          # characters of text kept per cell
MAX_TOTAL_OUTPUT = 1024 * 1024       # characters kept per submission


class CellTimeout(BaseException):
    """Raised in a cell that ran past its time limit (a BaseException but not a KeyboardInterrupt, so
    `except KeyboardInterrupt` in learner code does not swallow it)."""


class _Capped:
    """A text stream that keeps at most what Outputs allows (huge output cannot exhaust memory)."""

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
        for line in lines:
            self.write(line)

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
        self.cell_chars = 0
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
        for mime in ("image/png", "text/html", "text/plain"):
            if mime in data and isinstance(data[mime], str):
                size = len(data[mime])
                if self.total + size <= MAX_TOTAL_OUTPUT * 4:
                    self.total += size
                    self.cell.append({"output_type": "display_data", "data": {mime: data[mime]}, "metadata": {}})
                return

    def error(self, ename: str, evalue: str, traceback: list[str] | None = None):
        tb = [t[:4000] for t in (traceback or [])][-20:]
        self.cell.append({"output_type": "error", "ename": ename, "evalue": evalue[:4000], "traceback": tb})


def _shell(outputs: Outputs):
    """An IPython shell whose displays and tracebacks go to `outputs`."""
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

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
    return shell


def _bind(names: dict, namespace: dict) -> None:
    """Bind what a test cell's imports bind (only lorakit.checks modules and their attributes)."""
    import importlib
    for alias, target in names.items():
        if not (target == "lorakit.checks" or target.startswith("lorakit.checks.")):
            continue
        try:
            namespace[alias] = importlib.import_module(target)
        except ImportError:
            module, _, attr = target.rpartition(".")
            try:
                namespace[alias] = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError):
                pass  # a call that needs it fails with the real error


def _probe(request: dict, namespace: dict) -> str:
    """The encoded reply to one probe request: the learner's objects are the call's arguments, evaluated in
    the learner's namespace."""
    try:
        objects = [eval(compile(a, "<argument>", "eval", dont_inherit=True), namespace) for a in request["args"]]
        kw_objects = {k: eval(compile(a, "<argument>", "eval", dont_inherit=True), namespace)
                      for k, a in request["kwargs"].items()}
        check = judged.find(request["check"])
        inputs = wire.from_json(request["inputs"], where="inputs")
    except Exception as e:  # noqa: BLE001 - e.g. NameError: the exercise cell was not run
        return wire.encode({"ok": False, "error": {"type": type(e).__name__, "message": str(e)[:2000]}},
                             where="error")
    return judged.run_probe(check, inputs, objects, kw_objects)


def execute(spec: dict, rfd: int, wfd: int) -> int:
    """Run the merged notebook described by `spec` (see session.Session.spec); returns the exit code."""
    chan = Channel(rfd, wfd)
    runner_pid = os.getpid()

    def _forked():  # a copy of this process made by learner code has no business on the pipes...
        try:
            os.nice(19)  # ...and must not starve the runner (a fork bomb's copies get what CPU it leaves)
        except OSError:
            pass
        close_fds(rfd, wfd)
    os.register_at_fork(after_in_child=_forked)

    outputs = Outputs()
    stdout, stderr = _Capped("stdout", outputs.stream), _Capped("stderr", outputs.stream)
    real_stdout, real_stderr = sys.stdout, sys.stderr
    shell = _shell(outputs)
    cell_timeout = float(spec["cell_timeout"])

    def _alarm(signum, frame):
        signal.setitimer(signal.ITIMER_REAL, 1.0)  # keep interrupting a cell that swallows the first one
        raise CellTimeout(f"it ran longer than {cell_timeout:g} s")

    def timed(fn, *args):
        """fn(*args) with the cell's time limit, its output captured."""
        signal.signal(signal.SIGALRM, _alarm)
        sys.stdout, sys.stderr = stdout, stderr
        signal.setitimer(signal.ITIMER_REAL, cell_timeout)
        try:
            return fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            sys.stdout, sys.stderr = real_stdout, real_stderr

    os.chdir(spec["workdir"])
    for index, cell in enumerate(spec["cells"]):
        if cell["kind"] == "test":
            chan.send({"op": "test", "index": index})
            while True:
                request = chan.recv()
                if request["op"] == "next":
                    break
                if request["op"] == "bind":
                    _bind(request["names"], shell.user_ns)
                    continue
                outputs.start()
                try:
                    reply = timed(_probe, request, shell.user_ns)
                except BaseException as e:  # noqa: BLE001 - a timeout (or SystemExit) inside the learner's code
                    reply = wire.encode({"ok": False, "error": {"type": type(e).__name__, "message": str(e)[:2000]}},
                                          where="error")
                if os.getpid() != runner_pid:  # a copy forked inside a probe stops here
                    os._exit(0)
                chan.send({"op": "answer", "id": request["id"], "outputs": outputs.cell}, raw={"reply": reply})
            continue
        if cell["kind"] != "code" or not cell["source"].strip():
            continue
        chan.send({"op": "cell", "index": index})
        outputs.start()
        try:
            timed(shell.run_cell, cell["source"], False)
        except BaseException as e:  # noqa: BLE001 - a timeout between IPython's own handlers
            outputs.error(type(e).__name__, str(e))
        if os.getpid() != runner_pid:  # a forked copy reached the main loop: it stops here
            os._exit(0)
        chan.send({"op": "output", "index": index, "outputs": outputs.cell})
    chan.send({"op": "done"})
    return 0
