"""The Colab path: a learner clicks "Open in Colab" on a lesson, runs the setup cell, and the kit with its
tested stack is installed from the repository; on their own machine the same cell does nothing. (What
`lorakit.install colab` pins is tested in tests/test_install.py.)

tests/test_course.py checks the template (`stamp`, and `setup_source()` executed in-process with a fake
`google.colab`); tests/test_pipeline.py checks that the solutions are stamped. This file checks what Colab
actually gets: the committed student versions in lessons/, the setup cell run in a fresh interpreter on
both paths, the exact pip requirement, and that installing the package from the repository ships
everything the notebooks need (data, the embedded model) and the pinned dependency ranges.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import nbformat
import pytest
from packaging.requirements import Requirement

from lorakit import course

ROOT = course.course_root()
COURSE_NOTEBOOKS = ROOT / "lib" / "lorakit" / "course" / "notebooks.py"  # where course.REPOSITORY is set
LESSONS = course.lessons()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BADGE = re.compile(r"\[!\[Open In Colab\]\((?P<image>[^)]+)\)\]\((?P<link>[^)]+)\)")


def _release(lesson: str) -> nbformat.NotebookNode:
    return nbformat.read(course.lesson_path(lesson), as_version=4)


# ------------------------------------------------------------------------------------------ the badge

@pytest.mark.parametrize("lesson", LESSONS)
def test_student_version_opens_in_colab_from_its_badge(lesson):
    nb = _release(lesson)
    first = nb.cells[0]
    assert first.cell_type == "markdown", f"lessons/{lesson}: the first cell must be the title with the Colab badge"
    badges = BADGE.findall(first.source)
    assert len(badges) == 1, f"lessons/{lesson}: expected one 'Open In Colab' badge in the first cell, found {len(badges)}"
    assert course.colab_badge(lesson) in first.source, f"lessons/{lesson}: the badge is not built from course.REPOSITORY: run `make lessons`"
    image, link = badges[0]
    assert image == course.BADGE_IMAGE and image.startswith("https://")
    prefix = f"https://colab.research.google.com/github/{course.REPOSITORY.removeprefix('https://github.com/')}/blob/{course.BRANCH}/"
    assert link.startswith(prefix), f"lessons/{lesson}: the badge links to {link}, not into {course.REPOSITORY}"
    target = ROOT / link.removeprefix(prefix)
    assert target == course.lesson_path(lesson) and target.is_file(), \
        f"lessons/{lesson}: the badge opens {link.removeprefix(prefix)}, which is not this lesson's student version"


def test_repository_url_is_configured_in_one_place():
    """Changing course.REPOSITORY and running `make lessons` must be enough: nothing else in the library
    spells the URL out."""
    slug = course.REPOSITORY.removeprefix("https://github.com/")
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", slug), f"course.REPOSITORY should be https://github.com/OWNER/NAME, is {course.REPOSITORY!r}"
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "lib" / "lorakit").rglob("*.py")
                 if p != COURSE_NOTEBOOKS and slug in p.read_text()]
    assert not offenders, f"these modules spell out the repository URL; use lorakit.course.REPOSITORY: {offenders}"
    with_url = [p for p in ROOT.glob("lessons/*/*.ipynb") if slug in p.read_text()]
    assert len(with_url) == len(LESSONS)


# -------------------------------------------------------------------------------------- the setup cell

@pytest.mark.parametrize("lesson", LESSONS)
def test_setup_cell_comes_first_and_is_the_standard_one(lesson):
    nb = _release(lesson)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and "setup" in code[0].metadata.get("tags", []), \
        f"lessons/{lesson}: the first code cell must be the setup cell (on Colab nothing of lorakit exists before it runs)"
    assert code[0].source == course.setup_source(), f"lessons/{lesson}: the setup cell is stale: run `make lessons`"
    assert not code[0].metadata.get("nbgrader"), f"lessons/{lesson}: the setup cell must not be an nbgrader cell"


def test_the_install_commands_are_the_configured_ones():
    """The commands written into the setup cell are exactly `course.colab_install_commands()`: the kit from
    the configured repository and branch without dependencies, then the kit's own installer, which adds the
    learner's dependencies at the tested versions (tests/test_install.py checks what it pins)."""
    tree = ast.parse(course.setup_source())
    runs = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "subprocess.run"]
    assert len(runs) == 2, "the setup cell should make exactly two subprocess.run calls"
    written = []
    for run in runs:
        argv = run.args[0]
        assert isinstance(argv, ast.List)
        written.append([sys.executable if ast.unparse(e) == "sys.executable" else ast.literal_eval(e) for e in argv.elts])
        assert any(k.arg == "check" and ast.literal_eval(k.value) is True for k in run.keywords), \
            "an install must raise when it fails (check=True), or the next import fails with a confusing error"
        # Each call sits under `if ON_COLAB:`.
        guard = next(n for n in ast.walk(tree) if isinstance(n, ast.If) and run in ast.walk(n))
        assert ast.unparse(guard.test) == "ON_COLAB"
    assert written == course.colab_install_commands()
    kit, deps = written
    assert kit[1:4] == ["-m", "pip", "install"] and "--no-deps" in kit, "pip must be the kernel's own (sys.executable -m pip)"
    req = Requirement(kit[-1])
    assert req.name == PYPROJECT["project"]["name"] == "lorakit"
    assert req.url == f"git+{course.REPOSITORY}@{course.BRANCH}"
    assert deps[1:] == ["-m", "lorakit.install", "colab"]


