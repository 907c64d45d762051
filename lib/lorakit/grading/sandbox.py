"""The grading sandbox: one learner's code, cut off from everything it has no business touching.

On Linux, as root, each submission runs under `unshare` in fresh network, mount, PID, IPC and UTS
namespaces (no kit beyond the kernel is needed):

- no network: the new network namespace has only its own loopback up (processes of one submission can
  meet on 127.0.0.1; nothing outside the namespace is reachable);
- a private view of the filesystem: tmpfs is mounted over the course folder and its parent, /tmp, /home,
  /root, /run, the submissions and the output folders; only the Python installation, the kit's library
  (read-only) and this submission's job folder (writable) are bound back in. The instructor's solutions,
  hidden tests, gradebook and other students' work are simply not there;
- a PID namespace: the learner cannot see or signal the grader, and every process the submission started
  dies with it;
- a separate user id per worker (61000 + slot), `no_new_privs`, and rlimits on address space, processes,
  file size, open files and CPU time;
- limits per submission, not per process: the whole tree of the submission's processes in one cgroup
  (memory, processes, CPU: cgroup.py), the job folder a tmpfs of `Limits.disk_mb` (its pages count as the
  submission's memory too), and every process of the tree niced (the runner and all it starts, however it
  starts them). Going over the memory or the disk budget fails the submission with the reason.

Not root, or no `unshare`: the same code runs with what is available (user namespaces, else rlimits only;
as root in a container that forbids namespaces, its own uid and rlimits), and `Protections.describe()` says
which protections are off (the grade log says it once per run). This module is also the sandbox's entry
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
EXIT_DISK = 73          # PID 1 stopped the submission: its job folder was full
NICE = 10               # the niceness of every process of a submission (fork()ed copies: 19)
DISK_SLACK = 64 * 1024  # bytes left free in the job folder's tmpfs that count as "full"


@dataclass
class Limits:
    memory_mb: int = 4096          # address space (RLIMIT_AS)
    processes: int = 256           # processes and threads of the sandbox user (RLIMIT_NPROC)
    file_size_mb: int = 64         # largest file the submission may write (RLIMIT_FSIZE)
    open_files: int = 1024
    cpu_seconds: int = 0           # 0: the submission timeout plus a margin
    threads: int = 1               # OMP/MKL threads per submission (workers run side by side); with a cgroup,
                                   # also the CPUs the whole submission may use at once
    disk_mb: int = 512             # the job folder (a tmpfs) holds at most this much


@dataclass
class Protections:
    namespaces: bool = False       # network, mount, PID namespaces via unshare
    user_namespace: bool = False   # the namespaces live in a user namespace (not root)
    separate_user: bool = False    # each worker runs as its own uid
    rlimits: bool = False
    cgroup: str = ""               # "v2" or "v1": memory, processes and CPU limited per submission
    cgroup_why: str = ""           # why there is none

    @property
    def disk(self) -> bool:
        return self.namespaces    # the job folder is a size-capped tmpfs inside the mount namespace

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
        if not self.cgroup:
            out.append(f"limits per submission ({self.cgroup_why or 'no cgroup'}): memory and processes are "
                       "limited per process only")
        if not self.disk:
            out.append("disk budget per submission (only the size of each file is limited)")
        return out

    def describe(self, limits: Limits | None = None) -> str:
        on = []
        if self.namespaces:
            on.append("no network, private filesystem, PID namespace" + (" (user namespace)" if self.user_namespace else ""))
        if self.separate_user:
            on.append("separate user per worker")
        if self.rlimits and limits:
            on.append(f"limits per process: address space {limits.memory_mb} MB, files {limits.file_size_mb} MB")
        if self.cgroup and limits:
            on.append(f"limits per submission (cgroup {self.cgroup}): memory {limits.memory_mb} MB, "
                      f"{limits.processes} processes, {limits.threads} CPU(s)")
        if self.disk and limits:
            on.append(f"job folder {limits.disk_mb} MB (tmpfs)")
        on.append(f"nice {NICE}")
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
        p.cgroup_why = "not Linux"
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
    from lorakit.grading import cgroup
    found = cgroup.available()
    p.cgroup, p.cgroup_why = found.version, found.why
    return p


class Sandbox:
    """Spawns runners under the available protections. `enabled=False` runs them as plain child processes
    (what `lorakit check` does on a learner's own machine)."""

    def __init__(self, limits: Limits | None = None, *, enabled: bool = True, hide: list[Path] | None = None,
                 keep: list[Path] | None = None, timeout: float = 600, kit: Path | None = None):
        self.limits = limits or Limits()
        self.protections = detect() if enabled else Protections(rlimits=os.name == "posix")
        self.enabled = enabled
        self.timeout = timeout
        self.hide = [Path(p).resolve() for p in (hide or [])]
        self.keep = [Path(p).resolve() for p in (keep or [])]
        # the kit as the sandbox sees it (withheld.build: the graded lesson's answers stubbed), mounted over the
        # installed package; None: the package as installed
        self.kit = Path(kit).resolve() if kit is not None and self.protections.namespaces and enabled else None
        self._slots: dict[int, int] = {}
        self._groups: dict[int, object] = {}     # runner pid -> its cgroup.Group
        self._spawned = 0
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
                "rlimits": self.protections.rlimits and self.enabled, "nice": NICE if self.enabled else 0,
                "disk_mb": self.limits.disk_mb if self.protections.disk and self.enabled else 0, "cgroup_procs": [],
                "hide": sorted(map(str, hide)), "keep_ro": sorted(map(str, keep)), "keep_rw": [str(jobdir)],
                "kit": [str(self.kit), str(Path(lorakit.__file__).resolve().parent)] if self.kit else None,
                "jobdir": str(jobdir)}

    def spawn(self, spec: dict, jobdir: Path, rfd: int, wfd: int) -> subprocess.Popen:
        jobdir = Path(jobdir).resolve()
        spec = dict(spec, sandbox=self._box(jobdir))
        group = None
        if self.enabled and self.protections.cgroup:
            from lorakit.grading import cgroup
            with self._lock:
                self._spawned += 1
                name = f"lorakit-{os.getpid()}-{self._spawned}"
            group = cgroup.Group(cgroup.available(), name, memory_mb=self.limits.memory_mb,
                                 processes=self.limits.processes, cpus=self.limits.threads)
            spec["sandbox"]["cgroup_procs"] = group.procs
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
            proc = subprocess.Popen(cmd, pass_fds=(rfd, wfd), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, cwd=str(jobdir),
                                    env=dict(spec["sandbox"]["env"]))
        except BaseException:
            if group is not None:
                group.remove()
            raise
        finally:
            log.close()
        if group is not None:
            with self._lock:
                self._groups[proc.pid] = group
        return proc

    def finish(self, proc: subprocess.Popen, code: int | None) -> tuple[str, str] | None:
        """After the runner ended (`code`, its exit status): (reason, detail) when the submission went over a
        budget of the whole submission (the job folder filled, a process of the tree killed for memory), else
        None. Removes the submission's cgroup."""
        with self._lock:
            group = self._groups.pop(proc.pid, None)
        oom = 0
        if group is not None:
            oom = group.oom_kills()
            group.remove()
        if code == EXIT_DISK:
            return "resource limit", f"the submission filled its job folder ({self.limits.disk_mb} MB)"
        if oom:
            return "resource limit", (f"the submission's processes together used more than {self.limits.memory_mb} MB "
                                      f"of memory (the kernel stopped {oom} of them)")
        return None

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

    def explain_exit(self, code: int | None, where: str, jobdir: Path | None = None) -> tuple[str, str]:
        """(reason, detail) for a runner that ended without finishing the notebook; a failure of the grading
        process itself quotes the end of its runner.log (the job folder is removed after grading)."""
        if code is None:
            return "crashed", f"the grading process did not exit (at {where})"
        sig = -code if code < 0 else (code - 128 if code > 128 else 0)
        if code == EXIT_DISK:
            return "resource limit", f"the submission filled its job folder ({self.limits.disk_mb} MB) (at {where})"
        if code == EXIT_MEMORY or sig == signal.SIGKILL:
            return "resource limit", f"the submission ran out of memory (at {where})"
        if sig == signal.SIGXCPU:
            return "resource limit", f"the submission used up its CPU time (at {where})"
        if sig == signal.SIGXFSZ:
            return "resource limit", f"the submission wrote a file larger than the limit (at {where})"
        if sig:
            return "crashed", f"the Python process crashed with signal {signal.Signals(sig).name} (at {where})"
        if code == EXIT_INTERNAL:
            tail = ""
            try:
                lines = (Path(jobdir) / "runner.log").read_text(errors="replace").strip().splitlines() if jobdir else []
                tail = ": " + " | ".join(lines[-3:])[-600:] if lines else ""
            except OSError:
                pass
            return "crashed", f"the grading process failed (at {where}){tail}"
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
    if box.get("kit"):  # the kit without the graded lesson's answers, over the installed package (mounted last)
        view, package = box["kit"]
        fds.append((Path(package), True, os.open(view, os.O_PATH | os.O_DIRECTORY)))
    for h in hide:
        _mount(libc, "tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64m")
    for path, ro, fd in sorted(fds, key=lambda t: len(t[0].parts)):
        path.mkdir(parents=True, exist_ok=True)
        _mount(libc, f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        if ro:
            _mount(libc, None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)
    # the job folder (writable) shows nothing of its neighbours: its parents are fresh tmpfs directories
    if box["disk_mb"]:  # ...and it is a tmpfs of its own, as large as the disk budget
        uid = box["uid"]
        owner = f",uid={uid},gid={uid}" if uid is not None else ""
        _mount(libc, "tmpfs", box["jobdir"], "tmpfs", MS_NOSUID | MS_NODEV, f"mode=700,size={box['disk_mb']}m{owner}")
        tmp = Path(box["jobdir"]) / "tmp"
        tmp.mkdir(mode=0o700)
        if uid is not None:
            os.chown(tmp, uid, uid)


def _loopback_up() -> None:
    """The namespace's own loopback, up: a lesson that runs several processes (lesson 08's data-parallel step)
    meets them on 127.0.0.1. It is this namespace's loopback, not the machine's: nothing outside is reachable."""
    import fcntl
    import socket
    import struct
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH", b"lo", 0)))[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))
    except OSError:
        pass   # without it, only lessons that talk over localhost fail, and say so


def _join_group(box: dict) -> None:
    """Join the submission's cgroup (made by the grader) and lower the priority: everything the runner starts,
    however it starts it, inherits both; a process of another user cannot leave the group or raise its
    priority again."""
    for procs in box["cgroup_procs"]:
        with open(procs, "w") as f:
            f.write("0")
    if box["nice"]:
        os.nice(box["nice"])


def _full(jobdir: str) -> bool:
    st = os.statvfs(jobdir)
    return st.f_bavail * st.f_frsize <= DISK_SLACK


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
    _join_group(box)
    if box["namespaces"]:
        _private_filesystem(box)
        _loopback_up()
    os.chdir(box["jobdir"])  # never keep a working directory from before the mounts
    pid = os.fork()
    if pid == 0:
        code = EXIT_INTERNAL
        try:
            _lower_privileges(box)
            from lorakit.grading import sandboxed
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
    # PID 1 of the namespace: reap every orphan until the runner is gone, and stop the whole submission when
    # its job folder is full (it is a tmpfs of the disk budget; kill(-1) reaches only this namespace's processes)
    watch = bool(box["disk_mb"]) and os.getpid() == 1
    if watch:  # woken at once when a child ends (blocked here only: the runner was forked with the default mask)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    while True:
        try:
            p, status = os.waitpid(-1, os.WNOHANG if watch else 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if p == 0:
            if result != EXIT_DISK and _full(box["jobdir"]):
                result = EXIT_DISK
                os.kill(-1, signal.SIGKILL)
            signal.sigtimedwait({signal.SIGCHLD}, 0.1)
            continue
        if p == pid and result != EXIT_DISK:
            code = os.waitstatus_to_exitcode(status)
            result = EXIT_DISK if watch and _full(box["jobdir"]) else code if code >= 0 else 128 - code
            break
    return result


if __name__ == "__main__":
    os._exit(main(sys.argv[1:]))
