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


def yours_or_kit(yours, kit, exercise: str):
    """A callable for a cell that shows a learner's function (or class) at work right after its exercise: it calls
    `yours`, and while that raises NotImplementedError (the stub of an exercise not done yet) it calls the kit's
    reference `kit` instead, saying so the first time. Run All then reaches the end of a lesson whose exercises are
    still open, and the cell shows the learner's own result as soon as the exercise is done. With `kit=None` nothing
    stands in and the call returns None: for a number the lesson must not make up, such as a score a later test
    checks. Any other error of `yours` is the learner's to see: it is raised."""
    if kit is None:
        instead = "gives None until it is"
    else:
        name, module = getattr(kit, "__qualname__", ""), getattr(kit, "__module__", "__main__")
        if name and "<" not in name:  # a named function: lorakit's, or one defined in the notebook
            name = name if module == "__main__" else f"{module}.{name}"
        instead = "uses " + (f"`{name}`" if name and "<" not in name else "the kit's reference") + " instead"
    noted = []

    def call(*args, **kwargs):
        try:
            return yours(*args, **kwargs)
        except NotImplementedError:
            if not noted:
                noted.append(True)
                print(f"({exercise} is not done yet: this cell {instead}. Run it again once yours works.)")
            return None if kit is None else kit(*args, **kwargs)

    return call
