"""Grading on Gradescope: `lorakit gradescope LESSON` builds the autograder zip, and this module runs inside it.

Gradescope builds one image per assignment from the zip (its setup.sh runs once), then grades each upload in
a fresh container of that image: the upload is in /autograder/submission, and run_autograder must write
/autograder/results/results.json (gradescope-autograders.readthedocs.io, "Autograder Specifications").

The zip (`build()`):

    setup.sh, run_autograder          lorakit/assets/gradescope/
    tooling/bootstrap.py, install.py  the kit's installer (what `make` runs; it imports install.py from above)
    pyproject.toml                    the project file the installer reads
    tested.txt, wheels/lorakit-*.whl  the kit, installed at the versions CI tested
    course/solutions/LESSON/...       the instructor's key, hidden tests included, and the course's nbgrader
    course/nbgrader_course/...        config (`course_root()` finds the course there)
    lorakit-gradescope.json           the lesson and the grading options (`Options`)

In the container, `prepare()` (setup.sh's last step) registers the key in the course's gradebook and makes
the key and the gradebook readable by root only. `run()` (run_autograder) grades the upload with
`grading.grade`: the same sandbox and trusted judge as `lorakit grade`, for one submission. Where the
container allows no namespaces, the sandbox falls back to what it has (its own user id per submission, which
cannot read the root-only key, and rlimits), and the results' output says which protections were off. Every
upload gets a results.json: no notebook, several notebooks, an unreadable one or a grader error each end as
a score of zero with the reason in the output, never as a silent zero.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorakit import course, install
from lorakit.tooling import bootstrap
from lorakit.grading import report, submission
from lorakit.grading.report import VISIBILITIES

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "gradescope"
OPTIONS = "lorakit-gradescope.json"
COURSE = "course"        # the course folder inside the zip (and /autograder/source)


@dataclass
class Options:
    """How the autograder grades: written into the zip by `build()`, read by `run()`."""
    lesson: str
    hidden_names: str = "hidden"     # who sees the checks on inputs drawn when graded (VISIBILITIES)
    timeout: float = 480             # seconds per upload: keep it below the autograder timeout set on Gradescope
    cell_timeout: float = 120
    memory_mb: int = 4096
    threads: int = 1
    params: dict = field(default_factory=dict)   # injected after the parameters cell (e.g. fewer steps)

    def __post_init__(self):
        if self.hidden_names not in VISIBILITIES:
            raise course.CourseError(f"--hidden-names {self.hidden_names!r}: choose one of {', '.join(VISIBILITIES)}")


# ------------------------------------------------------------------------------------- building the zip

def build_wheel(root: Path, dest: Path) -> Path:
    """The kit as a wheel, built from a copy of the checkout at `root` (nothing is written into the checkout).
    Uses this environment's setuptools when it is new enough, else pip's isolated build (which downloads it)."""
    if not (root / "pyproject.toml").is_file():
        raise course.CourseError(f"{root} has no pyproject.toml: build the Gradescope zip from a checkout of the kit")
    with tempfile.TemporaryDirectory(prefix="lorakit-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            shutil.copy2(root / name, src / name)
        shutil.copytree(root / "lib", src / "lib",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".ipynb_checkpoints"))
        cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), str(src)]
        if _setuptools_ok():
            cmd.insert(4, "--no-build-isolation")
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise course.CourseError(f"pip could not build the kit's wheel:\n{res.stdout}{res.stderr}")
    wheels = sorted(Path(dest).glob("lorakit-*.whl"))
    if len(wheels) != 1:
        raise course.CourseError(f"expected one lorakit wheel in {dest}, found {[w.name for w in wheels]}")
    return wheels[0]


def _setuptools_ok() -> bool:
    if importlib.util.find_spec("setuptools") is None:
        return False
    import importlib.metadata as md

    from packaging.version import Version
    return Version(md.version("setuptools")) >= Version("77")


def build(options: Options, out: str | os.PathLike | None = None, root: Path | None = None) -> Path:
    """Write the autograder zip for `options.lesson` (default nbgrader_course/work/gradescope/LESSON.zip) and
    return its path. The lesson's key is checked first: a test cell the grader cannot read stops the build here,
    not on Gradescope."""
    root = root or course.course_root()
    [lesson] = course.select([options.lesson], root)
    options = Options(**{**asdict(options), "lesson": lesson})
    out = Path(out) if out else course.work_dir(root) / "gradescope" / f"{lesson}.zip"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lorakit-gradescope-") as tmp:
        tmp = Path(tmp)
        key = submission.build_key(lesson, f"sqlite:///{tmp}/check.db", tmp / "check", root)
        wheel = build_wheel(root, tmp / "wheels")
        files = {
            "setup.sh": ASSETS / "setup.sh",
            "run_autograder": ASSETS / "run_autograder",
            # the package's layout: bootstrap.py reads install.py from the folder above it
            "tooling/bootstrap.py": Path(bootstrap.__file__),
            "install.py": Path(install.__file__),
            "pyproject.toml": root / "pyproject.toml",
            "tested.txt": install.LOCK,
            f"wheels/{wheel.name}": wheel,
            f"{COURSE}/solutions/{lesson}/{lesson}.ipynb": course.solution_path(lesson, root),
            f"{COURSE}/{course.NBGRADER_DIR}/nbgrader_config.py": root / course.NBGRADER_DIR / "nbgrader_config.py",
        }
        partial = out.with_name(out.name + ".partial")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, path in files.items():
                info = zipfile.ZipInfo(name, date_time=time.localtime(path.stat().st_mtime)[:6])
                info.external_attr = (0o755 if name in ("setup.sh", "run_autograder") else 0o644) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, path.read_bytes())
            zf.writestr(OPTIONS, json.dumps(asdict(options), indent=1) + "\n")
        partial.replace(out)
    print(f"{lesson}: {len(key.tests)} test cells, {key.max_score:g} points; checks on inputs drawn when graded "
          f"are shown to students: {options.hidden_names}")
    return out


# ----------------------------------------------------------------------------------- inside the container

def _paths(autograder: Path) -> tuple[Path, Path, Options]:
    source = autograder / "source"
    options = Options(**json.loads((source / OPTIONS).read_text()))
    return source, source / COURSE, options


def prepare(autograder: Path) -> None:
    """setup.sh's last step: register the key in the course's gradebook (so that no upload waits for
    nbgrader), then leave the key and the gradebook to root: a submission running under its own user id
    cannot read them even where the container allows no private filesystem."""
    from lorakit.grading.batch import default_db_url
    _, root, options = _paths(autograder)
    course.work_dir(root).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lorakit-key-") as tmp:
        key = submission.build_key(options.lesson, default_db_url(root), Path(tmp), root)
    lock_key(root)
    print(f"lorakit setup: {options.lesson} registered ({len(key.tests)} test cells, {key.max_score:g} points); "
          f"the key and the gradebook are readable by root only")


def lock_key(root: Path) -> None:
    """solutions/ and the gradebook: root only. nbgrader_course/work stays passable (not listable), since the
    submissions' job folders live below it."""
    for path in [root / "solutions", *(root / "solutions").rglob("*")]:
        os.chmod(path, 0o700 if path.is_dir() else 0o600)
    work = course.work_dir(root)
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o711)
    for path in work.iterdir():
        if path.is_file():
            os.chmod(path, 0o600)


