"""Learner-facing self-checks, one module per lesson topic (`checks.nf4` checks lesson 03).

A check either prints a short "passed" line or raises `CheckFailed` (an AssertionError, so nbgrader
counts it as a failed test) whose message says what was expected, what was found, and a hint.
"""

from __future__ import annotations

import math


class CheckFailed(AssertionError):
    """A self-check did not pass; the message is written for the learner."""


def expect(condition: bool, message: str, hint: str | None = None) -> None:
    if not condition:
        raise CheckFailed(message + (f"\nHint: {hint}" if hint else ""))


def passed(message: str) -> None:
    print(f"\u2705 {message}")


def close(found, expected, *, rel: float = 1e-6, abs_: float = 0.0) -> bool:
    """Numbers (or sequences of numbers) equal up to a relative/absolute tolerance."""
    try:
        if isinstance(expected, (list, tuple)):
            return len(found) == len(expected) and all(close(f, e, rel=rel, abs_=abs_) for f, e in zip(found, expected))
        return math.isclose(float(found), float(expected), rel_tol=rel, abs_tol=abs_)
    except (TypeError, ValueError):
        return False


def defined(name: str, namespace: dict) -> None:
    """The learner's exercise must have defined `name` (the stub raises before it is)."""
    expect(name in namespace, f"`{name}` is not defined yet.", "run the exercise cell above first (and replace `raise NotImplementedError()`).")
