"""Flags for the instructor: does a submission's own code lean on lorakit (or a library oracle) instead of answering?

Where it can, the grader withholds the graded lesson's answers from the sandbox (withheld.py): the code is not
there to call. What the lesson itself needs cannot be withheld, and neither can the libraries a check compares
with (bitsandbytes in lesson 03); for those, and as a second line everywhere, the submission is graded as
usual but flagged: a `flags` column in grades.csv, a line at the top of the feedback, the notebook flagged in
the gradebook. Whether it earns the points is the instructor's call.

The flagger reads what the grader runs: the submission merged over the key (submission.merge), in the
grader's process, never running it. It fails closed: what it cannot read is flagged, never skipped.

- reference: names are resolved per cell, statement by statement, in execution order, by what they are bound
  to at that point (an import, an alias `f = nf4.quantize_nf4`, a learner's function that reaches a reference
  through other names of the learner's). A reference of exercise X (what X's checks declare, plus the library
  oracles in ORACLES) may not be reached by X's cell, nor by any binding of a name X's test cells probe
  (wherever it stands), nor by a cell of the learner's that is no exercise. Another exercise of the same
  lesson may use it (the lesson's own answers do: the NF4 table in quantize_nf4);
- copied: a function or class bound to a probed name whose normalised tokens are close to the reference of
  that exercise (winnowed fingerprints, as plagiarism detectors do), with the similarity;
- unreadable: a cell that does not parse, a cell magic, a line magic other than %matplotlib, any use of
  get_ipython() (run_cell, input or AST transformers), importlib in any form, __import__, exec/eval/compile,
  getattr/setattr/hasattr with a computed name, vars/globals/locals/__dict__, sys.modules, code objects;
- placement: a cell that repeats the grade id of an earlier cell, an instructor's cell away from its place;
- grader and process: a use of lorakit.grading or lorakit.checks.judged/wire, an assignment to an attribute
  of a lorakit module, and looking through the running process (gc, frames, threads, trace hooks).
"""

from __future__ import annotations

import ast
import difflib
import io
import keyword
import tokenize

from lorakit.checks import judged
from lorakit.grading import withheld

INTERNALS = ("lorakit.grading", "lorakit.checks.judged", "lorakit.checks.wire")
PROCESS = {"gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames", "sys._getframe",
           "sys.settrace", "sys.setprofile", "threading.settrace", "inspect.stack", "inspect.currentframe",
           "inspect.getsource", "inspect.getsourcelines"}
FRAME_ATTRIBUTES = {"f_locals", "f_globals", "f_back", "tb_frame", "gi_frame", "cr_frame", "__globals__",
                    "__code__", "__closure__", "__dict__", "__builtins__", "__loader__", "__spec__"}
DYNAMIC = ("exec", "eval", "compile", "__import__", "importlib", "runpy", "pkgutil", "marshal", "pickle",
           "types.CodeType", "types.FunctionType", "types.ModuleType", "vars", "globals", "locals", "sys.modules",
           "builtins.__import__", "get_ipython", "ctypes", "zipimport")
NAMED = ("getattr", "setattr", "delattr", "hasattr")          # flagged when the name is not a literal
SAFE_MAGICS = {"matplotlib"}
# Libraries a check compares with (its oracle) that answer the exercise: declared here, flagged like references.
ORACLES = {
    "lorakit.checks.nf4.quantize": ("bitsandbytes.functional.quantize_4bit", "bitsandbytes.functional.quantize_nf4"),
    "lorakit.checks.nf4.dequantize": ("bitsandbytes.functional.dequantize_4bit", "bitsandbytes.functional.dequantize_nf4"),
    "lorakit.checks.nf4.double_quant": ("bitsandbytes.functional.quantize_4bit", "bitsandbytes.functional.quantize_blockwise"),
    "lorakit.checks.qlora.matmul_nf4": ("bitsandbytes.matmul_4bit", "bitsandbytes.functional.dequantize_4bit"),
    "lorakit.checks.qlora.nf4_linear": ("bitsandbytes.nn.Linear4bit", "bitsandbytes.nn.Params4bit"),
    "lorakit.checks.qlora.qlora_linear": ("bitsandbytes.nn.Linear4bit", "peft.tuners.lora"),
    "lorakit.checks.lora.lora_linear": ("peft.tuners.lora",),
}
# The kit's objects a check compares with but does not name as its `reference` (yet): declared here.
KIT_ANSWERS = {
}


