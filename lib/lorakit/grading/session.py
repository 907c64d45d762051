"""The conversation with one sandboxed process: the grader's side of grading one submission.

`Session.run()` starts the sandbox (sandbox.py) on the merged notebook, with the test cells as placeholders
that carry no source, and then reads what the sandbox says (protocol.py). When it reaches a test cell, the
session sends the names the cell's imports bind, then one probe request per call of the instructor's cell
(judge.py draws the inputs), judges each reply as it arrives, and tells the sandbox to go on. It enforces
the per-cell and per-submission deadlines (time spent judging is not the learner's) and turns whatever
happens (a normal end, a timeout, a crash, a resource limit, a message that breaks the protocol) into an
explicit `Outcome`. Tests judged before something went wrong keep their result.
"""

from __future__ import annotations

import os
import select
import selectors
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.checks import wire
from lorakit.grading import judge, protocol
from lorakit.grading.protocol import ProtocolError

GRACE = 10.0                         # seconds a cell may run past its limit before the process is killed


@dataclass
class Outcome:
    status: str                       # "graded", "failed", or "grader error" (a judge broke: the kit's bug)
    reason: str = ""                  # timeout | crashed | resource limit | protocol error | invalid notebook | grader error
    detail: str = ""
    tests: dict = field(default_factory=dict)       # grade_id -> judge.TestResult
    outputs: dict = field(default_factory=dict)     # cell index -> outputs
    seconds: float = 0.0
    notes: list = field(default_factory=list)       # what merging changed (submission.merge)
    flags: list = field(default_factory=list)       # what the instructor should look at (reference_use.py)

    @property
    def score(self) -> float:
        return float(sum(t.points for t in self.tests.values()))

    def score_the_rest(self, cells, why: str) -> "Outcome":
        """The zero-score rule, in one place: every test cell of `cells` ((grade_id, points) pairs) that has no
        result scores nothing, and says why (`judge.not_run`). Returns this outcome."""
        for gid, points in cells:
            if gid not in self.tests:
                self.tests[gid] = judge.not_run(gid, points, why)
        return self


class _Stopped(Exception):
    """The conversation ended early: (reason, detail)."""


