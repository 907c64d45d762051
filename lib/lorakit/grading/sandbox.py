"""The grading sandbox: one learner's code, cut off from everything it has no business touching.

On Linux, as root, each submission runs under `unshare` in fresh network, mount, PID, IPC and UTS
namespaces (no kit beyond the kernel is needed):

- no network: the new network namespace has no interfaces up;
- a private view of the filesystem: tmpfs is mounted over the course folder and its parent, /tmp, /home,
  /root, /run, the submissions and the output folders; only the Python installation, the kit's library
  (read-only) and this submission's job folder (writable) are bound back in. The instructor's solutions,
  hidden tests, gradebook and other students' work are simply not there;
- a PID namespace: the learner cannot see or signal the grader, and every process the submission started
  dies with it;
- a separate user id per worker (61000 + slot), `no_new_privs`, and rlimits on address space, processes,
  file size, open files and CPU time.

Not root, or no `unshare`: the same code runs with what is available (user namespaces, else rlimits only;
as root in a container that forbids namespaces, its own uid and rlimits), and `Protections.describe()` says
which protections are off. This module is also the sandbox's entry
point: `python -m lorakit.grading.sandbox SPEC RFD WFD` sets the sandbox up (as PID 1 of the namespace),
forks the runner (sandboxed.py) with lowered privileges, reaps everything, and exits with the runner's
status. What runs in here never decides a grade: verdicts are the grader's (judge.py), on data.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

UID_BASE = 61000
EXIT_MEMORY = 75        # the runner itself ran out of memory
EXIT_INTERNAL = 70      # the runner failed (a grader bug, or learner code broke the runner)


@dataclass
class Limits:
    memory_mb: int = 4096          # address space (RLIMIT_AS)
    processes: int = 256           # processes and threads of the sandbox user (RLIMIT_NPROC)
    file_size_mb: int = 64         # largest file the submission may write (RLIMIT_FSIZE)
    open_files: int = 1024
    cpu_seconds: int = 0           # 0: the submission timeout plus a margin
    threads: int = 1               # OMP/MKL threads per submission (workers run side by side)


@dataclass
class Protections:
    namespaces: bool = False       # network, mount, PID namespaces via unshare
    user_namespace: bool = False   # the namespaces live in a user namespace (not root)
    separate_user: bool = False    # each worker runs as its own uid
    rlimits: bool = False

    @property
    def network(self) -> bool:
        return self.namespaces

    @property
    def filesystem(self) -> bool:
        return self.namespaces

    def off(self) -> list[str]:
        out = []
        if not self.network:
            out.append("network isolation")
        if not self.filesystem:
            out.append("private filesystem (hidden tests, gradebook and other students' work are readable)")
        if not self.namespaces:
            out.append("PID namespace")
        if not self.separate_user:
            out.append("separate user id")
        if not self.rlimits:
            out.append("resource limits")
        return out

    def describe(self, limits: Limits | None = None) -> str:
        on = []
        if self.namespaces:
            on.append("no network, private filesystem, PID namespace" + (" (user namespace)" if self.user_namespace else ""))
        if self.separate_user:
            on.append("separate user per worker")
        if self.rlimits and limits:
            on.append(f"limits: memory {limits.memory_mb} MB, {limits.processes} processes, files {limits.file_size_mb} MB")
        line = "sandbox: " + ("; ".join(on) if on else "none")
        off = self.off()
        if off:
            line += "\nsandbox protections OFF: " + "; ".join(off)
        return line


UNSHARE = ["--net", "--mount", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]


@lru_cache(maxsize=1)
def detect() -> Protections:
    """Which protections this machine allows (probed once by running `unshare ... true`)."""
    p = Protections()
    if os.name != "posix" or not sys.platform.startswith("linux"):
        p.rlimits = os.name == "posix"
        return p
    p.rlimits = True
    exe = shutil.which("unshare")
    if not exe:
        p.separate_user = os.geteuid() == 0
        return p

    def probe(extra):
        try:
            return subprocess.run([exe, *extra, *UNSHARE, "true"], capture_output=True, timeout=20).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False
    if os.geteuid() == 0 and probe([]):
        p.namespaces = p.separate_user = True
    elif probe(["--user", "--map-root-user"]):
        p.namespaces = p.user_namespace = True
    elif os.geteuid() == 0:  # a container that forbids namespaces (Gradescope's, Docker's default): a uid still works
        p.separate_user = True
    return p


class Sandbox:
    """Spawns runners under the available protections. `enabled=False` runs them as plain child processes
    (what `lorakit check` does on a learner's own machine)."""

    def __init__(self, limits: Limits | None = None, *, enabled: bool = True, hide: list[Path] | None = None,
                 keep: list[Path] | None = None, timeout: float = 600):
        self.limits = limits or Limits()
        self.protections = detect() if enabled else Protections(rlimits=os.name == "posix")
        self.enabled = enabled
        self.timeout = timeout
        self.hide = [Path(p).resolve() for p in (hide or [])]
        self.keep = [Path(p).resolve() for p in (keep or [])]
        self._slots: dict[int, int] = {}
        self._lock = threading.Lock()

    def _slot(self) -> int:
        with self._lock:
            return self._slots.setdefault(threading.get_ident(), len(self._slots))

    def _box(self, jobdir: Path) -> dict:
        import lorakit
        lib = Path(lorakit.__file__).resolve().parent.parent
        keep = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), lib, Path(sys.executable).resolve().parent, *self.keep}
        home = Path(os.path.expanduser("~")).resolve()
        hide = {Path(p) for p in ("/tmp", "/var/tmp", "/home", "/root", "/run", "/dev/shm", "/srv", "/mnt", "/media")}
        hide |= {home, *self.hide}
        uid = UID_BASE + self._slot() if self.protections.separate_user else None
        limits = asdict(self.limits)
        if not limits["cpu_seconds"]:
            limits["cpu_seconds"] = int(self.timeout * max(1, self.limits.threads) + 30)
        env = {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
            "HOME": str(jobdir), "TMPDIR": str(jobdir / "tmp"), "USER": "student", "LOGNAME": "student",
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "MPLBACKEND": "Agg", "MPLCONFIGDIR": str(jobdir / "tmp"),
            "IPYTHONDIR": str(jobdir / "tmp" / "ipython"), "XDG_CACHE_HOME": str(jobdir / "tmp" / "cache"),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1",
            "OMP_NUM_THREADS": str(self.limits.threads), "MKL_NUM_THREADS": str(self.limits.threads),
            "LORAKIT_STATIC": "1", "PYTHONHASHSEED": "0",
        }
        return {"namespaces": self.protections.namespaces, "uid": uid, "limits": limits, "env": env,
                "rlimits": self.protections.rlimits and self.enabled,
                "hide": sorted(map(str, hide)), "keep_ro": sorted(map(str, keep)), "keep_rw": [str(jobdir)],
                "jobdir": str(jobdir)}

    def spawn(self, spec: dict, jobdir: Path, rfd: int, wfd: int) -> subprocess.Popen:
        jobdir = Path(jobdir).resolve()
        spec = dict(spec, sandbox=self._box(jobdir))
        spec_path = jobdir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        uid = spec["sandbox"]["uid"]
        if uid is not None:
            for p in [jobdir, *jobdir.rglob("*")]:
                os.chown(p, uid, uid)
            os.chmod(spec_path, 0o400)
            os.chown(spec_path, 0, 0)  # the spec (limits) is root's; the runner reads it before dropping privileges
        cmd = [sys.executable, "-m", "lorakit.grading.sandbox", str(spec_path), str(rfd), str(wfd)]
        if self.protections.namespaces and self.enabled:
            extra = ["--user", "--map-root-user"] if self.protections.user_namespace else []
            cmd = [shutil.which("unshare"), *extra, *UNSHARE, *cmd]
        log = open(jobdir / "runner.log", "wb")
        try:
            return subprocess.Popen(cmd, pass_fds=(rfd, wfd), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, cwd=str(jobdir),
                                    env=dict(spec["sandbox"]["env"]))
        finally:
            log.close()

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    @staticmethod
    def explain_exit(code: int | None, where: str) -> tuple[str, str]:
        """(reason, detail) for a runner that ended without finishing the notebook."""
        if code is None:
            return "crashed", f"the grading process did not exit (at {where})"
        sig = -code if code < 0 else (code - 128 if code > 128 else 0)
        if code == EXIT_MEMORY or sig == signal.SIGKILL:
            return "resource limit", f"the submission ran out of memory (at {where})"
        if sig == signal.SIGXCPU:
            return "resource limit", f"the submission used up its CPU time (at {where})"
        if sig == signal.SIGXFSZ:
            return "resource limit", f"the submission wrote a file larger than the limit (at {where})"
        if sig:
            return "crashed", f"the Python process crashed with signal {signal.Signals(sig).name} (at {where})"
        if code == EXIT_INTERNAL:
            return "crashed", f"the grading process failed (at {where}); see runner.log in the job folder"
        return "crashed", f"the notebook ended the grading process with exit code {code} (at {where}), e.g. os._exit()"