def declared(check: str) -> tuple[str, ...]:
    """What answers the exercise a check grades: its `reference`, then the kit objects and library oracles
    declared here for it."""
    found = judged.find(check).reference
    return tuple(dict.fromkeys([*found, *KIT_ANSWERS.get(check, ()), *ORACLES.get(check, ())]))


SIMILAR = 0.9            # share of a learner definition's fingerprints found in the reference's: flagged at or above
K, W = 7, 4              # winnowing: k-grams of normalised tokens, window of w k-grams


# ------------------------------------------------------------------------------------- the lesson's answers

def references(key) -> dict[str | None, set[str]]:
    """exercise grade_id -> its answers: what the checks of its test cells (the ones that follow it) name as
    reference, and their library oracles; None -> all of them."""
    out: dict[str | None, set[str]] = {None: set()}
    out |= {gid: set() for gid in key.order if gid in key.cells and key.cells[gid].kind == "solution"}
    for exercise, _, kc in key.tests_by_exercise():
        for call in kc.calls:
            refs = set(declared(call.check))
            out[None] |= refs
            if exercise is not None:
                out[exercise] |= refs
    return out


def probed(key) -> dict[str, str]:
    """Names the test cells hand to checks (`quantize_nf4`, `LoRALinear`) -> the exercise they belong to."""
    out = {}
    for exercise, _, kc in key.tests_by_exercise():
        if exercise is None:
            continue
        for call in kc.calls:
            for src in [*call.args, *call.kwargs.values()]:
                for n in ast.walk(ast.parse(src, mode="eval")):
                    if isinstance(n, ast.Name):
                        out.setdefault(n.id, exercise)
    return out


# ---------------------------------------------------------------------------------------- reading cells

def parse_cell(source: str) -> ast.Module | None:
    """The cell as Python (IPython's magics and shell escapes turned into calls first), or None."""
    from IPython.core.inputtransformer2 import TransformerManager
    try:
        return ast.parse(TransformerManager().transform_cell(source))
    except (SyntaxError, ValueError):
        return None


def _dotted(node, names: dict[str, str]) -> str | None:
    """`a.b.c` resolved through `names` ("nf4.quantize_nf4" -> "lorakit.nf4.quantize_nf4"); getattr(x, "lit")
    reads as x.lit."""
    parts = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            parts.append(node.args[1].value)
            node = node.args[0]
        else:
            break
    if not isinstance(node, ast.Name):
        return None
    return ".".join([names.get(node.id, node.id), *reversed(parts)])


def _bound(stmt) -> list[str]:
    """Names a top-level statement binds."""
    out = []
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    for n in ast.walk(stmt):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.append(n.id)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            out += [(a.asname or a.name.split(".")[0]) for a in n.names if a.name != "*"]
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n is not stmt:
            out.append(n.name)
    return out


