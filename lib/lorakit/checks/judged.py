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

    @judged
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
come from the Rng's own generator, models the checks build get their weights from `reseed` (an explicit
generator), and building or loading a module runs in `building()`, which leaves the global generator as it
was and lets one thread build at a time (see there why). A judge that raises on an answer of the right shape
is a bug of the kit: its verdict says so (`Verdict.grader_error`), and the grader reports it to the instructor
instead of failing the learner.

In a notebook, `check.weights_gb(weights_gb)` runs the three parts in the learner's kernel with seed 0: a
self-check that explains what is wrong. `check.weights_gb(weights_gb, seed="grading")` (a test cell's
hidden part) does the same on a fresh seed. When `lorakit grade` grades a submission, the process that
runs the learner's code only ever runs `probe`: the grader draws the inputs from a seed of its own, sends
them as data, and judges the answer as data in a process that never runs learner code. Nothing here is
secret; what keeps a verdict honest is where it is computed and inputs nobody knew in advance.

Data is all that crosses between the two sides, and it is the same in a notebook (every input and answer
makes the round trip through `encode`/`decode` there too): None, bool, int, float, str, lists, dicts
with str keys, and CPU tensors (raw bytes with dtype and shape, never pickle), within size limits.

A test cell holds only imports from `lorakit.checks` and calls of judged checks (`calls()` reads them
without running anything); the grader evaluates each call's arguments in the learner's namespace.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import math
import operator
import random
import secrets
import threading
from dataclasses import dataclass, field

from . import CheckFailed, passed

MAX_DATA_BYTES = 64 * 2**20        # one encoded message (inputs or answer)
MAX_TENSOR_ELEMENTS = 16 * 2**20   # one tensor
MAX_DEPTH = 32                     # nesting of lists and dicts
MAX_TEXT = 1 * 2**20               # characters of one string
GRADING = "grading"                # seed="grading": a fresh seed (drawn by the grader when grading)
TENSOR = "$tensor"                 # the one key of an encoded tensor's dict


class DataError(ValueError):
    """Something that is not data, or data over the limits, was given where data was expected."""


# ----------------------------------------------------------------------------------------------- data

def _torch():
    import torch
    return torch


def _loaded_torch():
    """torch if something already imported it, else None: data without tensors never imports torch (the
    sandbox and the grader stay fast for checks that need none)."""
    import sys
    return sys.modules.get("torch")


DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


