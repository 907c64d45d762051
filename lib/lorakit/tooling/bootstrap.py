"""How `make` builds the environment the kit runs in, and how `make lock` records a new tested stack.

Nothing here runs inside a running kit: `install.py` answers what the kit needs once it is installed (the
tested versions, the extras, Colab's install, the check after an install); this file is the tooling around
it that only `make` (and a Gradescope autograder's setup.sh) uses.

- `make lab` / `make test` call `python lib/lorakit/tooling/bootstrap.py venv --extra lab|dev`: it checks the Python
  version and the extra, creates .venv, adds PyTorch's CPU index on a machine without an NVIDIA GPU when the
  index answers within a few seconds (otherwise pip installs the torch it finds), installs the kit with
  `-c tested.txt`, runs `python -m lorakit.install verify` in the new environment, and says in one line what
  went wrong when something does.
- A Gradescope autograder's setup.sh (`lorakit gradescope`) runs `tooling/bootstrap.py venv --kit WHEEL
  --root DIR` with install.py in the folder above it, as in the package: the same install, from the kit's wheel
  instead of a checkout.
- `make lock` re-resolves the stack in a scratch environment (`keep`: current pins kept unless UPGRADE names
  them), runs the tests there, and writes `tested.txt` (`freeze`) and environment.yml (`environment`).

It runs as a script: the Makefile calls it with the system Python before .venv exists, so it uses the standard
library only (packaging is imported where the lock's scratch environment has it), must run on a Python too old
for the kit to say so, and imports install.py (the lock's reader, the error type) as the file in the folder above
rather than as part of the not yet installed package.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import threading
from pathlib import Path

if __package__:  # imported from the kit (tests, `python -m lorakit.tooling.bootstrap` in the lock's scratch venv)
    from lorakit import install
else:  # `python lib/lorakit/tooling/bootstrap.py`: no package is installed yet, so install.py is read as the file
    # in the folder above (lib/lorakit/, or the Gradescope zip's root); only it is loaded from there, so none of
    # the kit's other modules can shadow a standard-library name.
    import importlib.util as _importlib_util

    _spec = _importlib_util.spec_from_file_location("install", Path(__file__).resolve().parent.parent / "install.py")
    install = _importlib_util.module_from_spec(_spec)
    sys.modules["install"] = install  # its dataclasses look their module up while the class is being built
    _spec.loader.exec_module(install)

__all__ = ["ROOT", "NOT_LOCKED", "CONDA_NAMES", "PIP_ONLY", "freeze", "lock_header", "pins_to_keep", "too_new_for",
           "project", "requires_python", "check_python", "extras", "check_extra", "answers", "torch_index",
           "pip_args", "venv_python", "usable", "make_venv", "environment_yml", "main"]

ROOT = Path(__file__).resolve().parents[3]  # the repository (lib/lorakit/tooling/), when run from a checkout
PROBE_SECONDS = 3.0
# Left out of the lock: the installer's own tools, and the kit itself.
NOT_LOCKED = ("pip", "setuptools", "wheel", "lorakit")


# --------------------------------------------------------------------------------------- the lock

def freeze(header: str = "") -> str:
    """The running environment as a lock: every installed distribution but the kit and pip's own tools,
    `name==version`, sorted; torch without its build label (+cpu), so that a GPU machine gets the CUDA
    build of the same release from the same lock."""
    pins = {}
    for dist in install.installed():
        name = dist.metadata["Name"]
        key = install.normalize(name or "")
        if name and key not in NOT_LOCKED:
            pins[key] = (name, install.base_version(dist.version) if key == "torch" else dist.version)
    lines = [f"{name}=={version}" for _, (name, version) in sorted(pins.items())]
    return header + "\n".join(lines) + "\n"


def lock_header() -> str:
    return ("# The versions CI tested: `make lab`, `make test` and CI install exactly these (pip constraints), and\n"
            "# Colab's setup cell installs the course's stack from them. Written by `make lock`, which keeps these\n"
            "# pins unless UPGRADE names a package (or 'all'), runs the tests, then rewrites this file.\n"
            f"# Resolved on {platform.system()} {platform.machine()} with Python {platform.python_version()}.\n"
            "# torch is recorded without its build label (+cpu): a GPU machine gets the CUDA build of the same release.\n")


def pins_to_keep(upgrade: str = "", path: str | os.PathLike = install.LOCK, hold: str = "") -> str:
    """Constraints for `make lock`: the current lock minus the packages `upgrade` names (space or comma
    separated; "all" frees every package but torch: moving torch is a multi-GB download where the CPU index
    is out of reach, so it moves only when named), plus the `hold` requirements (e.g. "soupsieve<3"), which
    hold back packages whose newer releases drop a Python the kit supports."""
    held = [h for h in re.split(r"\s+", hold or "") if h]
    names = {install.normalize(n) for n in re.split(r"[,\s]+", upgrade or "") if n}
    lock = install.read_lock(path)
    unknown = sorted(names - set(lock) - {"all"})
    if unknown:
        raise install.InstallError(f"UPGRADE names {unknown}, which the lock does not pin; pinned are e.g. "
                                   f"{', '.join(sorted(lock)[:6])}, ...")
    keep = {n: v for n, v in lock.items()
            if n not in names and not ("all" in names and n != "torch")}
    return "".join(f"{n}=={v}\n" for n, v in sorted(keep.items())) + "".join(f"{h}\n" for h in held)


def too_new_for(floor: tuple[int, int]) -> list[str]:
    """Installed distributions whose Requires-Python excludes Python floor.0 (the lowest the kit supports)."""
    import importlib.metadata as md

    from packaging.specifiers import SpecifierSet
    version = f"{floor[0]}.{floor[1]}.0"
    out = []
    for dist in install.installed():
        spec = dist.metadata.get("Requires-Python")
        name = install.normalize(dist.metadata["Name"])
        if spec and name not in NOT_LOCKED and not SpecifierSet(spec).contains(version):
            out.append(f"{dist.metadata['Name']} {dist.version} (Python {spec})")
    return sorted(out)


# ---------------------------------------------------------------------------------- the project file

def project(root: Path = ROOT) -> dict:
    """pyproject.toml's [project] table (Python 3.11+: tomllib)."""
    import tomllib
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]