def _imports(stmt, names: dict[str, str], star_refs) -> list[str]:
    """Apply the imports in `stmt` to `names`; the dotted names they use."""
    used = []
    for n in ast.walk(stmt):
        if isinstance(n, ast.Import):
            for a in n.names:
                used.append(a.name)
                if a.asname:
                    names[a.asname] = a.name
                else:
                    names[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(n, ast.ImportFrom):
            module = "." * n.level + (n.module or "")
            for a in n.names:
                if a.name == "*":
                    used += [r for r in star_refs if r.startswith(module + ".")] + [module]
                else:
                    used.append(f"{module}.{a.name}")
                    names[a.asname or a.name] = f"{module}.{a.name}"
    return used


# ------------------------------------------------------------------------------------------- similarity

class _Canonical(ast.NodeTransformer):
    """A normal form that rewording does not change: no docstrings, no statements that do nothing (a bare
    constant, pass, a name assigned to a name: names are all alike once normalised), and the operands of +
    and * in a fixed order."""

    def visit_BinOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = sorted([node.left, node.right], key=ast.dump)
            node.left, node.right = a, b
        return node

    def generic_visit(self, node):
        super().generic_visit(node)
        for field in ("body", "orelse", "finalbody"):
            stmts = getattr(node, field, None)
            if isinstance(stmts, list) and stmts and isinstance(stmts[0], ast.stmt):
                kept = [s for s in stmts if not isinstance(s, ast.Pass)
                        and not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
                        and not (isinstance(s, ast.Assign) and isinstance(s.value, ast.Name)   # x = y: with names
                                 and all(isinstance(t, ast.Name) for t in s.targets))]     # normalised, a no-op
                setattr(node, field, kept or [ast.Pass()])
        return node


def _canonical(source: str) -> str:
    try:
        return ast.unparse(_Canonical().visit(ast.parse(source)))
    except (SyntaxError, ValueError, RecursionError):
        return source


def _tokens(source: str) -> list[str]:
    """Python tokens of the canonical form (`_Canonical`) normalised: names -> V (keywords kept), numbers -> N,
    strings -> S; comments and layout dropped. Renaming variables, rewording comments, swapping the operands
    of + and *, or padding with statements that do nothing changes nothing here."""
    source = _canonical(source)
    out, prev = [], None
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            kind, text = tok.type, tok.string
            if kind in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                        tokenize.ENCODING, tokenize.ENDMARKER):
                prev = kind if kind in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT) else prev
                continue
            if kind == tokenize.STRING and prev in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, None):
                prev = kind
                continue                                  # a docstring or a bare string statement
            prev = kind
            if kind == tokenize.NAME:
                out.append(text if keyword.iskeyword(text) or text in ("self", "torch", "math") else "V")
            elif kind == tokenize.NUMBER:
                out.append("N")
            elif kind == tokenize.STRING:
                out.append("S")
            else:
                out.append(text)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return out


def fingerprints(source: str, k: int = K, w: int = W) -> set[int]:
    """Winnowing (Schleimer, Wilkerson and Aiken 2003): the minimum hash of every window of `w` consecutive
    k-grams of the normalised tokens."""
    import hashlib
    toks = _tokens(source)
    grams = [int.from_bytes(hashlib.blake2b(" ".join(toks[i:i + k]).encode(), digest_size=8).digest(), "big")
             for i in range(max(0, len(toks) - k + 1))]
    if len(grams) <= w:
        return set(grams)
    return {min(grams[i:i + w]) for i in range(len(grams) - w + 1)}


def similarity(source: str, reference: str, given: str = "") -> float:
    """Share of `source`'s fingerprints that `reference` has too, leaving out those of `given` (the code the
    lesson hands out in the exercise cell, which every answer shares); 0 when too little is left to tell."""
    mine = fingerprints(source) - fingerprints(given)
    if len(mine) < 8:
        return 0.0
    return len(mine & fingerprints(reference)) / len(mine)


def reference_source(dotted: str) -> str | None:
    """The kit's source of a reference object (a function, class or constant of a lorakit module)."""
    import importlib
    import inspect
    module, _, name = dotted.rpartition(".")
    if not dotted.startswith("lorakit."):
        return None
    try:
        obj = getattr(importlib.import_module(module), name)
        return inspect.getsource(obj)
    except (ImportError, AttributeError, TypeError, OSError):
        return None


# ----------------------------------------------------------------------------------------------- flags

def _instructor_cells(code, key) -> set[int]:
    """Indices of the merged notebook's code cells that are the instructor's, at their place: the longest
    common run of the release's code cells and the submission's, graded cells counting by their id (a cell of
    the lesson moved elsewhere, or repeated, is not in it)."""
    from lorakit.grading.submission import ANCHOR
    mine = []
    for i, c in code:
        meta = c.metadata["lorakit"]
        if meta.get("injected"):
            continue
        mine.append((i, ANCHOR + meta["grade_id"] if meta.get("grade_id") else c.source.strip()))
    sm = difflib.SequenceMatcher(a=[s for _, s in mine], b=key.instructor_order, autojunk=False)
    out = set()
    for block in sm.get_matching_blocks():
        out |= {mine[block.a + j][0] for j in range(block.size) if not mine[block.a + j][1].startswith(ANCHOR)}
    return out