# ------------------------------------------------------------------------------- inside the namespace

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18


def _mount(libc, src, target, fstype, flags, data=None):
    import ctypes
    rc = libc.mount(src.encode() if src else None, str(target).encode(), fstype.encode() if fstype else None,
                    ctypes.c_ulong(flags), data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} on {target}: {os.strerror(err)}")


def _maximal(paths: list[Path]) -> list[Path]:
    paths = sorted(set(paths), key=lambda p: len(p.parts))
    out: list[Path] = []
    for p in paths:
        if not any(p == q or p.is_relative_to(q) for q in out):
            out.append(p)
    return out


def _private_filesystem(box: dict) -> None:
    """Hide what the learner must not see; bind back what the runner needs (see the module docstring)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    hide = _maximal([Path(p) for p in box["hide"] if Path(p).is_dir()])
    keeps = [(Path(p), True) for p in box["keep_ro"]] + [(Path(p), False) for p in box["keep_rw"]]
    fds = []
    for path, ro in keeps:
        if any(path == h or path.is_relative_to(h) for h in hide) and path.is_dir():
            fds.append((path, ro, os.open(path, os.O_PATH | os.O_DIRECTORY)))
    for h in hide:
        _mount(libc, "tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64m")
    for path, ro, fd in sorted(fds, key=lambda t: len(t[0].parts)):
        path.mkdir(parents=True, exist_ok=True)
        _mount(libc, f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        if ro:
            _mount(libc, None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)
    # the job folder (writable) shows nothing of its neighbours: its parents are fresh tmpfs directories


def _lower_privileges(box: dict) -> None:
    import resource
    lim = box["limits"]
    if box["rlimits"]:
        mb = 1024 * 1024
        settings = [(resource.RLIMIT_AS, lim["memory_mb"] * mb), (resource.RLIMIT_FSIZE, lim["file_size_mb"] * mb),
                    (resource.RLIMIT_NOFILE, lim["open_files"]), (resource.RLIMIT_CORE, 0),
                    (resource.RLIMIT_CPU, lim["cpu_seconds"])]
        if box["uid"] is not None:  # per-user process counts only make sense for a user of its own
            settings.append((resource.RLIMIT_NPROC, lim["processes"]))
        for which, value in settings:
            _, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            # CPU: the soft limit sends SIGXCPU (reported as a resource limit), the hard one kills 5 s later
            resource.setrlimit(which, (value, value + 5 if which == resource.RLIMIT_CPU and hard == resource.RLIM_INFINITY else value))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails with EFBIG instead of killing
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid escalation
    except Exception:
        pass
    if box["uid"] is not None:
        os.setgroups([])
        os.setgid(box["uid"])
        os.setuid(box["uid"])
    os.umask(0o077)
    os.environ.clear()
    os.environ.update(box["env"])
    os.chdir(box["jobdir"])


def main(argv: list[str]) -> int:
    spec_path, rfd, wfd = argv[0], int(argv[1]), int(argv[2])
    with open(spec_path) as f:
        spec = json.load(f)
    box = spec["sandbox"]
    if box["namespaces"]:
        _private_filesystem(box)
    os.chdir(box["jobdir"])  # never keep a working directory from before the mounts
    pid = os.fork()
    if pid == 0:
        code = EXIT_INTERNAL
        try:
            _lower_privileges(box)
            from . import sandboxed
            code = sandboxed.execute(spec, rfd, wfd)
        except MemoryError:
            code = EXIT_MEMORY
        except BaseException:  # noqa: BLE001
            import traceback
            try:
                traceback.print_exc()
            except BaseException:  # noqa: BLE001
                pass
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            pass
        os._exit(code)
    os.close(rfd)
    os.close(wfd)
    result = EXIT_INTERNAL
    while True:  # PID 1 of the namespace: reap every orphan until the runner is gone
        try:
            p, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if p == pid:
            code = os.waitstatus_to_exitcode(status)
            result = code if code >= 0 else 128 - code
            break
    return result


if __name__ == "__main__":
    os._exit(main(sys.argv[1:]))