def requires_python(root: Path = ROOT) -> tuple[int, int]:
    """The lowest Python the kit supports, from pyproject.toml's `requires-python = ">=3.X"` (read without
    tomllib, which older Pythons lack: this runs to tell them they are too old)."""
    m = re.search(r'^requires-python\s*=\s*">=\s*(\d+)\.(\d+)"', (root / "pyproject.toml").read_text(), re.M)
    if not m:
        raise install.InstallError("pyproject.toml: requires-python must read \">=3.X\"")
    return int(m.group(1)), int(m.group(2))


def check_python(version: tuple = tuple(sys.version_info[:3]), root: Path = ROOT, python: str = "python3") -> None:
    need = requires_python(root)
    if tuple(version[:2]) < need:
        have = ".".join(map(str, version))
        raise install.InstallError(f"lorakit needs Python {need[0]}.{need[1]} or newer, and {python} is {have}: "
                                   f"install a newer Python and run make with it, e.g. "
                                   f"`make lab PYTHON=python{need[0]}.{need[1]}`")


def extras(root: Path = ROOT) -> list[str]:
    return list(project(root).get("optional-dependencies", {}))


def check_extra(extra: str, root: Path = ROOT) -> None:
    known = extras(root)
    if extra not in known:
        raise install.InstallError(f"unknown extra {extra!r}: choose one of {', '.join(known)} (pyproject.toml, "
                                   "[project.optional-dependencies])")


# ------------------------------------------------------------------------------------ torch's build

def answers(url: str, timeout: float = PROBE_SECONDS) -> tuple[bool, str]:
    """Does `url` answer with HTTP 200 within `timeout` seconds, name lookup included? (urllib's own timeout
    does not cover a hanging DNS lookup, so the request runs in a thread that is given up on.)"""
    import urllib.request

    result: list = []

    def probe():
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                result.append((r.status == 200, f"HTTP {r.status}"))
        except Exception as e:  # noqa: BLE001 - any failure means "not usable now"
            result.append((False, str(getattr(e, "reason", e))))

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else (False, f"no answer within {timeout:g} s")


def torch_index(pip_args: list[str] = (), timeout: float = PROBE_SECONDS) -> tuple[str | None, str]:
    """(index URL to add, or None; why). The CPU index only where pip's default torch would be the wrong
    build: Linux or Windows without an NVIDIA GPU (PyPI's Linux torch is the CUDA build, ~2.5 GB of CUDA
    libraries). macOS wheels on PyPI are the CPU/MPS build already."""
    if any("index-url" in a or "find-links" in a or a == "--no-index" for a in pip_args):
        return None, "PIP_ARGS sets the package indexes: using those"
    if install.has_nvidia_gpu():
        return None, "an NVIDIA GPU is present: pip's default torch (the CUDA build)"
    if sys.platform == "darwin":
        return None, "macOS: PyPI's torch is the CPU/MPS build"
    ok, why = answers(f"{install.CPU_INDEX}/torch/", timeout)
    if ok:
        return install.CPU_INDEX, f"no NVIDIA GPU: the CPU build of torch from {install.CPU_INDEX}"
    return None, (f"no NVIDIA GPU, but PyTorch's CPU index ({install.CPU_INDEX}) did not answer ({why}): installing "
                  "the torch pip finds, which on Linux may be the CUDA build (a larger download; it runs on the CPU "
                  "too). For the CPU build later: rm -rf .venv and run make again once the index answers")


