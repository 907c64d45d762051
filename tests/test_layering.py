"""The library's layering, read from the map in lorakit's package docstring (so the map and this test cannot
disagree): concepts (what a lesson builds) import only each other; nothing a learner imports reaches the course
pipeline, the grader or the make-only tooling; only the command reaches the grader; nothing imports upwards in a
cycle; no module reaches for another's private names; one import style (absolute). Read from the source with
`ast`, lazy imports inside functions included."""

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lorakit

PACKAGE = Path(lorakit.__file__).parent
LAYERS = ("Concepts", "Learner compositions", "Course pipeline", "Grader", "Tooling")


def read_map(doc: str) -> list[tuple[str, str]]:
    """(layer, module) for each module line of the map: a heading `Layer: ...` at the margin, then lines
    `    name   what it answers` (`name/` for a package)."""
    placed, layer = [], None
    for line in doc.splitlines():
        heading = re.match(r"([A-Z][A-Za-z ]+):", line)
        module = re.match(r"    ([a-z_][a-z0-9_]*)/? {2,}\S", line)
        if heading:
            layer = heading.group(1)
        elif module and layer in LAYERS:
            placed.append((layer, module.group(1)))
    return placed


PLACED = read_map(lorakit.__doc__)
LAYER = {name: layer for layer, name in PLACED}
CONCEPTS = {n for n, layer in LAYER.items() if layer == "Concepts"}
LEARNER = CONCEPTS | {n for n, layer in LAYER.items() if layer == "Learner compositions"}
ABOVE_THE_LEARNER = {n for n, layer in LAYER.items() if layer in ("Course pipeline", "Grader", "Tooling")}
GRADER = {n for n, layer in LAYER.items() if layer == "Grader"}


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


def test_the_map_places_every_module_in_exactly_one_layer():
    assert {layer for layer, _ in PLACED} == set(LAYERS), f"the package docstring's map lost a layer: {PLACED}"
    names = [name for _, name in PLACED]
    assert len(names) == len(set(names)), f"placed twice: {sorted({n for n in names if names.count(n) > 1})}"
    tops = {_top(name) for _, name, _ in _modules()} - {""}
    assert tops <= set(names), f"place {sorted(tops - set(names))} in the map (lorakit/__init__.py's docstring)"
    assert set(names) <= tops, f"the map names modules that do not exist: {sorted(set(names) - tops)}"


def test_concepts_import_only_concepts():
    graph = _graph()
    upward = {src: sorted(graph.get(src, set()) - CONCEPTS) for src in CONCEPTS}
    assert not any(upward.values()), {k: v for k, v in upward.items() if v}


def test_nothing_a_learner_imports_reaches_the_pipeline_the_grader_or_the_tooling():
    graph = _graph()
    upward = {src: sorted(graph.get(src, set()) & ABOVE_THE_LEARNER) for src in LEARNER}
    assert not any(upward.values()), {k: v for k, v in upward.items() if v}


def test_imports_form_no_cycle_and_only_the_command_reaches_grading():
    graph = _graph()
    assert not any("cli" in deps for deps in graph.values())
    assert {src for src, deps in graph.items() if deps & GRADER} <= {"cli"} | GRADER
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


def relative_imports(source: str) -> list[str]:
    """Each `from . import x` / `from .x import y` in `source`, as written."""
    return [ast.unparse(node) for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom) and node.level]


def test_one_import_style_absolute():
    assert relative_imports("from . import memory\nfrom lorakit import lora\nfrom .sweep import FIELDS\n") == \
        ["from . import memory", "from .sweep import FIELDS"]
    found = [f"{name}: {imp}" for path, name, _ in _modules() for imp in relative_imports(path.read_text())]
    assert not found, f"write these as `from lorakit.x import y` / `from lorakit import x`: {found}"


def test_no_private_name_is_imported_across_modules():
    found = []
    module_names = "|".join(sorted(LAYER))
    attribute = re.compile(rf"\b(?:{module_names})\._[a-z]\w*")
    for path, name, package in _modules():
        for module, names in _imports(path, package):
            if module != name:
                found += [f"{name}: from {module} import {n}" for n in names if n.startswith("_")]
        found += [f"{name}: {m}" for m in attribute.findall(path.read_text())]
    assert not found, found


def test_public_names_other_modules_use_are_in_all():
    """A module with `__all__` lists every name other lorakit modules take from it."""
    missing = []
    for path, name, package in _modules():
        for module, names in _imports(path, package):
            if module == name or not names:
                continue
            try:
                target = __import__(module, fromlist=["_"])
            except ImportError:
                continue
            public = getattr(target, "__all__", None)
            if public is None:
                continue
            missing += [f"{name} uses {module}.{n}" for n in names  # a submodule is not a name of its package
                        if n not in public and importlib.util.find_spec(f"{module}.{n}") is None]
    assert not missing, missing


IMPORT_EVERYTHING = """
import importlib, logging, os, pkgutil, sys, warnings
import torch, transformers, peft, datasets, bitsandbytes, matplotlib, matplotlib.pyplot, papermill  # noqa
def state():
    return (dict(os.environ), [repr(f) for f in warnings.filters], logging.root.level, torch.get_num_threads(),
            torch.get_default_dtype(), matplotlib.get_backend(), list(sys.path),
            {n: l.level for n, l in logging.root.manager.loggerDict.items()
             if isinstance(l, logging.Logger) and n != "bitsandbytes"})
before = state()
import pytest

import lorakit
for m in pkgutil.walk_packages(lorakit.__path__, "lorakit."):
    if ".assets" not in m.name:
        importlib.import_module(m.name)
after = state()
names = ["os.environ", "warnings filters", "root log level", "torch threads", "torch default dtype",
         "matplotlib backend", "sys.path", "log levels"]
print([n for n, a, b in zip(names, before, after) if a != b])
print(logging.getLogger("bitsandbytes").level)
"""


@pytest.mark.slow
def test_importing_lorakit_changes_no_global_state_but_the_bitsandbytes_log_level():
    """Every module of the kit imported (the heavy libraries first, so their own import-time changes are not
    counted): the environment, warning filters, log levels, torch's threads and dtype, matplotlib's backend
    and sys.path are as they were; only bitsandbytes' logger is quieted (its harmless kernel-hub line)."""
    out = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    changed, bnb_level = out.stdout.strip().splitlines()[-2:]
    assert changed == "[]", changed
    assert int(bnb_level) == 40  # logging.ERROR