def flags(nb, key) -> list[str]:
    """Why the instructor should look at this submission (see the module docstring); empty when nothing."""
    from lorakit.grading.submission import cell_id, merge
    merged = merge(nb, key).notebook
    answers = references(key)
    lesson_refs = answers[None]
    probe_names = probed(key)
    out: list[str] = []

    def flag(text):
        if text not in out:
            out.append(text)

    seen_ids: dict[str, int] = {}
    for i, cell in enumerate(nb.cells):
        gid = cell_id(cell)
        if gid:
            if gid in seen_ids:
                flag(f"cell {i}: repeats the id {gid} of cell {seen_ids[gid]} (it runs as code of your own)")
            seen_ids.setdefault(gid, i)

    code = [(i, c) for i, c in enumerate(merged.cells) if c.cell_type == "code"]
    plain = [(i, c) for i, c in code if c.metadata["lorakit"].get("kind") == "code"
             and not c.metadata["lorakit"].get("injected") and not c.metadata["lorakit"].get("grade_id")]
    instructor = _instructor_cells(code, key)
    for i, c in plain:
        if i not in instructor and c.source.strip() in key.instructor:
            flag(f"cell {i}: a cell of the lesson away from its place (or repeated): read as your own code")

    lesson_names = _lesson_names(key)
    names: dict[str, str] = {}
    reached: dict[str, set[str]] = {}        # a name bound by the learner -> the answers its value reaches
    for i, cell in code:
        meta = cell.metadata["lorakit"]
        trusted = meta.get("kind") == "test" or meta.get("injected") or i in instructor
        gid = meta.get("grade_id") if meta.get("grade_id") in key.cells else None
        where = gid or f"cell {i}"
        tree = parse_cell(cell.source)
        if tree is None:
            if not trusted:
                flag(f"{where}: cannot be read as Python (it is run all the same), so it is not checked")
            continue
        for stmt in tree.body:
            used = _imports(stmt, names, lesson_refs)
            learner_names = set()
            for node in ast.walk(stmt):
                if isinstance(node, (ast.Attribute, ast.Name)) or (isinstance(node, ast.Call) and _dotted(node, names)):
                    d = _dotted(node, names)
                    if d:
                        used.append(d)
                    if isinstance(node, ast.Name) and node.id in reached:
                        learner_names.add(node.id)
            used = [withheld.canonical(d) for d in used]          # re-exports lead to the object itself
            hit = {r for d in used for r in lesson_refs if d == r or d.startswith(r + ".")}
            if not trusted:
                for d in used:
                    if _checks_internal(d) and d not in lesson_names:
                        flag(f"{where}: uses the checks' own code ({d}), not a check")
            hit |= {r for n in learner_names for r in reached[n]}
            bound = _bound(stmt)
            if not trusted:
                forbidden = set(lesson_refs) if gid is None or key.cells[gid].kind != "solution" else set(answers.get(gid, ()))
                for n in bound:
                    if n in probe_names:
                        forbidden |= answers.get(probe_names[n], set())
                for r in sorted(hit & forbidden):
                    flag(f"{where}: uses {'lorakit' if r.startswith('lorakit.') else 'the library'}'s reference "
                         f"{r}, the answer of an exercise")
                _grader_and_process(stmt, names, where, flag)
                _copied(stmt, probe_names, answers, key, where, flag)
            for n in bound:
                value = stmt.value if isinstance(stmt, ast.Assign) and len(bound) == 1 else None
                alias = _dotted(value, names) if value is not None else None
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    pass
                elif alias:
                    names[n] = alias
                else:
                    names.pop(n, None)
                if hit and not trusted:   # the instructor's values computed with a reference are data to use
                    reached[n] = set(hit)
                else:
                    reached.pop(n, None)
        if not trusted:
            _unreadable(cell.source, tree, names, where, flag)
    return out


def _lesson_names(key) -> set[str]:
    """Dotted names the lesson's own cells use (what a lesson hands out is no secret)."""
    names: dict[str, str] = {}
    out = set()
    for source in [*key.instructor_order, *(c.source for c in key.cells.values())]:
        tree = parse_cell(source)
        if tree is None:
            continue
        out.update(_imports(tree, names, ()))
        out.update(d for n in ast.walk(tree) if isinstance(n, (ast.Name, ast.Attribute)) for d in [_dotted(n, names)] if d)
    return out


