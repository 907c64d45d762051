"""Launching: how lesson 08's training runs get their processes, and how their results come back.

`lorakit.distributed.train` is what one rank runs; this module starts the ranks and waits for them: from a
notebook with accelerate's `notebook_launcher` (forked processes), or from files on disk with `accelerate
launch` (torchrun underneath) in its own process group, with a timeout. Every rank writes a record (or its
error) into the run's folder; `collect` reads them back into a `RunResult`, and a failed rank ends the run
with a `DistributedRunError` naming its rank and error, never a hang (gloo collectives time out, and torch's
elastic agent stops the other ranks).

- `notebook_launch(config, num_processes)`: the run from a notebook.
- `write_launch_files(folder, config)`, `launch_command(files)`, `accelerate_launch(files, timeout)`: the
  training script, its config and an accelerate config on disk, and the command that runs them.
- `RunResult`, `collect(out_dir)`, `free_port()`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorakit.distributed import as_run_config, require_backend, split_batch, train
from lorakit.env import scoped_environ

__all__ = ["DistributedRunError", "RunResult", "collect", "free_port", "notebook_launch", "write_launch_files",
           "launch_command", "accelerate_launch"]


class DistributedRunError(RuntimeError):
    """A multi-process run that failed: which rank, and its error."""


# ---------------------------------------------------------------------------------------------- results

@dataclass
class RunResult:
    """What the ranks of one run wrote: their records (by rank) and the adapter folder rank 0 saved."""
    out_dir: Path
    ranks: list[dict]

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def losses(self) -> list[float]:
        return self.ranks[0]["losses"]

    @property
    def tokens_per_second(self) -> float:
        """Real (unpadded) tokens of all ranks per second of the slowest rank."""
        return sum(r["tokens"] for r in self.ranks) / max(r["seconds"] for r in self.ranks)

    @property
    def adapter_dir(self) -> Path:
        return self.out_dir / "adapter"

    def adapter_weights(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file
        return load_file(str(self.adapter_dir / "adapter_model.safetensors"))


def collect(out_dir) -> RunResult:
    """Read a finished run's rank records; a rank that failed raises DistributedRunError with its error."""
    out = Path(out_dir)
    # the files lorakit.distributed.record_file and error_file name: rank<N>.json, rank<N>.error.json
    errors = sorted(out.glob("rank*.error.json"), key=lambda f: f.stat().st_mtime)  # the first failure first
    if errors:
        first = json.loads(errors[0].read_text())
        others = "" if len(errors) == 1 else f" ({len(errors) - 1} more rank(s) failed too)"
        raise DistributedRunError(f"rank {first['rank']} failed: {first['type']}: {first['message']}{others}")
    ranks = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])
    if not ranks:
        raise DistributedRunError(f"no rank wrote its results to {out}: the processes did not run (see the output above)")
    if len(ranks) != ranks[0]["world_size"]:
        raise DistributedRunError(f"{len(ranks)} of {ranks[0]['world_size']} ranks wrote their results to {out}")
    return RunResult(out, ranks)


def _fresh(out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------- launching

def notebook_launch(config, num_processes: int = 2) -> RunResult:
    """Run `train(config)` in `num_processes` processes forked from this notebook with accelerate's
    `notebook_launcher`. Nothing in the notebook may have imported bitsandbytes (or peft, which imports it)
    or initialised an Accelerator first: accelerate refuses, and says so. On Colab with fewer than two GPUs
    accelerate runs the function once, in the notebook's own process: the result then has world_size 1."""
    from accelerate import notebook_launcher
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    cfg = as_run_config(config)
    split_batch(cfg.global_batch_size, num_processes)
    require_backend("gloo", num_processes)
    _fresh(cfg.out_dir)
    threads = torch.get_num_threads()  # on Colab the function runs in this process and would change it
    try:
        with scoped_environ(OMP_NUM_THREADS=str(cfg.threads)):  # the forked workers read it
            notebook_launcher(train, args=(asdict(cfg),), num_processes=num_processes, use_port=str(free_port()))
    except ChildFailedError as e:
        collect(cfg.out_dir)  # raises with the failed rank's own error when it wrote one
        raise DistributedRunError(f"a worker failed: {e}") from None
    finally:
        torch.set_num_threads(threads)
    return collect(cfg.out_dir)


SCRIPT = '''\
"""Data-parallel LoRA fine-tuning of the course model, one process per rank (written by lesson 08).

Run it with accelerate:    accelerate launch --config_file accelerate_cpu.yaml train_lora.py config.json
or with torchrun:          torchrun --nproc_per_node 2 train_lora.py config.json
"""
import json
import sys

from lorakit.distributed import train

if __name__ == "__main__":
    train(json.load(open(sys.argv[1])))
'''

# accelerate starts several processes only through its torchrun path ("MULTI_GPU"; a MULTI_CPU config starts
# one process unless mpirun is configured, huggingface/accelerate#2741); use_cpu: true keeps each process on
# the CPU, where accelerate picks the gloo backend.
CPU_CONFIG = """\
# accelerate config: {nproc} processes on this machine's CPU, gloo backend (written by lesson 08)
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU   # accelerate's torchrun launcher; use_cpu below keeps the processes on the CPU
use_cpu: true
num_machines: 1
machine_rank: 0
num_processes: {nproc}
mixed_precision: 'no'
rdzv_backend: static
same_network: true
main_training_function: main
"""


def write_launch_files(folder, config, num_processes: int = 2) -> dict[str, Path]:
    """Write the training script, its run config (JSON) and an accelerate config for `num_processes` CPU
    processes into `folder`; returns their paths by name ("script", "config", "accelerate_config")."""
    cfg = as_run_config(config)
    split_batch(cfg.global_batch_size, num_processes)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"script": folder / "train_lora.py", "config": folder / "config.json",
             "accelerate_config": folder / "accelerate_cpu.yaml"}
    paths["script"].write_text(SCRIPT)
    paths["config"].write_text(json.dumps(asdict(cfg), indent=1))
    paths["accelerate_config"].write_text(CPU_CONFIG.format(nproc=num_processes))
    return paths


def launch_command(files: dict, port: int | None = None) -> list[str]:
    """`accelerate launch --config_file ... train_lora.py config.json`, with this Python's accelerate."""
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
            str(files["accelerate_config"]), "--main_process_port", str(port or free_port()),
            str(files["script"]), str(files["config"])]


def accelerate_launch(files: dict, timeout: float = 600, log=None) -> RunResult:
    """Run `launch_command(files)` in its own process group and wait at most `timeout` seconds (then the
    whole group is killed). Output goes to `log` (a path; default run_dir/launch.log). A failed rank raises
    DistributedRunError with its rank and error."""
    cfg = json.loads(Path(files["config"]).read_text())
    out = _fresh(cfg["out_dir"])
    log = Path(log or out / "launch.log")
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.get("threads", 1)), PYTHONUNBUFFERED="1")
    with open(log, "w") as fh:
        proc = subprocess.Popen(launch_command(files), stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise DistributedRunError(f"accelerate launch did not finish within {timeout:.0f} s and was stopped "
                                      f"(output: {log})") from None
    if code != 0:
        collect(out)  # the failed rank's own error, when it wrote one
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise DistributedRunError(f"accelerate launch exited with code {code}:\n{tail}")
    return collect(out)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue
