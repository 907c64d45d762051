"""The judge: the grader's side of a test cell. It runs only in the trusted process, which never runs learner
code.

A test cell of the answer key holds calls of judged checks (`lorakit.checks.judged`), read from the
instructor's source without running it. For each call the judge draws the inputs: a visible call with its
literal seed (so the learner's feedback matches what the notebook showed), a `seed="grading"` call with a
fresh secret seed. The request sent to the sandbox names the check, the call's argument expressions and the
inputs, as data; the reply that comes back is judged here, by the check's own `judge`, against the kit's
reference on the same inputs. A test cell's points are earned when every call in it passes.

A judge that raises on a reply of the right shape is a bug of the kit, not the learner's mistake: its call is
a grader error (`CallResult.grader_error`), the cell earns nothing until the kit is fixed and the submission
graded again, and the submission's status says so (`grader_errors`) while its other cells keep their results.
Judges of several submissions run in threads of this process. A check's draw and judge use no global state
(see lorakit.checks.judged; tests/test_fair_grades.py judges every check from eight threads at once), but the
libraries under them are not all thread-safe: transformers 5 resolves its names lazily, and two threads that
resolve one at the same moment can get "cannot import name 'LlamaConfig' from 'transformers'" (measured here:
four lesson 02 submissions at --workers 4; the race is vllm-project/vllm#40442). So drawing and judging take
turns in this process (`_TURN`): it is the grader's time, short beside running the notebooks, which stay
parallel in their sandboxes, and none of it is counted against a submission's time limit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from lorakit.checks import judged, wire
from lorakit.grading import testcells


@dataclass
class Planned:
    """One call of a test cell, with its inputs drawn."""
    call: testcells.Call
    check: judged.Check
    inputs: dict
    encoded: str                        # the inputs as sent (judged's wire format)

    @property
    def hidden(self) -> bool:
        return self.call.seed == judged.GRADING

    def request(self, id_: int) -> tuple[dict, dict]:
        """The probe request (protocol.py), as (message, raw fields)."""
        return ({"op": "probe", "id": id_, "check": self.call.check, "args": self.call.args,
                 "kwargs": self.call.kwargs}, {"inputs": self.encoded})


@dataclass
class CallResult:
    check: str                          # "setup.weights_gb"
    hidden: bool                        # inputs drawn at grading time
    passed: bool
    message: str                        # the judge's message for the learner
    grader_error: bool = False          # the judge raised on a reply of the right shape: the kit's bug

    @property
    def line(self) -> str:
        mark = "\u2705" if self.passed else "\u26a0\ufe0f grader error," if self.grader_error else "\u274c"
        where = " (inputs drawn when graded)" if self.hidden else ""
        return f"{mark} {self.check}{where}: {self.message}"


@dataclass
class TestResult:
    grade_id: str
    points: float
    max_points: float
    passed: bool
    message: str = ""                   # one line per call, or why the cell was not judged
    calls: list = field(default_factory=list)

    @property
    def grader_error(self) -> bool:
        return any(c.grader_error for c in self.calls)


def plan(calls: list[testcells.Call]) -> list[Planned]:
    """Draw the inputs of every call (visible: the literal seed; hidden: a fresh secret one)."""
    out = []
    with _TURN:
        for call in calls:
            check = judged.find(call.check)
            inputs = check.inputs(judged.draw_seed(call.seed), grading=call.seed == judged.GRADING)
            out.append(Planned(call, check, inputs, wire.encode(inputs, where=f"{call.check}: inputs")))
    return out


def judge(planned: Planned, reply) -> CallResult:
    """The verdict on one reply: decoded data (protocol.reply), or the wire.DataError it raised."""
    name = planned.call.check.removeprefix("lorakit.checks.")
    if isinstance(reply, wire.DataError):
        return CallResult(name, planned.hidden, False, f"the answer could not be read: {reply}")
    with _TURN:
        verdict = planned.check.verdict(planned.inputs, reply)
    return CallResult(name, planned.hidden, verdict.passed, verdict.message, verdict.grader_error)


_TURN = threading.Lock()   # one draw or judge at a time in this process (see the module docstring)


def cell_result(grade_id: str, points: float, results: list[CallResult], expected: int) -> TestResult:
    """A test cell's result: its points when all `expected` calls were judged and passed."""
    passed = len(results) == expected and all(r.passed for r in results)
    message = "\n".join(r.line for r in results)
    if len(results) < expected:
        message += ("\n" if message else "") + f"{expected - len(results)} check(s) of this cell were not judged"
    return TestResult(grade_id, points if passed else 0.0, points, passed, message, results)


def grader_errors(results) -> list[str]:
    """'grade_id: check' for every call of the TestResults `results` whose judge raised (the kit's bugs)."""
    return [f"{t.grade_id}: {c.check}" for t in results for c in t.calls if c.grader_error]


def not_run(grade_id: str, points: float, why: str) -> TestResult:
    return TestResult(grade_id, 0.0, points, False, f"not run ({why})")
