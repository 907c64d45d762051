"""Flags for the instructor: does a submission's own code lean on lorakit instead of answering the exercise?

The kit is installed where the learner's code runs (later lessons build on earlier lessons' references), so
an answer can simply call lorakit's own implementation of the exercise, and it computes the right answer on
any input the grader draws. The policy: such a submission is graded like any other, but flagged: a
`flags` column in grades.csv, a line at the top of the feedback, the notebook flagged in the gradebook.
Whether it earns the points is the instructor's call (some courses allow it for a lesson already passed).

The submission's source is read, never run, in the grader's process. Only the learner's own code is read:
cells that differ from every code cell of the lesson as released (an exercise's answer, a cell the learner
added or changed). What is flagged:

- reference: a use of an object a check names in its `reference` (`from lorakit.lora import LoRALinear`,
  `nf4.quantize_nf4(...)` with `nf4` bound to lorakit.nf4 anywhere in the notebook, `from lorakit.nf4 import *`),
  in the cell of the exercise that check grades, or in any cell the learner added;
- grader: a use of `lorakit.grading` or `lorakit.checks.judged` (nothing a lesson needs), or an
  assignment to an attribute of a lorakit module (`lorakit.checks.setup.expect = ...`);
- introspection: looking through the running process (gc's object lists, stack frames, other threads'
  frames, trace hooks), the tools of the attacks an in-process grader could not stop;
- dynamic code: exec, eval, compile, __import__, importlib: code the grader cannot read.

Limits: this reads source, so an answer that reaches the reference through data built at run time (a
getattr with a computed name on an object lorakit returned) or that copies the reference's source text into
the notebook is not flagged; dynamic code is flagged as such, not as a reference. A check without a
`reference` has nothing to flag for its exercise.
"""

from __future__ import annotations

import ast

from ..checks import judged

INTERNALS = ("lorakit.grading", "lorakit.checks.judged")
PROCESS = {"gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames", "sys._getframe",
           "sys.settrace", "sys.setprofile", "threading.settrace", "inspect.stack", "inspect.currentframe"}
FRAME_ATTRIBUTES = {"f_locals", "f_globals", "f_back", "tb_frame", "gi_frame", "cr_frame"}
DYNAMIC = {"exec", "eval", "compile", "__import__", "importlib.import_module"}


def references(key) -> dict[str | None, set[str]]:
    """exercise grade_id -> what the checks of its test cells (the ones that follow it) name as reference
    answers; None -> all of them (for cells that are no exercise: the learner's own)."""
    out: dict[str | None, set[str]] = {None: set()}
    exercise = None
    for gid in key.order:
        kc = key.cells.get(gid)
        if kc is None:
            continue
        if kc.kind == "solution":
            exercise = gid
            out.setdefault(gid, set())
        elif kc.kind == "test":
            for call in kc.calls:
                refs = set(judged.find(call.check).reference)
                out[None] |= refs
                if exercise is not None:
                    out[exercise] |= refs
    return out


def _python(source: str) -> ast.Module | None:
    """The cell as Python (IPython's magics and shell escapes turned into calls first), or None."""
    from IPython.core.inputtransformer2 import TransformerManager
    try:
        return ast.parse(TransformerManager().transform_cell(source))
    except (SyntaxError, ValueError):
        return None


def _bindings(tree: ast.Module, names: dict[str, str]) -> None:
    """Add the names bound by the imports in `tree` ("ref" -> "lorakit.nf4", "g" -> "gc.get_objects")."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            for a in node.names:
                if a.name != "*":
                    names[a.asname or a.name] = f"{node.module}.{a.name}"


def _dotted(node, names: dict[str, str]) -> str | None:
    """`a.b.c` resolved through `names` ("nf4.quantize_nf4" -> "lorakit.nf4.quantize_nf4"), or None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([names.get(node.id, node.id), *reversed(parts)])


def _hits(dotted: str, targets) -> list[str]:
    return [t for t in targets if dotted == t or dotted.startswith(t + ".")]


def _learner_cells(nb, key):
    """(where, syntax tree) of the learner's own code cells, and the names all code cells bind."""
    from .submission import cell_id
    trees, names = [], {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        tree = _python(cell.source)
        if tree is None:
            continue
        _bindings(tree, names)
        gid = cell_id(cell)
        if cell.source.strip() in key.instructor or (gid in key.cells and key.cells[gid].kind == "test"):
            continue
        trees.append((gid or f"cell {i}", gid if gid in key.cells else None, tree))
    return trees, names


def flags(nb, key) -> list[str]:
    """Why the instructor should look at this submission (see the module docstring); empty when nothing."""
    by_exercise = references(key)
    trees, names = _learner_cells(nb, key)
    out: list[str] = []

    def flag(text):
        if text not in out:
            out.append(text)

    for where, gid, tree in trees:
        # an exercise's cell may use the references of other exercises (the lesson's own answers do: the
        # NF4 table in dequantize_nf4); any other cell of the learner's may use none
        refs = by_exercise.get(gid, by_exercise[None])
        for node in ast.walk(tree):
            used = []                                  # dotted names this node uses
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                for a in node.names:
                    if a.name == "*":
                        used += [r for r in refs if r.startswith(node.module + ".")] + [node.module]
                    else:
                        used.append(f"{node.module}.{a.name}")
            elif isinstance(node, ast.Import):
                used += [a.name for a in node.names]
            elif isinstance(node, (ast.Attribute, ast.Name)):
                used.append(_dotted(node, names))
                target = used[-1] if isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)) else ""
                if target and (target == "lorakit" or target.startswith("lorakit.")):
                    flag(f"{where}: changes lorakit's own code ({target})")
                if isinstance(node, ast.Attribute) and node.attr in FRAME_ATTRIBUTES:
                    flag(f"{where}: looks through the running process (.{node.attr}: stack frames)")
            for dotted in filter(None, used):
                for r in _hits(dotted, refs):
                    flag(f"{where}: uses lorakit's reference {r}, the answer of an exercise")
                for t in _hits(dotted, INTERNALS):
                    flag(f"{where}: uses the grader's own code ({t})")
                if dotted in PROCESS:
                    flag(f"{where}: looks through the running process ({dotted}: gc, frames or threads)")
                if dotted in DYNAMIC:
                    flag(f"{where}: runs code the grader cannot read ({dotted})")
    return out