def pip_args(lock: str | os.PathLike = install.LOCK, user_args: list[str] = (),
             timeout: float = PROBE_SECONDS) -> tuple[list[str], str]:
    """The arguments `make` gives pip besides the requirement: the lock as constraints, the CPU index when
    `torch_index` says so, then the user's PIP_ARGS. Returns (args, why) for the torch line."""
    index, why = torch_index(list(user_args), timeout)
    args = ["-c", str(lock)]
    if index:
        args += ["--extra-index-url", index]
    return args + list(user_args), why


# --------------------------------------------------------------------------------------- the venv

def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def usable(venv: Path) -> bool:
    """A venv whose Python runs and has pip (one left half-made by an interrupted `python -m venv` has not)."""
    py = venv_python(venv)
    if not py.exists():
        return False
    try:
        return subprocess.run([str(py), "-c", "import pip"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _pip(py: Path, args: list[str], what: str) -> None:
    res = subprocess.run([str(py), "-m", "pip", *args], stderr=subprocess.PIPE, text=True)
    if res.stderr:
        sys.stderr.write(res.stderr)
    if res.returncode != 0:
        raise install.InstallError(f"pip could not {what} (its message is above); nothing was marked installed, so the "
                                   f"next make tries again: {_hint(res.stderr)}")


def _hint(pip_output: str) -> str:
    text = pip_output.lower()
    if "no matching distribution found for torch" in text:
        return ("no torch build in the tested range (pyproject.toml) exists for this Python/platform or index; "
                "use a Python the range supports, or PIP_ARGS to point pip at an index that has it")
    if "resolutionimpossible" in text or "conflict" in text:
        return ("the lock and pyproject.toml disagree: run `make lock` (add UPGRADE=<package> to move a pin), "
                "or undo the change to pyproject.toml")
    if "connection" in text or "network" in text or "timed out" in text or "name resolution" in text:
        return "a package index did not answer: check the network (or PIP_ARGS) and run make again"
    return "fix what pip reports and run make again"


def make_venv(venv: str | os.PathLike, extra: str, lock: str | os.PathLike = install.LOCK, user_args: list[str] = (),
              root: Path = ROOT, python: str = "python3", kit: str | os.PathLike | None = None) -> Path:
    """Create (or repair) `venv` and install the kit with `extra` at the tested versions: editable from the
    checkout at `root`, or from the wheel `kit` (what a Gradescope autograder's setup.sh installs; `root` then
    only holds pyproject.toml)."""
    check_python(python=python, root=root)
    check_extra(extra, root)
    venv, lock = Path(venv), Path(lock)
    if not lock.is_file():
        raise install.InstallError(f"the lock {lock} is missing: restore it (git checkout -- {lock}) or run "
                                   "`make lock`")
    if not usable(venv):
        if venv.exists():
            install.say(f"{venv} is incomplete (no working Python with pip): making it again")
        res = subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], capture_output=True, text=True)
        if res.returncode != 0:
            sys.stderr.write(res.stderr)
            raise install.InstallError(f"`{python} -m venv` failed (above); on Debian/Ubuntu install the venv "
                                       f"module first: sudo apt install "
                                       f"python{sys.version_info[0]}.{sys.version_info[1]}-venv")
    args, why = pip_args(lock, user_args)
    install.say(f"torch: {why}")
    install.say(f"installing lorakit[{extra}] at the tested versions ({lock.name}) into {venv}: a few minutes the "
                "first time")
    py = venv_python(venv)
    _pip(py, ["install", "--quiet", "--upgrade", "pip", *user_args], "upgrade pip in the new environment")
    if kit is not None:
        kit = Path(kit).resolve()
        if not kit.is_file():
            raise install.InstallError(f"the kit's wheel {kit} is missing")
        target = [f"lorakit[{extra}] @ {kit.as_uri()}"]
    else:
        target = ["-e", f"{root}[{extra}]"]
    _pip(py, ["install", "--quiet", *args, *target], f"install lorakit[{extra}]")
    res = subprocess.run([str(py), "-m", "lorakit.install", "verify"], text=True)
    if res.returncode != 0:
        raise install.InstallError("the installed stack failed its verification (above)")
    return venv


