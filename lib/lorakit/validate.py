"""Reading a learner's arguments: the one place the concept modules turn a count (a rank, a batch size, a
world size) into a Python int or say clearly what is wrong with it."""

import operator

__all__ = ["whole_number"]


def whole_number(value, name: str, minimum: int = 1, meaning: str = "") -> int:
    """`value` as a Python int when it is a whole number >= `minimum` (numpy integers too, through
    `operator.index`; a bool is not a count); else a ValueError that names it, says what it is (`meaning`)
    and what was found."""
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        n = None
    if n is None or n < minimum:
        raise ValueError(f"{name}{' is ' + meaning + ' and' if meaning else ''} must be a whole number "
                         f">= {minimum}; found {value!r}")
    return n
