"""Judged checks: a check whose verdict does not depend on the process that ran the learner's code.

Anything inside a Python process can be reached by code running in it (the garbage collector's object
list, stack frames, other threads), and the kit's checks are installed with the kit, so every learner can
read them. A check that must survive that learner has three parts, kept side by side in
`lorakit.checks.<topic>`:

    draw(rng)                 -> inputs    data drawn from a seeded generator
    probe(inputs, *objects)   -> answer    calls the learner's objects on the inputs; returns data
    judge(inputs, answer)     -> message   recomputes with the kit's reference on the same inputs and
                                           compares; raises CheckFailed with a message for the learner

written as a class whose body holds the three functions and the answer's shape:

    @judged_check
    class weights_gb:
        '''Size of the weights in GB for a parameter count and a dtype.'''
        answer = {"sizes": [float]}

        def draw(rng):
            return {"cases": [[rng.integer(1, 10**11), rng.choice(DTYPES)] for _ in range(4)]}

        def probe(inputs, fn):
            return {"sizes": [fn(n, dtype) for n, dtype in inputs["cases"]]}

        def judge(inputs, answer):
            ...                                   # expect(...) like any check
            return "the passed message"

Optional in the class body: `reference`, the kit's objects that answer the exercise (a submission whose
own code uses one is graded but flagged, see lorakit.grading.reference_use), and `reported`, the answer's
items that only the probe can observe ({key: why}: a warning was raised, a file was saved, which names a
module has). Every other item is *behaviour*: a value the learner's objects computed on the drawn inputs,
which the judge recomputes with the kit's reference and compares. A reported item is checked (its message
helps the learner) but never earns points on its own: every test cell also judges behaviour, and a probe
that only reports what it was expected to report scores nothing. `draw` can read `rng.grading` (True for
seed="grading") to draw other inputs for a hidden call (larger shapes, more cases), never to change what is
asked: a visible call of the same check enforces the same requirements with the same thresholds.

A verdict depends on the work and the drawn inputs only. Judges of several submissions run in threads of one
process, so nothing in `draw` or `judge` may use torch's global generator (shared by every thread): tensors
come from the Rng's own generator, models the checks build get their weights from `lorakit.models.reseed` (an
explicit generator; `lorakit.models.seeded_llama` builds a whole Llama so), and building or loading a module runs
in `lorakit.models.building()`, which leaves the global generator as it was and lets one thread build at a time
(see there why). A judge that raises on an answer of the right shape
is a bug of the kit: its verdict says so (`Verdict.grader_error`), and the grader reports it to the instructor
instead of failing the learner.

In a notebook, `check.weights_gb(weights_gb)` runs the three parts in the learner's kernel with seed 0: a
self-check that explains what is wrong. `check.weights_gb(weights_gb, seed="grading")` (a test cell's
hidden part) does the same on a fresh seed. When `lorakit grade` grades a submission, the process that
runs the learner's code only ever runs `probe`: the grader draws the inputs from a seed of its own, sends
them as data, and judges the answer as data in a process that never runs learner code. Nothing here is
secret; what keeps a verdict honest is where it is computed and inputs nobody knew in advance.

Data is all that crosses between the two sides, and it is the same in a notebook (every input and answer
makes the round trip through `lorakit.checks.wire` there too): None, bool, int, float, str, lists, dicts
with str keys, and CPU tensors (raw bytes with dtype and shape, never pickle), within size limits.

A test cell holds only imports from `lorakit.checks` and calls of judged checks; the grader reads them without
running anything (`lorakit.grading.testcells`) and evaluates each call's arguments in the learner's namespace.
"""

from __future__ import annotations

import operator
import random
import secrets
from dataclasses import dataclass, field

from lorakit.checks import CheckFailed, expect, passed
from lorakit.checks.wire import DataError, conforms, decode, encode, to_data

GRADING = "grading"                # seed="grading": a fresh seed (drawn by the grader when grading)


def _torch():
    import torch
    return torch


# ----------------------------------------------------------------------------------------------- seeds

