"""The environment check: which device, which compute dtype, does 4-bit quantization work here.

Lesson 00 prints `report()`; every later lesson prints `versions()` in its setup cell so a learner (and
whoever helps them) can see what the notebook ran with.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as md
import os
import platform
import shutil
import threading
import time
from dataclasses import dataclass

import torch

from lorakit import install

__all__ = ["INSTRUCTOR_TOOLS", "pick_device", "cpu_capabilities", "avx512_bf16", "cpu_bf16", "cpu_class",
           "bf16_matmul_times", "bf16_supported", "compute_dtype", "check_dtype", "versions", "tested_versions",
           "differs", "print_versions", "scoped_environ", "import_bitsandbytes", "four_bit_works", "memory_available",
           "Line", "version_lines", "checklist", "report"]

# What the lessons run on (the learner's install), then what only instructors install (lorakit[instructor]).
STACK = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate",
         "papermill", "ipywidgets", "matplotlib", "tqdm")
INSTRUCTOR_TOOLS = ("nbgrader", "jupyterlab")
REQUIRED = ("torch", "transformers", "peft", "bitsandbytes", "datasets")


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else is checked and returned as a torch.device."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but no CUDA GPU is visible here: use DEVICE='auto' or 'cpu'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} was asked for but Apple's MPS is not available: use DEVICE='auto' or 'cpu'")
    return dev


# oneDNN's names (ONEDNN_MAX_CPU_ISA) of the instruction sets at or above the first with bf16 dot products
# (AVX512_CORE_BF16); a cap below them makes oneDNN emulate bf16 even on a CPU that has the instructions.
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                     "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2",
                     "ALL", "DEFAULT")


def cpu_capabilities() -> dict:
    """The CPU's instruction set extensions as the CPU itself reports them (cpuid through torch's cpuinfo):
    what the chip has, whatever oneDNN or ATen have been told to use."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        return dict(caps())
    out = {}  # older torch: only the flags it has accessors for
    for name, probe in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported")):
        with contextlib.suppress(Exception):
            out[name] = bool(getattr(torch.cpu, probe)())
    return out


def avx512_bf16() -> bool:
    """Whether this CPU has the AVX512-BF16 instructions. bitsandbytes asks the same question (its own
    `has_avx512bf16`) to decide whether a 4-bit layer repacks its weight for its CPU inference kernel
    (`lorakit.models.CPU_REPACK_FLAG`)."""
    return bool(cpu_capabilities().get("avx512_bf16", False))


def _onednn_bf16() -> bool:
    """oneDNN, which runs torch's bf16 matmuls on a CPU, has bf16 kernels here (respects ONEDNN_MAX_CPU_ISA)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16() -> tuple[bool, str]:
    """(native, why): whether this CPU computes bf16 natively, and a sentence that says why or why not.

    Native means bf16 dot-product instructions that oneDNN uses: AVX512-BF16 or AMX-BF16 on x86, the bf16
    extension on ARM. Elsewhere bf16 runs emulated: a bf16 matmul forward+backward (512x256x256) took 57 ms
    against 3.3 ms in float32 on a 2-core AVX2 CPU, and fine-tuning 5x longer, so the course computes in
    float32 there. oneDNN's own flag is not enough: it also says yes on AVX-512 CPUs without bf16 units
    (Skylake to Ice Lake), where bf16 took about 3.5x float32's time."""
    caps = cpu_capabilities()
    arch = str(caps.get("architecture", "")).lower() or platform.machine().lower()
    emulated = "bf16 would be emulated, several times slower than float32, so lorakit computes in float32"
    if arch in ("arm64", "aarch64") or arch.startswith("arm"):
        if not caps.get("bf16"):
            return False, f"this ARM CPU has no bf16 extension, as Apple's M1 and older cores: {emulated}"
        if not _onednn_bf16():
            return False, f"this ARM CPU has the bf16 extension but torch's oneDNN does not use it: {emulated}"
        return True, "native bf16: this ARM CPU's bf16 extension, through oneDNN"
    units = [name for key, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if caps.get(key)]
    if not units:
        return False, f"this CPU has no bf16 units, neither AVX512-BF16 nor AMX: {emulated}"
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap and cap not in _ONEDNN_BF16_ISAS:
        return False, f"this CPU has {' and '.join(units)} but ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN below them: {emulated}"
    if not _onednn_bf16():
        return False, f"this CPU has {' and '.join(units)} but torch's oneDNN does not use it: {emulated}"
    return True, f"native bf16: this CPU's {' and '.join(units)}, through oneDNN"


