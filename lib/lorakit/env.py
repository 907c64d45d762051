"""The environment check: which device, which compute dtype, does 4-bit quantization work here.

Lesson 00 prints `report()`; every later lesson prints `versions()` in its setup cell so a learner (and
whoever helps them) can see what the notebook ran with.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import platform
import shutil
from dataclasses import dataclass

import torch

STACK = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate",
         "nbgrader", "papermill", "ipywidgets", "matplotlib", "tqdm")


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


def print_versions() -> None:
    print("  ".join(f"{k} {v or 'MISSING'}" for k, v in versions().items()))


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


def check(device: str | torch.device = "auto") -> list[Line]:
    """The environment check as lines of (item, value, status)."""
    lines: list[Line] = []
    for name, ver in versions().items():
        required = name in ("python", "torch", "transformers", "peft", "bitsandbytes", "datasets")
        lines.append(Line(name, ver or "not installed", "OK" if ver else ("missing" if required else "warning")))
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
