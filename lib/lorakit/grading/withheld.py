"""Answers withheld: the sandbox's view of the kit, without the graded lesson's answers.

The kit is installed where learner code runs, and its references answer the exercises (that is what they are
for: a later lesson imports an earlier lesson's answer). A flag of reference use reads source, and a reader
of the flagger can get past any reading. So while a lesson is graded, the sandbox does not get the kit as
installed: it gets a copy (`build`) in which every object that answers one of the lesson's exercises is
replaced by a stub that raises `AnswerWithheld`, and that copy is bind-mounted over the package inside the
sandbox's mount namespace. No import path, re-export, `getattr`, file read or `importlib` trick reaches the
answer: its code is not in the sandbox's file system. Earlier lessons' answers stay (the course promises
them), and so does everything else.

What is withheld (`plan`), per lesson:

- the objects the lesson's checks name as `reference` (and the check module's own helpers, below), except
  earlier lessons' answers and those the lesson itself needs: whatever the instructor's notebook (every code cell of the solution) and
  the probes of the lesson's checks use, followed through the kit's own code (a kept function that calls a
  reference keeps it), plus everything that runs when a module is imported. Those stay and are flagged
  instead (reference_use.py): `Plan.flagged` names them, and the grade log says which mechanism covers what;
- in the lesson's check modules, everything the probes do not need: each check's `draw` and `judge` (which
  run only in the grader's process) and every helper only they use, such as a check's private reference
  implementation.

Trusted side: `plan` reads the kit's source and the instructor's notebook with `ast`; nothing is run.
"""

from __future__ import annotations

import ast
import compileall
import os
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

HELPER = '''"""Stand-ins for what is withheld from a sandbox while a lesson is graded (made by lorakit.grading.withheld)."""


class AnswerWithheld(RuntimeError):
    """This object answers an exercise of the lesson being graded."""


def _say(name):
    return (f"{name} answers an exercise of the lesson being graded, so it is withheld from the grader's copy "
            "of lorakit: use your own answer (earlier lessons' references stay available)")


class Withheld:
    """A withheld constant: any use raises AnswerWithheld."""

    def __init__(self, name):
        object.__setattr__(self, "_name", name)

    def __repr__(self):
        return f"<withheld: {self._name}>"

    def _refuse(self, *args, **kwargs):
        raise AnswerWithheld(_say(self._name))

    __getattr__ = __getitem__ = __iter__ = __len__ = __call__ = __contains__ = __bool__ = _refuse
    __eq__ = __add__ = __mul__ = __float__ = __int__ = __index__ = _refuse
    __hash__ = None


def refuse(name):
    raise AnswerWithheld(_say(name))


class WithheldClass(type):
    """A withheld class: making one raises AnswerWithheld, and so does calling any attribute of it
    (`MatMulNF4.apply`), while naming it (`yours_or_kit(..., qlora.MatMulNF4.apply, ...)`) still works."""

    def __getattr__(cls, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def refused(*args, **kwargs):
            refuse(f"{cls._withheld_name}.{attr}")
        return refused
'''


@dataclass
class Plan:
    lesson: str
    blocked: dict = field(default_factory=dict)    # "lorakit.nf4.quantize_dynamic_8bit" -> the exercise it answers
    flagged: dict = field(default_factory=dict)    # declared answers the lesson itself needs: left in, flagged
    helpers: list = field(default_factory=list)    # check-module objects withheld ("lorakit.checks.<topic>.<name>")
    methods: list = field(default_factory=list)    # (check module, class, method) withheld: draw and judge

    def describe(self) -> str:
        line = f"answers withheld from the sandbox ({self.lesson}): " + (", ".join(sorted(self.blocked)) or "none")
        if self.flagged:
            line += "\nanswers the lesson itself uses (flagged when a learner's code uses them instead): " + \
                    ", ".join(sorted(self.flagged))
        return line


# ------------------------------------------------------------------------------------- reading the kit