def cpu_class() -> str:
    """One line naming the class of this CPU for a speed figure: its name and cores, the instruction set torch's
    kernels use (AVX512, AVX2...), and whether bf16 is native. Speed figures differ several times between
    classes, so each one the kit prints or ships says which class it comes from."""
    caps = cpu_capabilities()
    name = caps.get("cpu_name") or platform.processor() or platform.machine()
    kernels = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "?"
    native, _ = cpu_bf16()
    return f"{name}, {os.cpu_count()} cores, {kernels} kernels, {'native' if native else 'no native'} bf16"


def bf16_matmul_times(repeats: int = 9, m: int = 512, k: int = 256, n: int = 256) -> dict[str, list[float]]:
    """What bf16 costs on this CPU: seconds of one (m x k) @ (k x n) matmul, forward and backward, in float32
    and under bf16 autocast, `repeats` times each, alternating (after a warm-up of each) so that a busy machine
    disturbs both alike. {"float32": [...], "bfloat16": [...]}."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g, requires_grad=True)
    b = torch.randn(k, n, generator=g, requires_grad=True)

    def step(bf16: bool) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = a @ b
        y.float().sum().backward()
        return time.perf_counter() - t0

    step(False), step(True)
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for _ in range(repeats):
        times["float32"].append(step(False))
        times["bfloat16"].append(step(True))
    return times


def bf16_supported(device: str | torch.device = "auto") -> bool:
    """True bf16 support. On a GPU this means compute capability >= 8.0 (Ampere or newer):
    `torch.cuda.is_bf16_supported()` can say True on a T4 through slow emulation. On a CPU it means bf16
    units (`cpu_bf16`): bf16 autocast runs on any CPU, but emulated it is many times slower than float32."""
    dev = pick_device(device)
    if dev.type == "cuda":
        major, _ = torch.cuda.get_device_capability(dev)
        return major >= 8
    if dev.type == "cpu":
        return cpu_bf16()[0]
    return False  # mps: bf16 support depends on the macOS version; stay safe


def compute_dtype(device: str | torch.device = "auto") -> torch.dtype:
    """The dtype to compute in (autocast, 4-bit layers): bf16 where it is native, fp16 on older GPUs,
    fp32 otherwise (CPUs without bf16 units, MPS)."""
    dev = pick_device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if bf16_supported(dev) else torch.float16
    return torch.bfloat16 if bf16_supported(dev) else torch.float32


def check_dtype(dtype: torch.dtype, device: str | torch.device = "auto") -> torch.dtype:
    """Raise a clear error when `dtype` is bf16 on a GPU that lacks it (T4, V100...)."""
    dev = pick_device(device)
    if dtype == torch.bfloat16 and dev.type == "cuda" and not bf16_supported(dev):
        name = torch.cuda.get_device_name(dev)
        cap = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        raise ValueError(f"bf16 was requested but {name} (compute capability {cap}) has no native bf16: "
                         "use torch.float16 (lorakit.env.compute_dtype() picks it for you)")
    return dtype


def versions(packages=STACK) -> dict[str, str | None]:
    """Installed versions of the stack (None when a package is missing)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def tested_versions(packages=STACK) -> dict[str, str | None]:
    """The versions CI tested (lib/lorakit/tested.txt), None for a package the lock does not pin."""
    lock = install.tested()
    return {name: lock.get(install.normalize(name)) for name in packages}


def differs(running: str | None, tested: str | None) -> bool:
    """A running version that is not the tested release (a build label such as +cpu or +cu126 aside)."""
    return bool(running and tested and install.base_version(running) != tested)


def print_versions() -> None:
    """One line: the running versions, with the tested one beside any that differs."""
    tested = tested_versions()
    parts = []
    for name, ver in versions().items():
        note = f" (tested {tested[name]})" if name in tested and differs(ver, tested[name]) else ""
        parts.append(f"{name} {ver or 'MISSING'}{note}")
    print("  ".join(parts))


_ENVIRON_LOCK = threading.RLock()


@contextlib.contextmanager
def scoped_environ(**values: str):
    """Set environment variables for the `with` block only, and put them back afterwards: for code that reads
    this process's os.environ and offers no way to pass an environment (accelerate's notebook_launcher forks
    its workers; nbgrader's Gradebook runs `alembic`). Wherever a subprocess takes `env=`, pass it there
    instead. One block at a time (os.environ is shared by every thread)."""
    with _ENVIRON_LOCK:
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def import_bitsandbytes():
    """Import bitsandbytes (lorakit/__init__ has already silenced its harmless kernel-hub message)."""
    return importlib.import_module("bitsandbytes")


