"""The wire format: what crosses between the process that runs learner code and the trusted grader.

Both sides import this module and nothing else of each other's: the sandbox side (`lorakit.grading.sandboxed`,
and a check's `probe`, which runs there) encodes answers with it; the judge side (`lorakit.grading.judge`,
`session`, `protocol`) decodes them with it and trusts nothing it reads until it has been decoded here. In a
notebook a self-check makes the same round trip, so a learner sees exactly what the grader will see.

Data is: None, bool, int, float (nan and inf spelled as {"$float": "nan"}), str, lists, dicts with str keys,
and CPU tensors as raw bytes with their dtype and shape ({"$tensor": [dtype, shape, base64]}), never pickle,
within the limits below. `decode` never runs code; every limit is checked before anything is built, so a
reply cannot make the grader allocate more than MAX_DATA_BYTES of text or MAX_TENSOR_ELEMENTS per tensor.
`conforms` checks decoded data against the shape a check declares for its answer.

Nothing here is secret and nothing here decides a grade: it only says whether something is well-formed data.
"""

from __future__ import annotations

import base64
import math
import operator

from lorakit.checks import CheckFailed

MAX_DATA_BYTES = 64 * 2**20        # one encoded message (inputs or answer)
MAX_TENSOR_ELEMENTS = 16 * 2**20   # one tensor
MAX_DEPTH = 32                     # nesting of lists and dicts
MAX_TEXT = 1 * 2**20               # characters of one string
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