def find_notebook(folder: Path, lesson: str) -> tuple[Path | None, str]:
    """The notebook to grade in an upload, or (None, what is wrong in words a learner can act on)."""
    found = sorted(p for p in folder.rglob("*.ipynb")
                   if not {".ipynb_checkpoints", "__MACOSX"} & set(p.relative_to(folder).parts))
    if len(found) == 1:
        return found[0], ""
    if not found:
        names = sorted(p.name for p in folder.rglob("*") if p.is_file())[:5]
        return None, (f"no notebook (.ipynb) in your upload{' (it has ' + ', '.join(names) + ')' if names else ''}: "
                      f"upload your {lesson}.ipynb (in Colab: File > Download > Download .ipynb)")
    exact = [p for p in found if p.name == f"{lesson}.ipynb"]
    if len(exact) == 1:
        return exact[0], ""
    return None, (f"your upload has {len(found)} notebooks ({', '.join(p.name for p in found[:5])}): "
                  f"upload only your {lesson}.ipynb")


def protections_note(limits) -> list[str]:
    """What the results' output says about the sandbox this container allowed."""
    from lorakit.grading.sandbox import detect
    p = detect()
    lines = [p.describe(limits)]
    if not p.namespaces:
        lines.append("this container allows no Linux namespaces: the submission ran without network isolation "
                     "and without a private filesystem"
                     + ("; it ran under its own user id, which cannot read the instructor's key or the gradebook"
                        if p.separate_user else ""))
    return lines


