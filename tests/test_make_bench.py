"""`make bench` runs every benchmarks/bench_*.py with no arguments: none may require one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("bench_*.py"))


def _required_positionals(path: Path) -> list[str]:
    """The positional arguments of the benchmark's argparse parser that have no default."""
    required = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"):
            continue
        names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if not names or names[0].startswith("-"):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        nargs = keywords.get("nargs")
        optional = "default" in keywords and isinstance(nargs, ast.Constant) and nargs.value in ("?", "*")
        if not optional:
            required.append(names[0])
    return required


def test_there_are_benchmarks():
    assert len(BENCHMARKS) >= 10, BENCHMARKS


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_make_bench_can_run_it_without_arguments(path):
    required = _required_positionals(path)
    assert not required, (
        f"{path.name} requires the argument(s) {required}, but `make bench` runs it with none: give each a "
        f"default (nargs='*' or '?' and default=...) that measures what the benchmark promises"
    )


def test_the_rule_sees_a_required_positional(tmp_path):
    bad = tmp_path / "bench_bad.py"
    bad.write_text("import argparse\nap = argparse.ArgumentParser()\nap.add_argument('lessons', nargs='+')\n")
    good = tmp_path / "bench_good.py"
    good.write_text("import argparse\nap = argparse.ArgumentParser()\n"
                    "ap.add_argument('lessons', nargs='*', default=['00_setup'])\nap.add_argument('--runs')\n")
    assert _required_positionals(bad) == ["lessons"]
    assert _required_positionals(good) == []
