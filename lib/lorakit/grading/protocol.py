"""What the grader and the sandbox say to each other: one JSON object per line, each way, over a pair of pipes.

Both sides use this module; neither trusts what it reads. The grader's side (session.py) checks every
message from the sandbox against the schema below before using any of it, and a probe's reply is data in
the wire format of `lorakit.checks.wire` (tensors as raw bytes with dtype and shape, never pickle),
decoded with its limits. Nothing here is secret: the learner can read this file, and can write anything
to these pipes; what keeps a grade honest is that the verdict is decided on the grader's side.

The grader sends                                the sandbox sends
                                                 {"op": "cell", "index": i}            starting cell i
                                                 {"op": "output", "index": i, "outputs": [...]}
                                                 {"op": "test", "index": i}            at test cell i, waiting
  {"op": "bind", "names": {alias: module}}        (the test cell's imports, as data: no source is sent)
  {"op": "probe", "id": n, "check": name,
   "args": [expr], "kwargs": {k: expr},
   "inputs": data}                               {"op": "answer", "id": n, "reply": data, "outputs": [...]}
  {"op": "next"}                                  (goes on with the next cell)
                                                 {"op": "done"}
"""

from __future__ import annotations

import json
import os
import re

from lorakit.checks import wire

MAX_MESSAGE = wire.MAX_DATA_BYTES + 4 * 2**20   # bytes of one line: a reply plus its captured outputs
MAX_OUTPUT_TEXT = 64 * 1024                        # characters of one output's text kept by the grader
MAX_OUTPUTS = 200                                  # outputs kept per cell
OUTPUT_MIMES = ("image/png", "text/html", "text/plain")
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]*")


def close_fds(*fds: int) -> None:
    """Close the given pipe ends; one that is closed already is passed over."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class ProtocolError(Exception):
    """A message that breaks the protocol: the conversation cannot go on (the submission fails, saying why)."""


# ---------------------------------------------------------------------------------------------- framing

def frame(msg: dict, raw: dict | None = None) -> bytes:
    """One line: `msg` as JSON, with `raw` (field -> text that is already JSON, e.g. an encoded reply)
    spliced in without parsing it again."""
    text = json.dumps(msg, separators=(",", ":"), allow_nan=False)
    if raw:
        text = text[:-1] + "".join(f",{json.dumps(k)}:{v}" for k, v in raw.items()) + "}"
    return (text + "\n").encode()


class Lines:
    """Splits what arrives on a pipe into lines, refusing a line longer than MAX_MESSAGE (without ever
    holding more than that, or copying a long line more than once)."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.size = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        lines = []
        while True:
            i = chunk.find(b"\n")
            if i < 0:
                self.parts.append(chunk)
                self.size += len(chunk)
                if self.size > MAX_MESSAGE:
                    raise ProtocolError(f"a message longer than {MAX_MESSAGE:,} bytes")
                return lines
            if self.size + i > MAX_MESSAGE:
                raise ProtocolError(f"a message longer than {MAX_MESSAGE:,} bytes")
            lines.append(b"".join([*self.parts, chunk[:i]]))
            self.parts, self.size = [], 0
            chunk = chunk[i + 1:]


class Channel:
    """The sandbox's end: blocking reads and writes of whole messages."""

    def __init__(self, rfd: int, wfd: int):
        self.rfd, self.wfd = rfd, wfd
        self.lines = Lines()
        self.pending: list[bytes] = []

    def send(self, msg: dict, raw: dict | None = None) -> None:
        data = memoryview(frame(msg, raw))
        while data:
            data = data[os.write(self.wfd, data):]

    def recv(self) -> dict:
        while not self.pending:
            chunk = os.read(self.rfd, 1 << 16)
            if not chunk:
                raise EOFError("the grader closed the channel")
            self.pending += self.lines.feed(chunk)
        return json.loads(self.pending.pop(0))


# ------------------------------------------------------------------------- the grader reads the sandbox

def parse(line: bytes) -> dict:
    """A message from the sandbox, checked against the schema; raises ProtocolError saying what is wrong.
    An answer's "reply" is left as parsed JSON: `reply()` decodes it (a bad reply fails one check, not the
    conversation)."""
    try:
        msg = wire.loads(line.decode("utf-8"), where="a message", limit=MAX_MESSAGE)
    except UnicodeDecodeError:
        raise ProtocolError("a message that is not UTF-8 text") from None
    except wire.DataError as e:
        raise ProtocolError(f"a message that is not JSON ({e})") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError("a message without an op")
    op = msg["op"]
    fields = SCHEMA.get(op)
    if fields is None:
        raise ProtocolError(f"an unknown message {op[:40]!r}")
    extra = set(msg) - set(fields) - {"op"}
    if extra:
        raise ProtocolError(f"a {op!r} message with unexpected fields {sorted(extra)[:5]}")
    for name, kind in fields.items():
        if name not in msg:
            raise ProtocolError(f"a {op!r} message without {name!r}")
        if kind is int and not (type(msg[name]) is int and 0 <= msg[name] < 2**31):
            raise ProtocolError(f"a {op!r} message whose {name!r} is not a small non-negative integer")
        if kind is list:
            msg[name] = outputs(msg[name])
    return msg


SCHEMA = {
    "cell": {"index": int},
    "output": {"index": int, "outputs": list},
    "test": {"index": int},
    "answer": {"id": int, "reply": object, "outputs": list},
    "done": {},
}


def reply(msg: dict):
    """The decoded reply of an answer message; wire.DataError (with the reason) when it is not data."""
    return wire.from_json(msg["reply"], where="the reply")


def outputs(raw) -> list[dict]:
    """Cell outputs from the sandbox, rebuilt field by field: only streams, display data with plain types
    and errors, texts cut to MAX_OUTPUT_TEXT. Anything else is dropped, never rendered."""
    if not isinstance(raw, list):
        raise ProtocolError("outputs that are not a list")
    out = []
    for o in raw[:MAX_OUTPUTS]:
        if not isinstance(o, dict):
            continue
        kind = o.get("output_type")
        if kind == "stream" and o.get("name") in ("stdout", "stderr") and isinstance(o.get("text"), str):
            out.append({"output_type": "stream", "name": o["name"], "text": o["text"][:MAX_OUTPUT_TEXT]})
        elif kind == "display_data" and isinstance(o.get("data"), dict):
            data = {m: v for m, v in o["data"].items() if m in OUTPUT_MIMES and isinstance(v, str)}
            data = {m: v if m == "image/png" else v[:MAX_OUTPUT_TEXT] for m, v in data.items()
                    if m != "image/png" or _BASE64.fullmatch(v)}   # a "PNG" is spliced into an <img> tag
            if data:
                out.append({"output_type": "display_data", "data": data, "metadata": {}})
        elif kind == "error":
            tb = o.get("traceback")
            out.append({"output_type": "error", "ename": str(o.get("ename", ""))[:200],
                        "evalue": str(o.get("evalue", ""))[:4000],
                        "traceback": [str(t)[:4000] for t in tb[:20]] if isinstance(tb, list) else []})
    return out
