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
from dataclasses import dataclass

import torch

from lorakit import install

__all__ = ["INSTRUCTOR_TOOLS", "pick_device", "bf16_supported", "compute_dtype", "check_dtype", "versions",
           "tested_versions", "differs", "print_versions", "scoped_environ", "import_bitsandbytes", "four_bit_works",
           "memory_available", "Line", "version_lines", "check", "report"]

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


def bf16_supported(device: str | torch.device = "auto") -> bool:
    """True bf16 support. On a GPU this means compute capability >= 8.0 (Ampere or newer):
    `torch.cuda.is_bf16_supported()` can say True on a T4 through slow emulation."""
    dev = pick_device(device)
    if dev.type == "cuda":
        major, _ = torch.cuda.get_device_capability(dev)
        return major >= 8
    if dev.type == "cpu":
        return True  # bf16 autocast runs on any x86/ARM CPU with torch >= 2.0 (measured on the course machines)
    return False  # mps: bf16 support depends on the macOS version; stay safe


def compute_dtype(device: str | torch.device = "auto") -> torch.dtype:
    """The dtype 4-bit layers compute in: bf16 where truly supported, fp16 on older GPUs, fp32 otherwise."""
    dev = pick_device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if bf16_supported(dev) else torch.float16
    if dev.type == "cpu":
        return torch.bfloat16
    return torch.float32


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


def check(device: str | torch.device = "auto") -> list[Line]:
    """The environment check as lines of (item, value, status)."""
    lines = version_lines()
    dev = pick_device(device)
    if dev.type == "cuda":
        cap = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        lines.append(Line("device", f"cuda: {torch.cuda.get_device_name(dev)} (capability {cap})", "OK"))
    else:
        lines.append(Line("device", f"{dev.type} ({os.cpu_count()} cores)",
                          "OK" if dev.type == "mps" else "warning"))
    dt = compute_dtype(dev)
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
    lines = check(device)
    w = max(len(l.item) for l in lines)
    for l in lines:
        mark = {"OK": "OK     ", "missing": "MISSING", "warning": "WARNING"}[l.status]
        print(f"{mark}  {l.item:<{w}}  {l.value}")
    if any(l.status == "warning" and l.item == "device" for l in lines):
        print("\nNo GPU: every lesson runs on this CPU with the embedded tiny model. "
              "On a GPU, set MODEL_ID in a lesson's parameters cell to a hub model.")
    return lines