def to_data(obj, *, where: str = "answer", _depth: int = 0):
    """`obj` as data (see the module docstring): tensors detached and moved to the CPU, numpy arrays and
    scalars converted, tuples become lists. Anything else raises DataError naming where it was found."""
    if _depth > MAX_DEPTH:
        raise DataError(f"{where}: nested more than {MAX_DEPTH} levels deep")
    if obj is None or type(obj) in (bool, str):
        if type(obj) is str and len(obj) > MAX_TEXT:
            raise DataError(f"{where}: a string of {len(obj):,} characters (the limit is {MAX_TEXT:,})")
        return obj
    if type(obj) is float:
        return obj
    if type(obj) is int:
        return obj
    torch = _loaded_torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if str(t.dtype).removeprefix("torch.") not in DTYPES:
            raise DataError(f"{where}: a tensor of dtype {t.dtype}, which is not one of {', '.join(DTYPES)}")
        if t.numel() > MAX_TENSOR_ELEMENTS:
            raise DataError(f"{where}: a tensor of {t.numel():,} elements (the limit is {MAX_TENSOR_ELEMENTS:,})")
        return t.contiguous().clone()
    if isinstance(obj, (list, tuple)):
        return [to_data(v, where=f"{where}[{i}]", _depth=_depth + 1) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if type(k) is not str:
                raise DataError(f"{where}: a dict key {k!r} that is not a string")
            out[k] = to_data(v, where=f"{where}[{k!r}]", _depth=_depth + 1)
        return out
    module = type(obj).__module__
    if module == "numpy":
        import numpy as np
        if isinstance(obj, np.ndarray):
            return to_data(torch.from_numpy(np.ascontiguousarray(obj)), where=where, _depth=_depth)
        if isinstance(obj, np.bool_):
            return bool(obj)
        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            return float(obj)
    if isinstance(obj, bool):          # subclasses of the plain types: their plain value
        return bool(obj)
    if isinstance(obj, int):
        return operator.index(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, str):
        return to_data(str.__str__(obj), where=where, _depth=_depth)
    raise DataError(f"{where}: a {type(obj).__name__}, which is not data (numbers, strings, lists, dicts "
                    "with str keys, tensors)")


def _encodable(data):
    torch = _loaded_torch()
    if torch is not None and isinstance(data, torch.Tensor):
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
        return {TENSOR: [str(data.dtype).removeprefix("torch."), list(data.shape), base64.b64encode(raw).decode()]}
    if isinstance(data, list):
        return [_encodable(v) for v in data]
    if isinstance(data, dict):
        return {k: _encodable(v) for k, v in data.items()}
    if type(data) is float and not math.isfinite(data):
        return {"$float": repr(data)}
    return data


def encode(obj, *, where: str = "answer") -> str:
    """`obj` (converted with `to_data`) as one line of JSON."""
    import json
    text = json.dumps(_encodable(to_data(obj, where=where)), allow_nan=False, separators=(",", ":"))
    if len(text) > MAX_DATA_BYTES:
        raise DataError(f"{where}: {len(text):,} bytes once encoded (the limit is {MAX_DATA_BYTES:,})")
    return text


def decode(text: str | bytes, *, where: str = "answer"):
    """The data in `text`, checked: only JSON's plain types and well-formed tensors, within the limits.
    Raises DataError with the reason; never runs code and never unpickles."""
    return from_json(loads(text, where=where, limit=MAX_DATA_BYTES), where=where)


def _bare_constant(c):
    raise ValueError(f"bare {c}")


def loads(text: str | bytes, *, where: str = "answer", limit: int = MAX_DATA_BYTES):
    """Plain JSON (no bare NaN or Infinity), at most `limit` bytes; DataError otherwise."""
    import json
    if len(text) > limit:
        raise DataError(f"{where}: {len(text):,} bytes (the limit is {limit:,})")
    try:
        return json.loads(text, parse_constant=_bare_constant)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{where}: not valid data ({type(e).__name__}: {str(e)[:200]})") from None


def from_json(raw, *, where: str = "answer"):
    """Data from parsed JSON (`loads`): tensors rebuilt from their bytes, every limit checked."""
    return _decoded(raw, where, 0)


def _decoded(raw, where: str, depth: int):
    if depth > MAX_DEPTH:
        raise DataError(f"{where}: nested more than {MAX_DEPTH} levels deep")
    if isinstance(raw, list):
        return [_decoded(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(raw)]
    if isinstance(raw, dict):
        if set(raw) == {TENSOR}:
            return _tensor(raw[TENSOR], where)
        if set(raw) == {"$float"}:
            if raw["$float"] not in ("nan", "inf", "-inf"):
                raise DataError(f"{where}: {raw['$float']!r} is not nan, inf or -inf")
            return float(raw["$float"])
        return {k: _decoded(v, f"{where}[{k!r}]", depth + 1) for k, v in raw.items()}
    if isinstance(raw, str) and len(raw) > MAX_TEXT:
        raise DataError(f"{where}: a string of {len(raw):,} characters (the limit is {MAX_TEXT:,})")
    return raw


def _tensor(spec, where: str):
    torch = _torch()
    if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str) and isinstance(spec[1], list)
            and isinstance(spec[2], str)):
        raise DataError(f"{where}: a malformed tensor (expected [dtype, shape, base64 bytes])")
    dtype_name, shape, payload = spec
    if dtype_name not in DTYPES:
        raise DataError(f"{where}: tensor dtype {dtype_name!r} is not one of {', '.join(DTYPES)}")
    if len(shape) > MAX_DEPTH or not all(type(d) is int and d >= 0 for d in shape):
        raise DataError(f"{where}: tensor shape {shape!r} is not a list of non-negative integers")
    numel = math.prod(shape)
    if numel > MAX_TENSOR_ELEMENTS:
        raise DataError(f"{where}: a tensor of {numel:,} elements (the limit is {MAX_TENSOR_ELEMENTS:,})")
    dtype = getattr(torch, dtype_name)
    try:
        raw = base64.b64decode(payload, validate=True)
    except ValueError:
        raise DataError(f"{where}: tensor bytes are not valid base64") from None
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != numel * itemsize:
        raise DataError(f"{where}: {len(raw):,} bytes for a {dtype_name} tensor of shape {tuple(shape)} "
                        f"(expected {numel * itemsize:,})")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    if dtype == torch.bool and bool((t.view(torch.uint8) > 1).any()):
        raise DataError(f"{where}: a bool tensor with bytes other than 0 and 1")
    return t