class _Module:
    """One module of the kit, read with ast: its top-level objects and what each refers to."""

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path
        self.source = path.read_text()
        self.tree = ast.parse(self.source)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        self.imports = _imports(self.tree, package)
        self.objects: dict[str, ast.AST] = {}
        self.toplevel: list[ast.AST] = []         # statements that run at import (not def/class bodies)
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.objects[node.name] = node
                self.toplevel += node.decorator_list + (node.bases if isinstance(node, ast.ClassDef) else [])
                if isinstance(node, ast.ClassDef):
                    self.toplevel += [s for s in node.body if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and _targets(node):
                for t in _targets(node):
                    self.objects[t] = node
                self.toplevel.append(node)
            else:
                self.toplevel.append(node)

    def refs(self, node) -> set[str]:
        """Dotted names (as far as they can be resolved) that `node` refers to."""
        out = set()
        for n in ast.walk(node):
            if isinstance(n, (ast.Name, ast.Attribute)) and isinstance(getattr(n, "ctx", None), ast.Load):
                d = _dotted(n, lambda i: f"{self.name}.{i}" if i in self.objects else self.imports.get(i))
                if d:
                    out.add(d)
        return out


def _targets(node) -> list[str]:
    ts = node.targets if isinstance(node, ast.Assign) else [node.target]
    return [t.id for t in ts if isinstance(t, ast.Name)]


def _imports(tree, package: str) -> dict[str, str]:
    """Local name -> dotted target, from every import in the module (lazy ones inside functions too)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                if a.name != "*":
                    out[a.asname or a.name] = f"{base}.{a.name}"
    return out


def _dotted(node, resolve) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    head = resolve(node.id)
    return ".".join([head, *reversed(parts)]) if head else None


def read_kit(package: Path) -> dict[str, _Module]:
    out = {}
    for path in sorted(Path(package).rglob("*.py")):
        rel = path.relative_to(Path(package).parent).with_suffix("").parts
        if "assets" in rel or "experiments" in rel:
            continue
        name = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
        out[name] = _Module(name, path)
    return out


def _object(kit: dict[str, _Module], dotted: str, depth: int = 0) -> tuple[str, str] | None:
    """(module, object) that `dotted` names, following re-exports ("lorakit.qlora.quantize_nf4" -> nf4's)."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:i])
        if module in kit:
            m, name = kit[module], parts[i]
            if name in m.objects:
                return module, name
            if name in m.imports and depth < 10:
                return _object(kit, ".".join([m.imports[name], *parts[i + 1:]]), depth + 1)
            return None
    return None


@lru_cache(maxsize=4)
def _kit_index(package: str) -> dict[str, _Module]:
    return read_kit(Path(package))


def canonical(dotted: str, package: Path | None = None) -> str:
    """The name a lorakit object is defined under, re-exports followed ("lorakit.qlora.LoRALinear" ->
    "lorakit.lora.LoRALinear"); anything else as given."""
    import lorakit
    if not dotted.startswith("lorakit."):
        return dotted
    kit = _kit_index(str(package or Path(lorakit.__file__).parent))
    found = _object(kit, dotted)
    if found is None:
        return dotted
    rest = dotted.split(".")
    name = ".".join(found)
    # keep what follows the object (an attribute of it), if anything
    for i in range(len(rest), 0, -1):
        if _object(kit, ".".join(rest[:i])) == found:
            return ".".join([name, *rest[i:]])
    return name


# ------------------------------------------------------------------------------------------- the plan

def _fallbacks(trees) -> tuple[set[int], set[str]]:
    """What only stands in for an open exercise: the `kit` argument of `lorakit.checks.yours_or_kit(yours, kit,
    exercise)` runs only while `yours` raises NotImplementedError, an `except NameError:` block only while a value
    exercise is undefined, and a submission graded with that exercise open fails it anyway; a class named in
    `isinstance(x, classes)` needs no code (its withheld stand-in is a class, of which nothing is an instance). Returns the ids of those argument nodes and of the bodies of functions the notebook defines
    for nothing else, and the names bound (by a def or an import) for nothing else. What they use is not
    something the lesson needs."""
    kit_args, uses, defs = [], {}, {}
    for tree in trees:
        for n in ast.walk(tree):
            if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute)) and \
                    (n.func.id if isinstance(n.func, ast.Name) else n.func.attr) == "yours_or_kit":
                kit = n.args[1] if len(n.args) > 1 else next((k.value for k in n.keywords if k.arg == "kit"), None)
                if kit is not None:
                    kit_args.append(kit)
            elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                uses[n.id] = uses.get(n.id, 0) + 1
            elif isinstance(n, ast.FunctionDef):
                defs[n.name] = n
            elif isinstance(n, ast.ExceptHandler) and isinstance(n.type, ast.Name) and n.type.id == "NameError":
                kit_args += n.body       # `except NameError:` the value an open exercise has not defined yet
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "isinstance" and len(n.args) == 2:
                kit_args.append(n.args[1])   # a class named in isinstance: its withheld stand-in is a class too
    nodes, names = set(), set()
    for kit in kit_args:
        nodes |= {id(k) for k in ast.walk(kit)}
        if isinstance(kit, ast.Name) and uses.get(kit.id) == 1:
            names.add(kit.id)
            if kit.id in defs:
                nodes |= {id(k) for k in ast.walk(defs[kit.id])}
    return nodes, names


