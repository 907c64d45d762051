"""Limits per submission: one control group holds the whole sandbox tree (the runner and every process it starts).

rlimits are per process: two children of a submission each stay under an address-space limit while together
they hold twice it, and `subprocess` children start afresh. A cgroup counts the whole tree: memory (resident
memory, page cache and the job folder's tmpfs pages together), processes and threads (pids), and CPU bandwidth
(at most `Limits.threads` CPUs at once). The kernel enforces it; the grader only creates the group, reads what
happened (an out-of-memory kill anywhere in the tree fails the submission, with the reason) and removes it.

cgroup v2 is used where the grader can enable the memory, pids and cpu controllers below its own group, else
the v1 hierarchies (memory, pids, cpu) where they are mounted writable. Neither (not root, a container without
delegation, not Linux): `available()` says why, the grade log says so once, and the per-process rlimits are
all there is. Trusted side only: the sandbox's PID 1 joins the group (writes "0" to each `cgroup.procs`)
before any learner code runs, and learner code, running as another user, cannot leave it.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CONTROLLERS = ("memory", "pids", "cpu")
PERIOD_US = 100_000                      # CPU bandwidth period


@dataclass(frozen=True)
class Hierarchy:
    version: str                         # "v2" or "v1"
    bases: dict                          # controller -> the folder our groups are made in (v2: one folder for all)
    why: str = ""

    def describe(self) -> str:
        return f"cgroup {self.version} ({', '.join(CONTROLLERS)})"


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, filesystem type, options) of every cgroup mount."""
    out = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and tail and tail[0] in ("cgroup", "cgroup2"):
            opts = set(tail[2].split(",")) if len(tail) > 2 else set()
            out.append((fields[4].replace("\\040", " "), tail[0], opts))
    return out


def _own_paths() -> dict[str, str]:
    """controller (or "" for v2) -> this process's group path, from /proc/self/cgroup."""
    out = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def _writable(folder: Path) -> bool:
    probe = folder / f"lorakit-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError:
        return False
    probe.rmdir()
    return True


def _v2(mounts, own) -> Hierarchy | None:
    for point, fstype, _ in mounts:
        if fstype != "cgroup2" or "" not in own:
            continue
        base = Path(point) / own[""].lstrip("/")
        try:
            if not set(CONTROLLERS) <= set((base / "cgroup.controllers").read_text().split()):
                continue
            if not set(CONTROLLERS) <= set((base / "cgroup.subtree_control").read_text().split()):
                (base / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS))
        except OSError:      # not ours to delegate (EBUSY: our group holds processes; EACCES: not root)
            continue
        if _writable(base):
            return Hierarchy("v2", {c: base for c in CONTROLLERS})
    return None


def _v1(mounts, own) -> Hierarchy | None:
    bases = {}
    for c in CONTROLLERS:
        point = next((p for p, fstype, opts in mounts if fstype == "cgroup" and c in opts), None)
        if point is None:
            return None
        base = Path(point) / own.get(c, "/").lstrip("/")
        if not _writable(base):
            return None
        bases[c] = base
    return Hierarchy("v1", bases)


@lru_cache(maxsize=1)
def available() -> Hierarchy:
    """The hierarchy the grader can make groups in, or a Hierarchy with version "" and the reason in `why`."""
    if not os.path.exists("/proc/self/cgroup"):
        return Hierarchy("", {}, "not Linux")
    if os.geteuid() != 0:
        return Hierarchy("", {}, "the grader is not root")
    mounts, own = _mounts(), _own_paths()
    found = _v2(mounts, own) or _v1(mounts, own)
    if found is None:
        return Hierarchy("", {}, "no cgroup hierarchy with the memory, pids and cpu controllers is writable here")
    return found


class Group:
    """One submission's group: created with its limits, joined by the sandbox's PID 1, read, then removed."""

    def __init__(self, hierarchy: Hierarchy, name: str, *, memory_mb: int, processes: int, cpus: float):
        self.hierarchy, self.name, self.memory_mb = hierarchy, name, memory_mb
        self.folders = sorted({base / name for base in hierarchy.bases.values()})
        for f in self.folders:
            f.mkdir(exist_ok=True)
        memory = str(memory_mb * 2**20)
        quota = str(max(1000, int(cpus * PERIOD_US)))
        if hierarchy.version == "v2":
            [f] = self.folders
            self._write(f, "memory.max", memory)
            self._write(f, "memory.swap.max", "0", optional=True)
            self._write(f, "memory.oom.group", "1", optional=True)   # a kill takes the whole submission
            self._write(f, "pids.max", str(processes))
            self._write(f, "cpu.max", f"{quota} {PERIOD_US}")
        else:
            mem, pids, cpu = (hierarchy.bases[c] / name for c in CONTROLLERS)
            self._write(mem, "memory.limit_in_bytes", memory)
            self._write(mem, "memory.memsw.limit_in_bytes", memory, optional=True)   # no swap beyond it
            self._write(pids, "pids.max", str(processes))
            self._write(cpu, "cpu.cfs_period_us", str(PERIOD_US))
            self._write(cpu, "cpu.cfs_quota_us", quota)

    @staticmethod
    def _write(folder: Path, name: str, value: str, optional: bool = False) -> None:
        try:
            (folder / name).write_text(value)
        except OSError:
            if not optional:
                raise

    @property
    def procs(self) -> list[str]:
        """The files PID 1 of the sandbox writes "0" to, to join (and bring everything it starts)."""
        return [str(f / "cgroup.procs") for f in self.folders]

    def oom_kills(self) -> int:
        """How many processes of the tree the kernel killed for going over the memory limit."""
        if self.hierarchy.version == "v2":
            events = self.folders[0] / "memory.events"
        else:
            events = self.hierarchy.bases["memory"] / self.name / "memory.oom_control"
        try:
            for line in events.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def _pids(self) -> set[int]:
        out = set()
        for f in self.folders:
            try:
                out |= {int(p) for p in (f / "cgroup.procs").read_text().split()}
            except (OSError, ValueError):
                pass
        return out

    def remove(self, wait: float = 5.0) -> None:
        """Kill whatever is still in the group, then remove it (a group can only be removed empty)."""
        deadline = time.monotonic() + wait
        while True:
            pids = self._pids()
            if not pids or time.monotonic() > deadline:
                break
            if self.hierarchy.version == "v2":
                self._write(self.folders[0], "cgroup.kill", "1", optional=True)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.05)
        for f in self.folders:
            for _ in range(20):
                try:
                    f.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:      # EBUSY for a moment while the last process is reaped
                    time.sleep(0.05)