# -------------------------------------------------------------------------------------- answer shapes

def conforms(data, spec, where: str = "answer") -> None:
    """Check `data` against `spec`, raising CheckFailed that says what is wrong. A spec is a type (bool,
    int, float, str, list, dict, Tensor, object for any data), None, a tuple of specs (any of them), a
    one-element list [spec] (a list of those), or a dict {key: spec} (those keys, each conforming)."""
    torch = _loaded_torch()
    if isinstance(spec, tuple):
        errors = []
        for s in spec:
            try:
                return conforms(data, s, where)
            except CheckFailed as e:
                errors.append(str(e))
        raise CheckFailed(errors[0] if len(errors) == 1 else f"{where} has none of the expected forms: " + "; ".join(errors))
    if spec is None:
        if data is not None:
            raise CheckFailed(f"{where} should be None; found {_kind(data)}.")
        return
    if isinstance(spec, list):
        if not isinstance(data, list):
            raise CheckFailed(f"{where} should be a list; found {_kind(data)}.")
        for i, v in enumerate(data):
            conforms(v, spec[0], f"{where}[{i}]")
        return
    if isinstance(spec, dict):
        if not isinstance(data, dict):
            raise CheckFailed(f"{where} should be a dict; found {_kind(data)}.")
        missing = [k for k in spec if k not in data]
        if missing:
            raise CheckFailed(f"{where} is missing {', '.join(map(repr, missing))}.")
        for k, s in spec.items():
            conforms(data[k], s, f"{where}[{k!r}]")
        return
    if spec is object:
        return
    ok = {bool: lambda d: type(d) is bool,
          int: lambda d: type(d) is int,
          float: lambda d: type(d) in (int, float),
          str: lambda d: type(d) is str,
          list: lambda d: type(d) is list,
          dict: lambda d: type(d) is dict}.get(spec)
    is_tensor = torch is not None and spec is torch.Tensor
    if is_tensor:
        ok = lambda d: isinstance(d, torch.Tensor)  # noqa: E731
    if ok is None:
        raise TypeError(f"not an answer spec: {spec!r}")
    if not ok(data):
        name = "tensor" if is_tensor else spec.__name__
        raise CheckFailed(f"{where} should be a {name}; found {_kind(data)}.")


def _kind(data) -> str:
    torch = _loaded_torch()
    if torch is not None and isinstance(data, torch.Tensor):
        return f"a {str(data.dtype).removeprefix('torch.')} tensor of shape {tuple(data.shape)}"
    return "None" if data is None else f"a {type(data).__name__} ({str(data)[:60]})"


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