class Session:
    """Grade one merged notebook in one sandboxed process (see the module docstring)."""

    def __init__(self, key, merged, jobdir: Path, *, sandbox, cell_timeout: float, timeout: float):
        self.key, self.merged, self.jobdir = key, merged, Path(jobdir)
        self.sandbox, self.cell_timeout, self.timeout = sandbox, cell_timeout, timeout
        self.grace = min(GRACE, max(2.0, cell_timeout))

    def spec(self) -> dict:
        """What the sandbox gets: code cells with their source, test cells as bare placeholders."""
        cells = []
        for c in self.merged.cells:
            kind = c.metadata.get("lorakit", {}).get("kind", "markdown") if c.cell_type == "code" else "markdown"
            cells.append({"kind": kind, "source": c.source if kind == "code" else ""})
        return {"cells": cells, "workdir": str(self.jobdir), "cell_timeout": self.cell_timeout}

    def run(self) -> Outcome:
        t0 = time.monotonic()
        self.jobdir.mkdir(parents=True, exist_ok=True)
        (self.jobdir / "tmp").mkdir(exist_ok=True)
        self.tests = [(i, c.metadata["lorakit"]["grade_id"]) for i, c in enumerate(self.merged.cells)
                      if c.metadata.get("lorakit", {}).get("kind") == "test"]
        out = Outcome("failed", "grader error")
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        proc = None
        try:
            proc = self.sandbox.spawn(self.spec(), self.jobdir, p2c_r, c2p_w)
            os.close(p2c_r)
            os.close(c2p_w)
            out = self._converse(proc, p2c_w, c2p_r, t0)
        finally:
            protocol.close_fds(p2c_w, c2p_r)
            if proc is not None and proc.poll() is None:
                self.sandbox.kill(proc)
            over = self.sandbox.finish(proc, proc.returncode) if proc is not None else None
        if over and out.reason != "resource limit":   # a budget of the whole submission: it fails, saying which
            out.status, (out.reason, out.detail) = "failed", over
        out.score_the_rest([(gid, self.key.cells[gid].points) for _, gid in self.tests],
                           out.reason or "an earlier cell stopped the notebook")
        errors = judge.grader_errors(out.tests.values())
        if errors and out.status == "graded":   # the kit's bug: said as such, the other cells' results kept
            out.status, out.reason = "grader error", "grader error"
            out.detail = (f"the judge of {', '.join(errors)} raised on an answer of the right shape (a bug of the "
                          "course kit, not the learner's); the other checks are graded; grade again once it is fixed")
        out.seconds = time.monotonic() - t0
        return out

    # ------------------------------------------------------------------------------------- the talk

    def _converse(self, proc, wfd: int, rfd: int, t0: float) -> Outcome:
        out = Outcome("failed", "crashed")
        self.out, self.proc, self.wfd = out, proc, wfd
        self.sel = selectors.DefaultSelector()
        self.sel.register(rfd, selectors.EVENT_READ)
        self.rfd, self.lines, self.queue = rfd, protocol.Lines(), []
        os.set_blocking(wfd, False)
        self.deadline = t0 + self.timeout
        self.cell_deadline = None
        self.where = "before the first cell"
        last_cell, next_test = -1, 0
        try:
            while True:
                msg = self._read(self.deadline)
                if msg is None:
                    break
                op = msg["op"]
                if op in ("cell", "output", "test"):
                    i = msg["index"]
                    if i >= len(self.merged.cells) or i < last_cell or (op == "cell" and i == last_cell):
                        raise ProtocolError(f"a {op!r} message for cell {i}, out of order")
                if op == "cell":
                    last_cell = msg["index"]
                    self.where = self._describe(last_cell)
                    self.cell_deadline = time.monotonic() + self.cell_timeout + self.grace
                elif op == "output":
                    if msg["index"] != last_cell:
                        raise ProtocolError(f"outputs for cell {msg['index']}, which is not running")
                    out.outputs[last_cell] = msg["outputs"]
                    self.cell_deadline = None
                elif op == "test":
                    if next_test >= len(self.tests) or self.tests[next_test][0] != msg["index"]:
                        raise ProtocolError(f"a request to run test cell {msg['index']}, out of order")
                    last_cell, gid = self.tests[next_test]
                    next_test += 1
                    self.where = self._describe(last_cell)
                    self._test(last_cell, gid)
                elif op == "answer":
                    raise ProtocolError(f"an answer to request {msg['id']}, which was not asked for")
                elif op == "done":
                    if next_test < len(self.tests):
                        raise ProtocolError(f"'done' before test cell(s) {[g for _, g in self.tests[next_test:]]} ran")
                    out.status, out.reason = "graded", ""
                    break
        except (ProtocolError, _Stopped, OSError) as e:
            self.sandbox.kill(proc)
            if isinstance(e, ProtocolError):
                out.reason, out.detail = "protocol error", f"the grading process sent {e} (at {self.where})"
            elif isinstance(e, _Stopped):
                out.reason, out.detail = e.args
            else:
                out.reason, out.detail = "crashed", f"lost contact with the grading process: {e}"
            return out
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.sandbox.kill(proc)
            code = proc.wait()
        if out.status != "graded":
            out.reason, out.detail = self.sandbox.explain_exit(code, self.where, self.jobdir)
        return out

    def _test(self, index: int, gid: str) -> None:
        """Probe and judge every call of test cell `gid` (at cell `index`), then let the sandbox go on."""
        kc = self.key.cells[gid]
        self.out.outputs[index] = []
        self._send({"op": "bind", "names": kc.names})
        t = time.monotonic()
        planned = judge.plan(kc.calls)
        self.deadline += time.monotonic() - t
        results = []
        for n, p in enumerate(planned):
            self._send(*p.request(n))
            self.cell_deadline = time.monotonic() + self.cell_timeout + self.grace
            msg = self._read(self.deadline)
            if msg is None:
                raise _Stopped(*self.sandbox.explain_exit(self.proc.wait(), self.where, self.jobdir))
            if msg["op"] != "answer" or msg["id"] != n:
                what = f"an answer to request {msg['id']}" if msg["op"] == "answer" else f"a {msg['op']!r} message"
                raise ProtocolError(f"{what} while request {n} was waiting")
            self.cell_deadline = None
            self.out.outputs[index] += msg["outputs"]
            try:
                reply = protocol.reply(msg)
            except wire.DataError as e:
                reply = e
            t = time.monotonic()
            results.append(judge.judge(p, reply))
            self.deadline += time.monotonic() - t   # judging is the grader's time, not the learner's
            self.out.tests[gid] = judge.cell_result(gid, kc.points, results, len(planned))
        self.out.tests[gid] = judge.cell_result(gid, kc.points, results, len(planned))
        self._send({"op": "next"})

    def _send(self, msg: dict, raw: dict | None = None) -> None:
        data = memoryview(protocol.frame(msg, raw))
        while data:  # a sandbox that stops reading must not block the grader (the pipe is non-blocking)
            _, ready, _ = select.select([], [self.wfd], [], max(0.0, self.deadline - time.monotonic()))
            if not ready:
                raise _Stopped("timeout", f"the grading process stopped reading requests (at {self.where})")
            try:
                data = data[os.write(self.wfd, data[:65536]):]
            except BlockingIOError:
                continue

    def _read(self, deadline: float) -> dict | None:
        """The next message (schema-checked), or None when the sandbox closed its end."""
        while not self.queue:
            now = time.monotonic()
            limit = min(deadline, self.cell_deadline or deadline)
            if now >= limit:
                if now >= self.deadline:
                    raise _Stopped("timeout", f"the submission ran longer than {self.timeout:g} s (at {self.where})")
                raise _Stopped("timeout", f"{self.where} ran longer than {self.cell_timeout:g} s and did not stop "
                                          "when interrupted")
            if not self.sel.select(timeout=min(1.0, limit - now)):
                continue
            chunk = os.read(self.rfd, 1 << 16)
            if not chunk:
                return None
            self.queue += self.lines.feed(chunk)
        return protocol.parse(self.queue.pop(0))

    def _describe(self, i: int) -> str:
        gid = self.merged.cells[i].metadata.get("lorakit", {}).get("grade_id")
        return f"cell {i}" + (f" ({gid})" if gid else "")
