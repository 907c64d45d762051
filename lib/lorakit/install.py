"""What the running kit needs: the versions CI tested, the extras, Colab's install, and the check after an install.

The course's claims (NF4 bit-exact with bitsandbytes, LoRA equal to peft, the APIs the lessons teach) hold
for exact versions. `tested.txt`, next to this file, records the versions CI tested (pip constraints,
written by `make lock`); `make`, CI and Colab's setup cell install from it.

- `lorakit env` prints tested beside running versions (`tested()`, `out_of_range()`, `fix()`); commands that
  need an extra which is missing say which one (`require_extra`).
- `python -m lorakit.install verify` checks an environment after an install (`make` runs it in the new .venv):
  every learner dependency in range, torch the build this machine should have.
- Colab's setup cell installs the kit without dependencies, then runs `python -m lorakit.install colab`: the
  learner's dependencies, with the course's stack at its tested versions; Colab's own torch stays when it
  is in the supported range (it is a CUDA build matched to Colab's GPU).

How `make` creates .venv and how `make lock` writes tested.txt is the other question: `tooling/bootstrap.py`,
which runs before the kit is installed and imports this file as a plain module. So this file uses the standard
library only at import time (packaging is imported inside the functions that a running kit calls) and must
import on a Python too old for the kit, so that the bootstrap can say so.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["LOCK", "CPU_INDEX", "COURSE_STACK", "InstallError", "say", "normalize", "base_version", "read_lock",
           "tested", "installed", "has_nvidia_gpu", "requirements", "out_of_range", "missing_for", "require_extra",
           "fix", "verify", "colab_constraints", "colab", "main"]

LOCK = Path(__file__).resolve().parent / "tested.txt"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# The packages the lessons' claims depend on: on Colab these are installed at their tested versions (torch
# only when Colab's own is outside the supported range); everything else Colab already has is kept when it
# is in range, so the setup cell does not replace the packages Colab's own kernel runs on.
COURSE_STACK = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate", "safetensors",
                "tokenizers", "huggingface-hub")


class InstallError(Exception):
    """Something the person installing can fix; the message is one line that names the fix."""


def say(msg: str) -> None:
    print(f"lorakit install: {msg}", file=sys.stderr, flush=True)


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def base_version(version: str) -> str:
    """2.13.0+cpu -> 2.13.0: the release, without a build label such as +cpu or +cu126."""
    return version.split("+", 1)[0]


# --------------------------------------------------------------------------------------- the lock

def read_lock(path: str | os.PathLike = LOCK) -> dict[str, str]:
    """{normalized name: version} from a constraints file of `name==version` lines."""
    out = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version.strip():
            raise InstallError(f"{path}: {line!r} is not a 'name==version' line: rewrite the lock with `make lock`")
        out[normalize(name.strip())] = version.strip()
    return out


def tested(path: str | os.PathLike = LOCK) -> dict[str, str]:
    """The versions CI tested ({} when the lock is missing, e.g. in a build that left it out)."""
    try:
        return read_lock(path)
    except FileNotFoundError:
        return {}


def installed():
    """The distributions installed in this environment's site-packages (what pip lists): not the copies a
    package vendors and puts on sys.path itself (setuptools adds its _vendor folder once imported)."""
    import importlib.metadata as md
    import sysconfig
    paths = sysconfig.get_paths()
    return list(md.distributions(path=list(dict.fromkeys([paths["purelib"], paths["platlib"]]))))


# ----------------------------------------------------------------------- what a running kit has

def requirements(extra: str | None = None) -> list[str]:
    """The installed kit's requirement strings: the learner's (extra=None) or those an extra adds."""
    import importlib.metadata as md
    try:
        declared = md.requires("lorakit") or []
    except md.PackageNotFoundError:  # lib/ put on the path by hand, not installed: nothing declared
        return []
    out = []
    for req in declared:
        marker = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        if (marker.group(1) if marker else None) == extra:
            out.append(req)
    return out


def out_of_range() -> list[tuple[str, str, str]]:
    """(name, installed version, supported range) for each installed learner dependency outside the range
    the kit declares; a missing one is not listed here (pip reports those)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    bad = []
    for text in requirements():
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            bad.append((normalize(req.name), version, str(req.specifier)))
    return bad