def run(autograder: Path) -> int:
    """Grade /autograder/submission into /autograder/results/results.json (see the module docstring)."""
    from lorakit.grading import grade
    from lorakit.grading.sandbox import Limits
    autograder = Path(autograder)
    results = autograder / "results"
    results.mkdir(parents=True, exist_ok=True)
    source, root, options = _paths(autograder)
    limits = Limits(memory_mb=options.memory_mb, threads=options.threads)
    notes = protections_note(limits)
    print("\n".join(notes[1:]))   # grade() prints the first (the sandbox's protections) itself
    t0 = time.monotonic()
    try:
        notebook, problem = find_notebook(autograder / "submission", options.lesson)
        if notebook is None:
            g = _not_graded(root, options.lesson, "invalid notebook", problem)
        else:
            with tempfile.TemporaryDirectory(prefix="lorakit-out-") as out:
                [g] = grade(options.lesson, [notebook], workers=1, timeout=options.timeout,
                            cell_timeout=options.cell_timeout, out=out, limits=limits,
                            params=options.params or None, root=root)
    except Exception as e:  # noqa: BLE001 - every upload gets a results.json
        import traceback
        traceback.print_exc()
        g = _not_graded(root, options.lesson, "grader error", f"{type(e).__name__}: {e}")
    g.outcome.seconds = g.outcome.seconds or time.monotonic() - t0
    g.student = _submitter(autograder)
    data = report.results_json(g, options.hidden_names, notes)
    (results / "results.json").write_text(json.dumps(data, indent=1))
    print(f"{g.lesson}: {g.score:g} / {g.max_score:g} ({report.summary(g.outcome)}); wrote {results / 'results.json'}")
    return 0


def _submitter(autograder: Path) -> str:
    """Who uploaded, from Gradescope's submission_metadata.json (the users' emails), for results' extra_data."""
    try:
        meta = json.loads((autograder / "submission_metadata.json").read_text())
        return "+".join(str(u.get("email") or u.get("name")) for u in meta.get("users", [])) or "submission"
    except (OSError, ValueError, AttributeError):
        return "submission"


def _not_graded(root: Path, lesson: str, reason: str, detail: str) -> report.Graded:
    """A zero with its reason, every test cell listed as not run (the key is read from the gradebook)."""
    from lorakit.grading.batch import default_db_url
    from lorakit.grading.session import Outcome
    try:
        with tempfile.TemporaryDirectory(prefix="lorakit-key-") as tmp:
            key = submission.build_key(lesson, default_db_url(root), Path(tmp), root)
        cells, max_score, hidden = [(c.grade_id, c.points) for c in key.tests], key.max_score, frozenset(key.hidden_lines)
    except Exception as e:  # noqa: BLE001 - the key itself is broken: say so, with what is known
        cells, max_score, hidden = [], 0.0, frozenset()
        detail += f" (and the key could not be read: {type(e).__name__}: {e})"
    outcome = Outcome("failed", reason, detail).score_the_rest(cells, reason)
    return report.Graded("submission", lesson, "", outcome, max_score, hidden)


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m lorakit.grading.gradescope",
                                 description="inside Gradescope's container: setup.sh's and run_autograder's steps")
    ap.add_argument("step", choices=["prepare", "run"])
    ap.add_argument("--autograder", default="/autograder", help="Gradescope's root (default /autograder)")
    args = ap.parse_args(argv)
    if args.step == "prepare":
        prepare(Path(args.autograder))
        return 0
    return run(Path(args.autograder))


if __name__ == "__main__":
    sys.exit(main())