def _checks_internal(dotted: str) -> bool:
    """A name inside a lesson's check module that is not one of its checks (a helper, a reference table)."""
    parts = dotted.split(".")
    if len(parts) < 4 or parts[:2] != ["lorakit", "checks"] or parts[2] in ("judged", "wire"):
        return False
    try:
        import importlib
        module = importlib.import_module(".".join(parts[:3]))
    except ImportError:
        return False
    obj = getattr(module, parts[3], None)
    return obj is not None and not isinstance(obj, judged.Check) and parts[3] not in ("CheckFailed", "expect",
                                                                                         "passed", "close", "defined")


def _unreadable(source: str, tree, names, where: str, flag) -> None:
    first = source.lstrip().split("\n", 1)[0]
    if first.startswith("%%"):
        flag(f"{where}: a cell magic ({first.split()[0]}) runs code the grader does not read")
    safe = set()          # get_ipython() calls that only run a harmless line magic (%matplotlib inline)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _is_ipython(node.func.value):
            magic = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
            if node.func.attr == "run_line_magic" and magic in SAFE_MAGICS:
                safe.add(id(node.func.value))
            elif not first.startswith("%%") or node.func.attr != "run_cell_magic":
                what = f"%{magic}" if node.func.attr in ("run_line_magic", "run_cell_magic") and magic else \
                    f"get_ipython().{node.func.attr}"
                flag(f"{where}: runs code the grader does not read ({what})")
            safe.add(id(node.func.value))
    for node in ast.walk(tree):
        if _is_ipython(node) and id(node) not in safe:
            flag(f"{where}: reaches into IPython (get_ipython(): input transformers, run_cell, events)")
        if isinstance(node, ast.Name) and node.id == "get_ipython" and isinstance(node.ctx, ast.Load):
            continue
        if isinstance(node, ast.Call):
            name = _dotted(node.func, names)
            if name in NAMED and node.args and not (len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
                root = node.args[0]
                while isinstance(root, (ast.Attribute, ast.Subscript, ast.Call)):
                    root = root.func if isinstance(root, ast.Call) else root.value
                # a computed attribute of a module (lorakit's, sys, builtins...), not of the learner's own objects
                if isinstance(root, ast.Name) and (root.id in names or root.id in ("sys", "builtins", "__builtins__")):
                    flag(f"{where}: runs code the grader cannot read ({name} with a computed name on {root.id})")
        if isinstance(node, (ast.Name, ast.Attribute)):
            d = _dotted(node, names)
            if d and d != "get_ipython" and any(d == x or d.startswith(x + ".") for x in DYNAMIC):
                flag(f"{where}: runs code the grader cannot read ({d})")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("importlib", "runpy", "pkgutil"):
            flag(f"{where}: runs code the grader cannot read ({node.module})")


def _is_ipython(node) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "get_ipython"


def _grader_and_process(stmt, names, where: str, flag) -> None:
    for node in ast.walk(stmt):
        used = []
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            used += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            used += [a.name for a in node.names]
        elif isinstance(node, (ast.Attribute, ast.Name)):
            used.append(_dotted(node, names))
            target = used[-1] if isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)) else ""
            if target and (target == "lorakit" or target.startswith("lorakit.")):
                flag(f"{where}: changes lorakit's own code ({target})")
            if isinstance(node, ast.Attribute) and node.attr in FRAME_ATTRIBUTES:
                flag(f"{where}: looks through the running process (.{node.attr})")
        for dotted in filter(None, used):
            for t in INTERNALS:
                if dotted == t or dotted.startswith(t + "."):
                    flag(f"{where}: uses the grader's own code ({t})")
            if dotted in PROCESS:
                flag(f"{where}: looks through the running process ({dotted}: gc, frames or threads)")


def _copied(stmt, probe_names, answers, key, where: str, flag) -> None:
    if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or stmt.name not in probe_names:
        return
    exercise = probe_names[stmt.name]
    given = key.cells[exercise].source if exercise in key.cells else ""
    source = ast.unparse(stmt)
    for r in sorted(answers.get(exercise, ())):
        ref = reference_source(r)
        if ref is None:
            continue
        s = similarity(source, ref, given)
        if s >= SIMILAR:
            flag(f"{where}: {stmt.name} is close to lorakit's reference {r} (similarity {s:.2f}: its normalised "
                 f"code shares {s:.0%} of its fingerprints with the reference's)")
