"""Test cells, read without running them: the grader's side of "a test cell only calls judged checks".

The instructor's test cells (hidden part included) never leave the grader's process. `calls()` reads one as a
list of `Call`s (which check, the source of each argument, the literal seed); the judge draws the inputs of
each call (judge.py) and the sandbox is sent only the call's argument expressions, evaluated there in the
learner's namespace. A test cell that holds anything else cannot be graded, and the error names the line.
Trusted: only the instructor's source, read with `ast`; nothing here runs code.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from lorakit.checks.judged import GRADING, draw_seed


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