SIMULATE = textwrap.dedent("""
    import json, subprocess, sys
    calls = []
    def fake_run(cmd, *a, **k):
        calls.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 0)
    subprocess.run = fake_run
    exec(compile(open(sys.argv[1]).read(), "setup-cell", "exec"), {})
    print("CALLS=" + json.dumps(calls))
""")


def _run_setup_cell(tmp_path: Path, colab: bool) -> tuple[list, str]:
    src = tmp_path / "setup_cell.py"
    cell = next(c for c in _release(LESSONS[0]).cells if "setup" in c.metadata.get("tags", []))
    src.write_text(cell.source)  # the committed cell, not the template
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if colab:  # what Colab has and a laptop has not: the google.colab package
        fake = tmp_path / "site" / "google" / "colab"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("")
        env["PYTHONPATH"] = str(tmp_path / "site")
    res = subprocess.run([sys.executable, "-c", SIMULATE, str(src)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"the setup cell failed ({'Colab' if colab else 'local'} path):\n{res.stderr[-2000:]}"
    import json
    calls = json.loads(res.stdout.rsplit("CALLS=", 1)[1])
    return calls, res.stdout


def test_setup_cell_locally_installs_nothing_and_prints_the_versions(tmp_path):
    calls, out = _run_setup_cell(tmp_path, colab=False)
    assert calls == [], f"off Colab the setup cell must not install anything; it ran {calls}"
    for package in ("torch", "transformers", "peft", "bitsandbytes"):
        assert re.search(rf"\b{package} \d", out), f"the setup cell should print the {package} version:\n{out}"


def test_setup_cell_on_colab_installs_the_kit(tmp_path):
    calls, out = _run_setup_cell(tmp_path, colab=True)
    expected = course.colab_install_commands()
    assert calls == [[sys.executable, *cmd[1:]] for cmd in expected], f"on Colab the setup cell should run {expected}, ran {calls}"
    assert "torch" in out, "after installing, the setup cell prints the versions"


# ------------------------------------------------------------------ what `pip install git+REPO` gives

@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """Build the package the way pip does for `lorakit @ git+...` (from a copy of the working tree; a CI
    checkout is exactly the tracked files)."""
    try:
        import setuptools  # noqa: F401
    except ImportError:
        pytest.skip("setuptools is not installed in this environment: cannot build the wheel offline")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "MANIFEST.in"):
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "lib", src / "lib", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "--quiet", "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"building the package failed; `pip install git+...` on Colab would fail too:\n{res.stderr[-3000:]}"
    [whl] = list((tmp / "dist").glob("lorakit-*.whl"))
    return zipfile.ZipFile(whl)


def test_installed_package_ships_every_file_the_lessons_need(wheel):
    """On Colab there is no checkout: the bundled datasets and the embedded model come from the package."""
    shipped = {n for n in wheel.namelist() if n.startswith("lorakit/")}
    pkg = ROOT / "lib" / "lorakit"
    on_disk = {"lorakit/" + str(p.relative_to(pkg)) for p in pkg.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    missing = sorted(on_disk - shipped)
    assert not missing, (f"{len(missing)} file(s) of lib/lorakit are not in the installed package (Colab would "
                         f"not have them); add them to [tool.setuptools.package-data]: {missing[:10]}")
    assert any(n.startswith("lorakit/assets/tasks/") for n in shipped), "the bundled datasets are not in the package"


def test_installed_package_pins_the_tested_stack(wheel):
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    text = wheel.read(meta).decode()
    requires = {Requirement(l.split(":", 1)[1].strip()) for l in text.splitlines() if l.startswith("Requires-Dist:")}
    base = {str(r) for r in requires if not r.marker}
    declared = {str(Requirement(d)) for d in PYPROJECT["project"]["dependencies"]}
    assert base == declared
    import lorakit
    assert f"Version: {lorakit.__version__}" in text and "License-Expression: MIT" in text
    assert "lorakit/tested.txt" in wheel.namelist(), "the lock ships with the kit (Colab and `lorakit env` read it)"
    assert any(n.endswith("licenses/LICENSE") for n in wheel.namelist()), "the LICENSE file ships in the wheel"
    by_name = {Requirement(d).name: Requirement(d) for d in PYPROJECT["project"]["dependencies"]}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        assert by_name[name].specifier, f"{name} must have a version range: Colab installs whatever is newest otherwise"
        from importlib.metadata import version
        assert by_name[name].specifier.contains(version(name), prereleases=True), \
            f"the installed {name} {version(name)} (what CI tests) is outside the declared range {by_name[name].specifier}"


# ------------------------------------------------------------------------------------------- links

LINK = re.compile(r"\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _documents() -> list[tuple[Path, str]]:
    docs = [(p, p.read_text()) for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if p.is_file()]
    for p in sorted([*ROOT.glob("lessons/*/*.ipynb"), *ROOT.glob("solutions/*/*.ipynb")]):
        nb = nbformat.read(p, as_version=4)
        docs.append((p, "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")))
    return docs


def test_links_into_the_course_resolve():
    """Every relative link in the README, docs/ and the lessons' text, and every link into this repository
    on GitHub, points to a file that exists (outside links cannot be checked offline)."""
    own = f"{course.REPOSITORY}/blob/{course.BRANCH}/"
    colab = f"https://colab.research.google.com/github/{course.REPOSITORY.removeprefix('https://github.com/')}/blob/{course.BRANCH}/"
    broken, checked = [], 0
    for path, text in _documents():
        for m in LINK.finditer(text):
            target = m["target"].split("#", 1)[0]
            if not target:
                continue
            if target.startswith((own, colab)):
                resolved = ROOT / target.removeprefix(own).removeprefix(colab)
            elif re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, data: ...
                continue
            else:
                resolved = (path.parent / target).resolve()
            checked += 1
            if not resolved.exists():
                broken.append(f"{path.relative_to(ROOT)}: {m['target']}")
    assert checked >= len(LESSONS), "the link check found almost no links: is the pattern still right?"
    assert not broken, "broken links:\n  " + "\n  ".join(broken)