class Rng:
    """The seeded source of a check's inputs: Python's `random` for choices, a torch Generator for tensors.
    `grading` is True when the seed was drawn for seed="grading" (a hidden call): a check may draw other
    inputs there (larger, more of them), never other thresholds."""

    def __init__(self, seed: int, grading: bool = False):
        self.seed = int(seed)
        self.grading = bool(grading)
        self.random = random.Random(self.seed)
        self._torch = None

    @property
    def torch(self):
        """The torch Generator (made on first use: checks without tensors never import torch)."""
        if self._torch is None:
            self._torch = _torch().Generator().manual_seed(self.seed)
        return self._torch

    def integer(self, low: int, high: int) -> int:
        """A whole number in [low, high] (both included)."""
        return self.random.randint(low, high)

    def uniform(self, low: float, high: float) -> float:
        return self.random.uniform(low, high)

    def choice(self, seq):
        return self.random.choice(list(seq))

    def sample(self, seq, k: int) -> list:
        return self.random.sample(list(seq), k)

    def new_seed(self) -> int:
        """A seed for something the probe builds itself (a model's initial weights, say)."""
        return self.random.randrange(2**31)

    def randn(self, *shape, dtype=None):
        t = _torch().randn(*shape, generator=self.torch)
        return t if dtype is None else t.to(dtype)

    def rand(self, *shape):
        return _torch().rand(*shape, generator=self.torch)

    def randint(self, low: int, high: int, shape):
        """A tensor of whole numbers in [low, high)."""
        return _torch().randint(low, high, tuple(shape), generator=self.torch)


def draw_seed(seed) -> int:
    """The seed a call asked for: an int as given, "grading" a fresh one from the OS."""
    if seed == GRADING:
        return secrets.randbelow(2**31)
    try:
        return operator.index(seed)
    except TypeError:
        raise TypeError(f'seed should be an integer or "{GRADING}"; found {seed!r}') from None


# --------------------------------------------------------------------------------------------- a check

@dataclass
class Verdict:
    passed: bool
    message: str                # for the learner: the passed line, or what is wrong and a hint
    grader_error: bool = False  # the judge itself broke on an answer of the right shape: a bug of the kit


class GraderError(RuntimeError):
    """A check's judge raised on an answer of the right shape: the kit's bug, not the learner's mistake."""


@dataclass
class Check:
    """A judged check (see the module docstring). Call it in a notebook to check yourself."""
    name: str                     # "module.attribute", how the grader and the sandbox find it
    draw: object
    probe: object
    judge: object
    answer: object = field(default=dict)
    doc: str = ""
    reference: tuple = ()         # lorakit objects that answer the exercise ("lorakit.lora.LoRALinear"):
                                  # a submission whose own code uses one is graded but flagged
    reported: dict = field(default_factory=dict)   # answer key -> why only the probe can observe it

    def __call__(self, *objects, seed=0, **kw_objects) -> None:
        """Draw, probe the learner's objects, judge; print the passed message or raise CheckFailed (GraderError
        when the judge itself broke)."""
        inputs = self.inputs(draw_seed(seed), grading=seed == GRADING)
        reply = run_probe(self, decode(encode(inputs, where="inputs"), where="inputs"), objects, kw_objects)
        verdict = self.verdict(inputs, decode(reply, where="reply"))
        if verdict.grader_error:
            raise GraderError(verdict.message)
        if not verdict.passed:
            raise CheckFailed(verdict.message)
        passed(verdict.message)

    def inputs(self, seed: int, grading: bool = False) -> dict:
        """The inputs for `seed`, as data (what is sent to the probe)."""
        return decode(encode(self.draw(Rng(seed, grading)), where=f"{self.name}: inputs"), where="inputs")

    def verdict(self, inputs: dict, reply) -> Verdict:
        """Judge a probe's reply (decoded data, as `run_probe` builds it). Never raises: a reply of the wrong
        shape is the learner's failed check; an answer of the right shape that breaks the judge is a grader
        error (the kit's bug), said as such."""
        try:
            conforms(reply, {"ok": bool}, "the reply")
            if not reply["ok"]:
                conforms(reply, {"error": {"type": str, "message": str}}, "the reply")
                return Verdict(False, _explain_error(reply["error"]["type"], reply["error"]["message"]))
            conforms(reply, {"answer": dict}, "the reply")
            conforms(reply["answer"], self.answer, "the answer")
        except CheckFailed as e:
            return Verdict(False, str(e))
        try:
            message = self.judge(inputs, reply["answer"])
        except CheckFailed as e:
            return Verdict(False, str(e))
        except Exception as e:  # noqa: BLE001 - the judge broke on conforming data: the kit's bug, not the learner's
            return Verdict(False, f"the grader could not judge this answer: {self.name}'s judge raised "
                                  f"{type(e).__name__}: {str(e)[:300]}. This is a bug of the course kit, not a "
                                  "mistake of yours; the instructor is told.", grader_error=True)
        return Verdict(True, str(message or f"{self.name} passed"))