# ------------------------------------------------------------------------------------ environment.yml

# pip name -> conda-forge name, where they differ.
CONDA_NAMES = {"torch": "pytorch"}
# Left to pip (PyPI has wheels for Linux, macOS and Windows): conda-forge builds bitsandbytes for linux-64 only.
PIP_ONLY = ("bitsandbytes",)


def environment_yml(root: Path = ROOT, lock: str | os.PathLike = install.LOCK) -> str:
    """environment.yml for conda/mamba: the learner's dependencies and JupyterLab from conda-forge within
    pyproject.toml's ranges, Python at the tested minor version, then the kit itself through pip."""
    from packaging.requirements import Requirement
    proj = project(root)
    python = _locked_python(lock)
    reqs = [Requirement(r) for r in proj["dependencies"] + proj["optional-dependencies"]["lab"]
            if install.normalize(Requirement(r).name) not in PIP_ONLY]
    lines = ["# conda / mamba: `conda env create -f environment.yml`, `conda activate lorakit`, then `jupyter lab`.",
             "# Generated from pyproject.toml by `make lock` (python lib/lorakit/tooling/bootstrap.py environment);",
             "# tests/test_install.py fails when the two differ. conda-forge's pytorch is the CUDA build where an",
             "# NVIDIA driver is present and the CPU build elsewhere; `lorakit env` shows how the versions conda",
             "# chose compare with the tested ones (lib/lorakit/tested.txt). bitsandbytes comes from PyPI through",
             "# the pip line (conda-forge builds it for linux-64 only).",
             "name: lorakit",
             "channels:",
             "  - conda-forge",
             "dependencies:",
             f"  - python ={python}"]
    for r in reqs:
        name = CONDA_NAMES.get(install.normalize(r.name), install.normalize(r.name))
        spec = ",".join(sorted(str(s) for s in r.specifier))
        lines.append(f"  - {name} {spec}".rstrip())
    lines += ["  - pip", "  - pip:", "      - \"-e .[lab]\""]
    return "\n".join(lines) + "\n"


def _locked_python(lock) -> str:
    m = re.search(r"Python (\d+)\.(\d+)", Path(lock).read_text())
    return f"{m.group(1)}.{m.group(2)}" if m else "{0}.{1}".format(*requires_python())


# ------------------------------------------------------------------------------------------ command

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python lib/lorakit/tooling/bootstrap.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("venv", help="create or repair a venv and install the kit with an extra (what make runs)")
    v.add_argument("--venv", default=".venv")
    v.add_argument("--extra", default="lab")
    v.add_argument("--lock", default=str(install.LOCK))
    v.add_argument("--python-name", default="python3", help="how the user named this Python (for messages)")
    v.add_argument("--kit", help="install the kit from this wheel instead of the checkout (editable)")
    v.add_argument("--root", default=str(ROOT), help="the folder with pyproject.toml (default: the checkout)")
    v.add_argument("pip_args", nargs=argparse.REMAINDER, help="after --: extra pip arguments (make's PIP_ARGS)")
    f = sub.add_parser("freeze", help="print the running environment as a lock (make lock)")
    f.add_argument("--out", help="write here instead of printing")
    k = sub.add_parser("keep", help="print the current pins minus those UPGRADE frees, plus HOLD (make lock)")
    k.add_argument("--upgrade", default="")
    k.add_argument("--hold", default="")
    sub.add_parser("environment", help="print environment.yml, generated from pyproject.toml")
    args = p.parse_args(argv)
    try:
        if args.command == "venv":
            extra_args = [a for a in args.pip_args if a != "--"]
            make_venv(args.venv, args.extra, args.lock, extra_args, root=Path(args.root), python=args.python_name,
                      kit=args.kit)
        elif args.command == "freeze":
            floor = requires_python()
            too_new = too_new_for(floor)
            if too_new:
                raise install.InstallError(f"{', '.join(too_new)} cannot install on Python {floor[0]}.{floor[1]}.0, "
                                           f"which pyproject.toml supports: hold them back with HOLD in the Makefile "
                                           f"(e.g. HOLD=\"name<X\"), or raise requires-python")
            text = freeze(lock_header())
            if args.out:
                Path(args.out).write_text(text)
            else:
                sys.stdout.write(text)
        elif args.command == "keep":
            sys.stdout.write(pins_to_keep(args.upgrade, hold=args.hold))
        elif args.command == "environment":
            sys.stdout.write(environment_yml())
    except install.InstallError as e:
        install.say(str(e))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
