"""The library's layering, as the design map draws it: concept modules (what a lesson builds) import only each
other, compositions (training, checks, the pipeline, grading, the command) sit above them, nothing imports
upwards, and no module reaches for another's private names. Read from the source with `ast`, lazy imports
inside functions included."""

import ast
import re
from pathlib import Path

import lorakit

PACKAGE = Path(lorakit.__file__).parent
# One module per concept; the models and the environment they need are part of that floor.
CONCEPTS = {"install", "env", "models", "data", "memory", "lora", "nf4", "qlora", "dora", "loftq"}
COMPOSITIONS = {"train", "viz", "pretrain", "distributed", "course", "sweep", "lab", "checks", "grading", "cli"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        if "assets" in path.relative_to(PACKAGE).parts:  # scripts shipped for other machines
            continue
        rel = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        yield path, name, package


def _top(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path, package: str):
    """(imported module, names) for every import of a lorakit module in `path`."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lorakit."):
                    yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "lorakit":  # from lorakit import memory, lora: each name is a module
                for a in node.names:
                    yield f"lorakit.{a.name}", []
            elif module.startswith("lorakit."):
                yield module, [a.name for a in node.names]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path, name, package in _modules():
        src = _top(name)
        for module, _ in _imports(path, package):
            dst = _top(module)
            if src and dst and dst != src:
                graph.setdefault(src, set()).add(dst)
    return graph


def test_every_module_is_placed_in_the_map():
    tops = {_top(name) for _, name, _ in _modules()} - {""}
    assert tops <= CONCEPTS | COMPOSITIONS, f"place {sorted(tops - CONCEPTS - COMPOSITIONS)} in CONCEPTS or COMPOSITIONS"


def test_concept_modules_import_no_composition():
    graph = _graph()
    upward = {src: sorted(graph.get(src, set()) & COMPOSITIONS) for src in CONCEPTS}
    assert not any(upward.values()), {k: v for k, v in upward.items() if v}


def test_imports_form_no_cycle_and_only_the_command_reaches_grading():
    graph = _graph()
    assert not any("cli" in deps for deps in graph.values())
    assert {src for src, deps in graph.items() if "grading" in deps} <= {"cli"}
    state: dict[str, str] = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(trail + [node])}"
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            visit(dep, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])


def test_no_private_name_is_imported_across_modules():
    found = []
    module_names = "|".join(sorted(CONCEPTS | COMPOSITIONS))
    attribute = re.compile(rf"\b(?:{module_names})\._[a-z]\w*")
    for path, name, package in _modules():
        for module, names in _imports(path, package):
            if module != name:
                found += [f"{name}: from {module} import {n}" for n in names if n.startswith("_")]
        found += [f"{name}: {m}" for m in attribute.findall(path.read_text())]
    assert not found, found