def four_bit_works(device: str | torch.device = "auto") -> tuple[bool, str]:
    """Quantize and dequantize a small tensor with bitsandbytes NF4 on `device`: (works, detail)."""
    dev = pick_device(device)
    try:
        bnb = import_bitsandbytes()
        import bitsandbytes.functional as F
        x = torch.randn(256, 64, device=dev)
        packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
        err = (F.dequantize_4bit(packed, state) - x).abs().mean().item()
    except Exception as e:  # anything: missing library, missing kernels, unsupported platform
        return False, f"{type(e).__name__}: {e}"
    if not err < 0.2:  # NF4 on N(0, 1) in blocks of 64 gives a mean error near 0.07
        return False, f"bitsandbytes {bnb.__version__} round trip error {err:.3f} is too large"
    return True, f"bitsandbytes {bnb.__version__} NF4 round trip on {dev.type}, mean error {err:.3f}"


def memory_available(device: str | torch.device = "auto") -> int:
    """Bytes free for tensors: GPU memory on cuda, available RAM otherwise."""
    dev = pick_device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    import psutil
    return int(psutil.virtual_memory().available)


@dataclass
class Line:
    item: str
    value: str
    status: str  # "OK", "missing" or "warning"


def version_lines() -> list[Line]:
    """Running beside tested versions: a warning where they differ, missing where a package the lessons
    need is absent or outside the range the kit supports (each with the command that fixes it)."""
    tested = tested_versions(STACK + INSTRUCTOR_TOOLS)
    outside = {name: spec for name, _, spec in install.out_of_range()}
    lines = [Line("python", platform.python_version(), "OK")]
    for name, ver in versions(STACK + INSTRUCTOR_TOOLS).items():
        if name == "python":
            continue
        pin, spec = tested.get(name), outside.get(install.normalize(name))
        if ver is None and name in INSTRUCTOR_TOOLS:
            lines.append(Line(name, "not installed (instructors only: pip install 'lorakit[instructor]')", "OK"))
        elif ver is None:
            lines.append(Line(name, f"not installed: {install.fix(name)}", "missing" if name in REQUIRED else "warning"))
        elif spec:
            lines.append(Line(name, f"{ver} is outside the range lorakit supports ({spec}): {install.fix(name, spec)}",
                              "missing"))
        elif differs(ver, pin):
            lines.append(Line(name, f"{ver}, tested {pin}: results may differ from the course's (Colab's setup "
                                    f"cell and `make lab` install the tested versions)", "warning"))
        else:
            lines.append(Line(name, ver + (f" (tested {pin})" if pin else ""), "OK"))
    return lines


def checklist(device: str | torch.device = "auto") -> list[Line]:
    """The environment check as lines of (item, value, status); `report()` prints them."""
    lines = version_lines()
    dev = pick_device(device)
    if dev.type == "cuda":
        cap = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        lines.append(Line("device", f"cuda: {torch.cuda.get_device_name(dev)} (capability {cap})", "OK"))
    else:
        lines.append(Line("device", f"{dev.type} ({os.cpu_count()} cores)",
                          "OK" if dev.type == "mps" else "warning"))
    dt = compute_dtype(dev)
    if dev.type == "cpu":
        note = f" ({cpu_bf16()[1]})"
    else:
        note = "" if dev.type != "cuda" or bf16_supported(dev) else " (no native bf16 on this GPU)"
    lines.append(Line("compute dtype", str(dt).replace("torch.", "") + note, "OK"))
    ok, detail = four_bit_works(dev)
    lines.append(Line("4-bit (NF4)", detail, "OK" if ok else "missing"))
    lines.append(Line("memory free", f"{memory_available(dev) / 2**30:.1f} GiB", "OK"))
    free_disk = shutil.disk_usage(".").free
    lines.append(Line("disk free", f"{free_disk / 2**30:.1f} GiB", "OK" if free_disk > 2**30 else "warning"))
    lines.append(Line("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"), "OK"))
    return lines


def report(device: str | torch.device = "auto") -> list[Line]:
    """Print the environment check as a table; returns its lines."""
    lines = checklist(device)
    w = max(len(l.item) for l in lines)
    for l in lines:
        mark = {"OK": "OK     ", "missing": "MISSING", "warning": "WARNING"}[l.status]
        print(f"{mark}  {l.item:<{w}}  {l.value}")
    if any(l.status == "warning" and l.item == "device" for l in lines):
        print("\nNo GPU: every lesson runs on this CPU with the embedded tiny model. "
              "On a GPU, set MODEL_ID in a lesson's parameters cell to a hub model.")
    return lines