def missing_for(extra: str) -> list[str]:
    """The distributions `extra` adds that are not installed (following extras that include other extras)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    missing, todo, seen = [], [extra], set()
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.add(e)
        for text in requirements(e):
            req = Requirement(text)
            if normalize(req.name) == "lorakit":
                todo.extend(req.extras)
                continue
            try:
                md.version(req.name)
            except md.PackageNotFoundError:
                missing.append(req.name)
    return missing


def require_extra(extra: str) -> None:
    """Raise InstallError naming the extra to install when packages it brings are missing."""
    missing = missing_for(extra)
    if missing:
        raise InstallError(f"needs {', '.join(missing)}, which {'come' if len(missing) > 1 else 'comes'} with "
                           f"lorakit[{extra}]: pip install 'lorakit[{extra}]' (in a checkout, make test installs it)")


def fix(name: str, spec: str = "") -> str:
    """The command that brings `name` back to its tested version (or into `spec` when the lock has none)."""
    pin = tested().get(normalize(name))
    return f"pip install '{name}=={pin}'" if pin else f"pip install '{name}{spec}'"


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver that lists at least one GPU (`nvidia-smi -L`)."""
    if not shutil.which("nvidia-smi"):
        return False
    try:
        res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0 and "GPU" in res.stdout


def verify() -> int:
    """After an install (`make`'s, a Gradescope autograder's): every learner dependency in range, torch the
    build this machine should have, and what differs from the tested versions. Returns the exit status: 1
    when a dependency is outside its supported range."""
    import importlib.metadata as md
    bad = out_of_range()
    for name, version, spec in bad:
        say(f"{name} {version} is outside the range lorakit supports ({spec}): {fix(name, spec)}")
    torch = md.version("torch")
    build = "CUDA" if "+cu" in torch or _requires_nvidia() else ("CPU" if "+cpu" in torch else "default")
    if build == "CUDA" and not has_nvidia_gpu() and sys.platform != "darwin":
        say(f"torch {torch} is a CUDA build on a machine without an NVIDIA GPU: it runs on the CPU, but a CPU "
            f"build is much smaller (rm -rf .venv and run make again when {CPU_INDEX} answers)")
    lock = tested()
    differ = [f"{d.metadata['Name']} {d.version} (tested {lock[normalize(d.metadata['Name'])]})"
              for d in installed()
              if normalize(d.metadata["Name"] or "") in lock
              and base_version(d.version) != lock[normalize(d.metadata["Name"])]]
    if differ:
        say(f"{len(differ)} package(s) differ from the tested versions: {', '.join(differ[:5])}")
    else:
        say(f"torch {torch} ({build} build); every locked package at its tested version")
    return 1 if bad else 0


def _requires_nvidia() -> bool:
    import importlib.metadata as md
    return any(r.startswith("nvidia-") for r in md.requires("torch") or [])


# ------------------------------------------------------------------------------------------- Colab

def colab_constraints(installed_torch: str | None, lock: dict[str, str] | None = None) -> tuple[dict[str, str], str]:
    """The pins Colab gets: the course's stack at its tested versions, without torch when Colab's own
    torch is in the supported range. Returns (pins, what happens to torch)."""
    from packaging.requirements import Requirement
    lock = tested() if lock is None else lock
    spec = next(Requirement(r).specifier for r in requirements() if normalize(Requirement(r).name) == "torch")
    pins = {n: lock[n] for n in COURSE_STACK if n in lock}
    if installed_torch and spec.contains(installed_torch, prereleases=True):
        pins.pop("torch", None)
        return pins, f"keeping Colab's torch {installed_torch} (in lorakit's range {spec})"
    why = f"Colab's torch {installed_torch} is outside lorakit's range {spec}" if installed_torch else "no torch here"
    return pins, f"{why}: installing the tested torch {lock.get('torch', spec)} (restart the session when Colab asks)"


def colab() -> int:
    """Install the learner's dependencies (run by the setup cell on Colab, after the kit itself)."""
    import importlib.metadata as md
    try:
        installed = md.version("torch")
    except md.PackageNotFoundError:
        installed = None
    pins, why = colab_constraints(installed)
    say(why)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    try:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "-c", f.name, *requirements()]
        return subprocess.run(cmd).returncode
    finally:
        os.unlink(f.name)


# ------------------------------------------------------------------------------------------ command

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lorakit.install", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    # `check`: the command's earlier name, kept so that scripts written for it keep working.
    sub.add_parser("verify", aliases=["check"], help="verify the running environment after an install")
    sub.add_parser("colab", help="on Colab: install the learner's dependencies at the tested versions")
    args = p.parse_args(argv)
    try:
        return verify() if args.command in ("verify", "check") else colab()
    except InstallError as e:
        say(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