def _notebook_refs(nb) -> set[str]:
    """Dotted names the notebook's code cells use, names bound by earlier cells' imports included (fallbacks for
    open exercises aside: `_fallbacks`)."""
    from lorakit.grading.reference_use import parse_cell
    names: dict[str, str] = {}
    out = set()
    trees = [t for t in (parse_cell(c.source) for c in nb.cells if c.cell_type == "code") if t is not None]
    skip, kit_only = _fallbacks(trees)
    for tree in trees:
        imported = {k: v for k, v in _imports(tree, "").items() if k not in kit_only}
        names.update(imported)
        for n in ast.walk(tree):
            if id(n) in skip:
                continue
            if isinstance(n, (ast.Name, ast.Attribute)):
                d = _dotted(n, lambda i: names.get(i, i))
                if d:
                    out.add(d)
        out |= set(imported.values())
    return out


def earlier_answers(lesson: str, root: Path | None = None) -> set[str]:
    """The references the checks of the lessons before `lesson` declare: the course promises them."""
    import nbformat
    from lorakit import course
    from lorakit.grading import reference_use
    from lorakit.grading.submission import key_from_notebook
    out = set()
    for earlier in course.lessons(root):
        if earlier >= lesson:
            break
        path = course.lesson_path(earlier, root)
        if not path.is_file():       # a course folder without lessons/ (a grading machine): the instructor's version
            path = course.solution_path(earlier, root)
        key = key_from_notebook(earlier, nbformat.read(path, as_version=4))
        out |= {r for kc in key.tests for call in kc.calls for r in reference_use.declared(call.check)
                if r.startswith("lorakit.")}
    return out


def plan(key, solution, package: Path | None = None, earlier: set[str] = frozenset()) -> Plan:
    """What to withhold while `key`'s lesson is graded (see the module docstring). `solution`: the instructor's
    notebook of the lesson; `earlier`: answers of earlier lessons (`earlier_answers`), which stay."""
    import lorakit
    from lorakit.grading import reference_use
    package = Path(package or Path(lorakit.__file__).parent)
    kit = read_kit(package)
    checks, answers = set(), {}
    for exercise, gid, kc in key.tests_by_exercise():
        for call in kc.calls:
            checks.add(call.check)
            for r in reference_use.declared(call.check):
                if r.startswith("lorakit."):
                    answers.setdefault(r, exercise or gid)
    check_modules = {c.rpartition(".")[0] for c in checks}

    needed: set[tuple[str, str]] = set()
    todo: list[str] = sorted(_notebook_refs(solution))
    for m in kit.values():
        for stmt in m.toplevel:
            todo += sorted(m.refs(stmt))
    for c in sorted(checks):
        module, _, cls = c.rpartition(".")
        node = kit[module].objects.get(cls) if module in kit else None
        for item in getattr(node, "body", []):
            if isinstance(item, ast.FunctionDef) and item.name == "probe":
                todo += sorted(kit[module].refs(item))
    while todo:
        found = _object(kit, todo.pop())
        if found is None or found in needed:
            continue
        needed.add(found)
        module, name = found
        node = kit[module].objects[name]
        if module in check_modules and isinstance(node, ast.ClassDef) and f"{module}.{name}" in checks:
            continue                                 # a check: only its probe (above) and class body are needed
        todo += sorted(kit[module].refs(node))

    out = Plan(key.lesson)
    for dotted, gid in answers.items():
        found = _object(kit, dotted)
        if found is None:
            continue
        kept = found in needed or ".".join(found) in earlier or dotted in earlier
        (out.flagged if kept else out.blocked)[".".join(found)] = gid
    for module in sorted(check_modules & set(kit)):
        for name, node in kit[module].objects.items():
            if f"{module}.{name}" in checks:
                out.methods += [(module, name, f.name) for f in node.body
                                if isinstance(f, ast.FunctionDef) and f.name in ("draw", "judge")]
            elif (module, name) not in needed and isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign)):
                out.helpers.append(f"{module}.{name}")
    return out