def _explain_error(etype: str, message: str) -> str:
    if etype == "DataError":
        return f"the answer could not be sent to the grader: {message}"
    if etype == "CheckFailed":  # the probe itself saw what is wrong (not callable, not a pair, ...)
        return message
    if etype == "CellTimeout":
        return f"your code did not finish: {message}"
    text = f"your code raised {etype}: {message}".rstrip(": ")
    if etype == "NotImplementedError":
        text += " (an exercise still has `raise NotImplementedError()`: replace it with your code)"
    elif etype == "NameError":
        text += " (run the exercise cell above first)"
    return text


def data_or_repr(obj, limit: int = 200):
    """`obj` as data when it is data, else its repr (cut to `limit` characters): what a probe returns for a
    value the learner produced, so that a wrong kind of answer is judged ("found '<Fraction 1/2>'") instead
    of failing to be sent."""
    try:
        return to_data(obj)
    except DataError:
        try:
            return repr(obj)[:limit]
        except Exception:  # noqa: BLE001 - a repr that raises is the learner's
            return f"<a {type(obj).__name__} whose repr() fails>"


def expect_callable(obj, name: str, what: str = "a function or class") -> None:
    """What a probe asks first of the learner's object: that it can be called (the exercise cell was run)."""
    expect(callable(obj), f"`{name}` should be {what}; found {type(obj).__name__}.", "run the exercise cell above first.")


def as_tensor(x, what: str = "the result"):
    """A tensor the learner's objects computed, as data for the answer: detached, on the CPU, and copied (later
    in-place changes by the learner's code cannot alter what was sent). Anything else fails, naming `what`."""
    torch = _torch()
    expect(isinstance(x, torch.Tensor), f"{what} should be a torch.Tensor; found {type(x).__name__}.")
    return x.detach().to("cpu").clone()


def run_probe(check: Check, inputs: dict, objects=(), kw_objects=None) -> str:
    """Run `check.probe` on the learner's objects; the encoded reply. This is the only part of a check that
    runs where learner code runs. An exception from the learner's code becomes an error reply."""
    try:
        answer = check.probe(inputs, *objects, **(kw_objects or {}))
        if not isinstance(answer, dict):
            raise DataError(f"the probe of {check.name} returned {type(answer).__name__}, not a dict")
        return encode({"ok": True, "answer": answer}, where="answer")
    except Exception as e:  # noqa: BLE001 - the learner's exception, reported as data
        return encode({"ok": False, "error": {"type": type(e).__name__, "message": str(e)[:2000]}}, where="error")


def judged_check(cls) -> Check:
    """Class decorator: the class body's `draw`, `probe`, `judge` and `answer` become a Check named
    after the class (see the module docstring)."""
    body = vars(cls)
    missing = [k for k in ("draw", "probe", "judge") if not callable(body.get(k))]
    if missing:
        raise TypeError(f"judged check {cls.__name__} needs {', '.join(missing)}")
    reference = body.get("reference", ())
    reported = dict(body.get("reported", {}))
    answer = body.get("answer", dict)
    unknown = sorted(set(reported) - set(answer if isinstance(answer, dict) else ()))
    if unknown or not all(isinstance(why, str) and why for why in reported.values()):
        raise TypeError(f"judged check {cls.__name__}: `reported` names keys of `answer`, each with why only the "
                        f"probe can observe it (unknown: {unknown})")
    doc = (cls.__doc__ or "").strip()
    if isinstance(answer, dict):   # the docstring says which items are which
        recomputed = [k for k in answer if k not in reported]
        doc += ("\n\nRecomputed by the judge from the drawn inputs: " + (", ".join(recomputed) or "nothing") + ".")
        if reported:
            doc += "\nReported by the probe, checked but earning nothing on their own: " + \
                "; ".join(f"{k} ({why})" for k, why in reported.items()) + "."
    return Check(f"{cls.__module__}.{cls.__qualname__}", body["draw"], body["probe"], body["judge"], answer, doc,
                 (reference,) if isinstance(reference, str) else tuple(reference), reported)


def find(name: str) -> Check:
    """The check called `name` ("lorakit.checks.setup.weights_gb"); only lorakit.checks modules qualify."""
    import importlib
    module, _, attr = name.rpartition(".")
    if not (module == "lorakit.checks" or module.startswith("lorakit.checks.")):
        raise LookupError(f"{name!r} is not in lorakit.checks")
    obj = getattr(importlib.import_module(module), attr, None)
    if not isinstance(obj, Check):
        raise LookupError(f"{name!r} is not a judged check")
    return obj