@contextlib.contextmanager
def building():
    """The scope in which a check builds or loads torch modules (its own layers and models, the kit's
    references). Two things make building process-wide, and judges of several submissions run in threads:

    - torch's layers draw their first weights from the global generator. The scope leaves that generator as
      it found it (a notebook's random numbers are the same with or without a check), and every value a check
      keeps is overwritten from an explicit Generator (`reseed`) or a drawn tensor.
    - transformers turns steps of model building off for every thread while it loads a model
      (`from_pretrained`): a small Llama with tied embeddings built meanwhile in another thread came out with
      its lm_head untied, so other weights and other logits. So builds and loads take turns: one lock for the
      process (re-entrant: builds nest).
    """
    with _BUILDING, _torch().random.fork_rng(devices=[]):
        yield


_BUILDING = threading.RLock()


def reseed(module, seed: int):
    """`module` (returned) with every floating-point parameter drawn again from a torch Generator seeded with
    `seed`, in `named_parameters()` order: a matrix N(0, 1 / fan_in) (activations stay near unit scale, so
    comparisons of outputs mean something), a vector 1 + N(0, 0.01) (norm scales). The same weights in every
    process and thread, whatever the global generator holds."""
    torch = _torch()
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for _, p in module.named_parameters():
            if p.is_floating_point():
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
                p.copy_(noise / math.sqrt(p.shape[-1]) if p.dim() > 1 else 1 + 0.1 * noise)
    return module


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


def judged(cls) -> Check:
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


# ------------------------------------------------------------------------------------ test-cell sources

@dataclass
class Call:
    """One judged-check call of a test cell, read from its source without running it."""
    check: str                    # "lorakit.checks.lora.lora_linear"
    args: list[str]               # source of each positional argument (evaluated where learner code runs)
    kwargs: dict[str, str]        # name -> source
    seed: object                  # the literal seed: an int, or "grading"
    line: int                     # 1-based line in the cell


def aliases(source: str) -> dict[str, str]:
    """Names bound to lorakit.checks modules by the import statements in `source`."""
    out = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                (node.module == "lorakit.checks" or node.module.startswith("lorakit.checks.")):
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lorakit.checks.") and a.asname:
                    out[a.asname] = a.name
    return out


def calls(source: str, known: dict[str, str] | None = None) -> list[Call]:
    """The judged-check calls of a test cell, in order. `known`: aliases bound earlier in the notebook
    (`aliases()` of the instructor's cells); imports in the cell itself are added. Raises ValueError, naming
    the line, for anything else in the cell: a test cell only imports checks and calls them."""
    tree = ast.parse(source)
    names = dict(known or {})
    names.update(aliases(source))
    out = []
    for stmt in tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)) and all(
                (a.asname or a.name) in names for a in stmt.names):
            continue
        if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)):
            raise ValueError(f"line {stmt.lineno}: a test cell may only import lorakit.checks modules and call "
                             f"judged checks; found {ast.unparse(stmt)[:80]!r}")
        call = stmt.value
        func = call.func
        if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in names):
            raise ValueError(f"line {stmt.lineno}: {ast.unparse(func)!r} is not a check of an imported "
                             "lorakit.checks module")
        seed, kwargs = 0, {}
        for kw in call.keywords:
            if kw.arg is None:
                raise ValueError(f"line {stmt.lineno}: **kwargs cannot be read without running the cell")
            if kw.arg == "seed":
                try:
                    seed = ast.literal_eval(kw.value)
                except ValueError:
                    raise ValueError(f"line {stmt.lineno}: seed must be a literal (an int or \"{GRADING}\")") from None
                if seed != GRADING:
                    draw_seed(seed)
            else:
                kwargs[kw.arg] = ast.unparse(kw.value)
        if any(isinstance(a, ast.Starred) for a in call.args):
            raise ValueError(f"line {stmt.lineno}: *args cannot be read without running the cell")
        out.append(Call(f"{names[func.value.id]}.{func.attr}", [ast.unparse(a) for a in call.args], kwargs, seed,
                        stmt.lineno))
    return out