# ------------------------------------------------------------------------------------------- the view

def _stub(module: _Module, names: set[str], methods: set[tuple[str, str]]) -> str:
    """The module's source with `names` (top-level) and `methods` ((class, method)) replaced by stubs."""
    lines = module.source.split("\n")
    edits = []                                     # (first line, last line, replacement lines), 1-based
    for name in names:
        node = module.objects[name]
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        full = f"{module.name}.{name}"
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            new = [f"def {name}(*args, **kwargs):", f"    _withheld.refuse({full!r})"]
        elif isinstance(node, ast.ClassDef):
            new = [f"class {name}(metaclass=_withheld.WithheldClass):", f"    _withheld_name = {full!r}",
                   "", "    def __init__(self, *args, **kwargs):", f"        _withheld.refuse({full!r})"]
        else:
            new = [f"{t} = _withheld.Withheld({module.name + '.' + t!r})" for t in _targets(node)]
        edits.append((first, node.end_lineno, new))
    for cls, meth in methods:
        for f in module.objects[cls].body:
            if isinstance(f, ast.FunctionDef) and f.name == meth:
                pad = " " * f.col_offset
                first = min([f.lineno] + [d.lineno for d in f.decorator_list])
                edits.append((first, f.end_lineno, [f"{pad}def {meth}(*args, **kwargs):",
                                                    f"{pad}    _withheld.refuse({module.name + '.' + cls + '.' + meth!r})"]))
    for first, last, new in sorted(edits, reverse=True):
        lines[first - 1:last] = new
    # the helper's import goes after the docstring and `from __future__` (which must come first)
    at = 0
    for node in module.tree.body:
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) or \
                (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
            at = node.end_lineno
        else:
            break
    shift = sum(len(new) - (last - first + 1) for first, last, new in edits if last <= at)
    lines.insert(at + shift, "from lorakit import _withheld  # the grader's copy: see lorakit.grading.withheld")
    return "\n".join(lines)


def build(p: Plan, dest: Path, package: Path | None = None) -> Path:
    """The sandbox's view of the kit for `p`: a copy of the package under `dest`, with the withheld objects
    stubbed and every module compiled (the sandbox writes no bytecode). Returns the copy's package folder."""
    import lorakit
    package = Path(package or Path(lorakit.__file__).parent).resolve()
    view = Path(dest) / package.name
    if view.exists():
        shutil.rmtree(view)

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)      # the large data files: no copy needed (the view is mounted read-only)
        except OSError:
            shutil.copy2(src, dst)
    shutil.copytree(package, view, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), copy_function=link_or_copy)
    kit = read_kit(package)
    per_module: dict[str, tuple[set, set]] = {}
    for dotted in [*p.blocked, *p.helpers]:
        module, _, name = dotted.rpartition(".")
        per_module.setdefault(module, (set(), set()))[0].add(name)
    for module, cls, meth in p.methods:
        per_module.setdefault(module, (set(), set()))[1].add((cls, meth))
    for module, (names, methods) in per_module.items():
        m = kit[module]
        target = view / m.path.relative_to(package)
        target.unlink()
        target.write_text(_stub(m, names, methods))
    (view / "_withheld.py").write_text(HELPER)
    compileall.compile_dir(str(view), quiet=2, workers=1)
    return view
