"""Every GPU check of the kit in one run (what a CPU cannot show), printed as tables. `gpu_run.sh` sets up
the device machine and calls this; `--dry-run` runs the same code on the CPU with small sizes and lists the
lessons it would execute (tests/test_gpu_checks.py runs it), so a device run does not find its bugs first.

1. nf4       lorakit.nf4 bytes vs bitsandbytes' CUDA quantize_4bit: packed codes, absmax, double
             quantization, dequantized values: bit-exact or how many differ
2. speed     QLoRALinear vs bitsandbytes Linear4bit + peft LoRA, forward+backward, same shapes and adapters
3. paged     PagedAdamW / PagedAdamW8bit vs torch AdamW: where the optimizer state lives (unified memory,
             outside torch's allocator), and whether the updates agree
4. memory    torch.cuda.max_memory_allocated of LoRA / QLoRA / full fine-tuning steps on random-init models
             vs lorakit.memory.estimate for the same configuration
5. loftq     peft's own loftq_init where it was written to run (bitsandbytes' CUDA kernel quantizes) vs
             lorakit.loftq on the CPU, same weights: NF4 values differing, largest |B A| difference
6. lessons   every lesson's solution notebook on cuda with the embedded model (papermill), lesson 05 first
             and with RESULTS_JSON so its before/after exact match is reported (section 6)
7. lesson 05 before/after exact match, training seconds and peak memory, from the lesson's own JSON

    python benchmarks/gpu_checks.py                     # all, on cuda (exits 2 without a GPU)
    python benchmarks/gpu_checks.py --only nf4 speed    # some sections
    python benchmarks/gpu_checks.py --dry-run           # on the CPU, small sizes, no notebooks

Nothing here asserts a speed: the numbers are printed side by side (and written to --out as JSON). A
section that fails prints its error in its table and the run goes on; the exit status is 1 when any did.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the device machine has no network; everything is embedded
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# The measurements first (short and bounded), then the lessons (lesson 05 first among them), so that a budget
# spent by slow notebooks still leaves every measurement done.
SECTIONS = ("nf4", "speed", "paged", "memory", "loftq", "lessons", "lesson05")
# Seconds each section is expected to need on an H200 (a section is skipped when less than this is left).
NEEDS = {"lessons": 60, "nf4": 10, "speed": 20, "paged": 15, "memory": 60, "loftq": 40, "lesson05": 0}
NF4_SHAPES = [(4096, 4096), (11008, 4096), (3, 1000)]            # the last one ends in a partial block
SPEED_SHAPES = [(4096, 4096, 4096), (11008, 4096, 4096), (4096, 11008, 4096)]  # (out, in, tokens)
MEMORY_MODELS = ("smollm2-135m", "llama-3.2-1b")
RESERVE_FOR_LESSONS = 240  # seconds the memory section leaves for the lessons (it skips its larger models)
LOFTQ_SHAPES = [(4096, 4096), (1024, 4096)]  # the CPU side runs the SVDs too: kept small
DRY = {"nf4": [(64, 64), (3, 100)], "speed": [(128, 64, 32)], "memory": ("tiny",), "loftq": [(128, 64)]}


class Budget:
    """The run's deadline: a section that would start with less time left than it needs is skipped."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, section: str) -> bool:
        return self.left() >= NEEDS.get(section, 0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                   help=f"run only these sections ({', '.join(SECTIONS)}); default all")
    p.add_argument("--dry-run", action="store_true", help="the CPU, small sizes, lessons listed but not run")
    p.add_argument("--budget", type=float, default=450, help="seconds for the whole run (default 450)")
    p.add_argument("--out", default=os.environ.get("OUT", "build/gpu/out"), help="folder for JSON and executed notebooks")
    p.add_argument("--lessons", nargs="+", metavar="LESSON", help="lessons to run (default: every lesson)")
    p.add_argument("--params", help="a parameters file for the lessons (e.g. .ci/params.yml, shorter); "
                                    "DEVICE is set to cuda in any case")
    p.add_argument("--cell-timeout", type=int, default=300, help="seconds one notebook cell may take")
    p.add_argument("--reps", type=int, default=20, help="timed repeats per shape in the speed section")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--memory-models", nargs="+", default=list(MEMORY_MODELS),
                   help="lorakit.memory.CONFIGS names built with random weights (no download)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    args = p.parse_args(argv)
    if args.reps < 1 or args.rank < 1 or args.batch_size < 1 or args.seq_len < 1:
        p.error("--reps, --rank, --batch-size and --seq-len must be positive")
    if args.budget <= 0:
        p.error("--budget must be positive (seconds)")
    from lorakit import memory
    unknown = [m for m in args.memory_models if m not in memory.CONFIGS and m != "tiny"]
    if unknown:
        p.error(f"--memory-models: unknown {unknown}; choose from {', '.join(sorted(memory.CONFIGS))} or 'tiny'")
    args.sections = list(args.only or SECTIONS)
    return args


def table(title: str, header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    lines = [f"\n## {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _free():
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------- 1. lessons

def lesson_plan(args, out: Path) -> list[tuple[str, dict]]:
    """(lesson, injected parameters) for each lesson the run executes."""
    from lorakit import course
    params = course.load_params(args.params) if args.params else {}
    plan = []
    chosen = course.select(args.lessons)
    for lesson in sorted(chosen, key=lambda name: not name.startswith("05_")):  # lesson 05 first, then in order
        p = {**course.params_for(lesson, params), "DEVICE": "cuda"}
        if lesson.startswith("05_"):
            p["RESULTS_JSON"] = str((out / f"{lesson}.json").resolve())
        plan.append((lesson, p))
    return plan


def run_lessons(args, out: Path, budget: Budget) -> tuple[list[list], bool]:
    from lorakit import course, runner
    rows, ok = [], True
    for lesson, params in lesson_plan(args, out):
        if args.dry_run:
            rows.append([lesson, "planned (dry run)", "", ", ".join(f"{k}={v}" for k, v in params.items())])
            continue
        if budget.left() < 30:
            rows.append([lesson, "skipped: time budget spent", "", ""])
            ok = False
            continue
        src = course.solution_path(lesson)
        t0 = time.perf_counter()
        try:
            nb = runner.execute(src, out / "lessons" / f"{lesson}.ipynb", params, cwd=src.parent,
                                timeout=int(max(30, min(args.cell_timeout, budget.left()))))
            graded = course.graded_cells(nb)
            passed = sum(g[1] for g in graded)
            rows.append([lesson, "ok", time.perf_counter() - t0, f"{passed}/{len(graded)} graded cells pass"])
            ok &= passed == len(graded)
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            rows.append([lesson, "FAILED", time.perf_counter() - t0, runner.describe_failure(e, out / "lessons" / f"{lesson}.ipynb", lesson)[:300]])
            ok = False
    return rows, ok


# --------------------------------------------------------------------------------------------- 2. nf4

def nf4_bytes(device, shapes) -> list[list]:
    """lorakit.nf4 against bitsandbytes' quantize_4bit on `device`, with and without double quantization."""
    import bitsandbytes.functional as BF
    import torch

    from lorakit import nf4
    rows = []
    for shape in shapes:
        torch.manual_seed(0)
        W = torch.randn(*shape, device=device)
        for dq in (False, True):
            ours, st = nf4.quantize_nf4(W, 64, double_quant=dq)
            theirs, qs = BF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=dq)
            a, b = ours.reshape(-1), theirs.reshape(-1)
            diff_bytes = int((a != b).sum()) if a.shape == b.shape else -1
            absmax_equal = torch.equal(st.absmax, qs.absmax)
            extra = ""
            if dq:
                extra = (f"offset {'equal' if torch.equal(st.offset.reshape(()), qs.offset.reshape(())) else 'differs'}, "
                         f"absmax2 {'equal' if torch.equal(st.absmax2, qs.state2.absmax) else 'differs'}, "
                         f"8-bit codes differing {int((st.absmax != qs.absmax).sum())}/{st.absmax.numel()}")
            deq = (nf4.dequantize_nf4(ours, st, torch.float32).reshape(-1)
                   - BF.dequantize_4bit(theirs, qs).float().reshape(-1)).abs().max().item()
            exact = diff_bytes == 0 and absmax_equal and deq == 0
            rows.append([f"{shape[0]}x{shape[1]}", "yes" if dq else "no", "bit-exact" if exact else "DIFFERS",
                         f"{diff_bytes}/{a.numel()}", "yes" if absmax_equal else "no", deq, extra])
    return rows


# ------------------------------------------------------------------------------------------- 3. speed

def _timed(fn, reps: int, device) -> float:
    """Median seconds of fn() over `reps` runs after two warm-ups (synchronizing the GPU around each)."""
    import torch
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fwd_bwd(device, shapes, reps: int, rank: int) -> list[list]:
    """QLoRALinear against bitsandbytes Linear4bit wrapped by peft's LoRA layer, forward+backward in bf16."""
    import torch
    from torch import nn

    from lorakit import qlora
    rows = []
    for d_out, d_in, tokens in shapes:
        torch.manual_seed(0)
        lin = nn.Linear(d_in, d_out, bias=False)
        ours = qlora.QLoRALinear.from_linear(lin, rank, 2 * rank, compute_dtype=torch.bfloat16).to(device)
        with torch.no_grad():
            ours.lora_B.weight.normal_(0, 0.02)  # a non-zero update, so the adapters' path is compared too
        theirs = qlora.bitsandbytes_lora(lin.to(device), rank, 2 * rank, compute_dtype=torch.bfloat16)
        qlora.copy_adapters(ours, theirs)
        x = torch.randn(tokens, d_in, dtype=torch.bfloat16, device=device, requires_grad=True)
        with torch.no_grad():
            out_diff = (ours(x).float() - theirs(x).float()).abs().max().item()

        def step(layer):
            return lambda: layer(x).float().square().mean().backward()

        t_ours, t_bnb = _timed(step(ours), reps, device), _timed(step(theirs), reps, device)
        rows.append([f"{d_out}x{d_in}, {tokens} tok", t_ours * 1e3, t_bnb * 1e3, t_ours / t_bnb, out_diff])
        del ours, theirs, x
        _free()
    return rows


# ------------------------------------------------------------------------------------------- 4. paged

def paged_optimizers(device, steps: int = 3) -> list[list]:
    """Where each optimizer keeps its state, and whether its updates match torch's AdamW (same seed)."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.Linear(2048, 16)).to(device)

    def train(opt_cls, **kw):
        m = model()
        opt = opt_cls(m.parameters(), lr=1e-3, **kw)
        before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        g = torch.Generator(device="cpu").manual_seed(1)
        for _ in range(steps):
            x = torch.randn(64, 2048, generator=g).to(device)
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        allocated = (torch.cuda.memory_allocated() if device.type == "cuda" else 0) - before
        states = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.numel() > 1]
        paged = [t for t in states if getattr(t, "is_paged", False)]
        paged_bytes = sum(t.numel() * t.element_size() for t in paged)
        return m, allocated, len(states), len(paged), paged_bytes

    reference, ref_alloc, n_ref, _, _ = train(torch.optim.AdamW, eps=1e-8)
    rows = [["torch AdamW", n_ref, 0, ref_alloc / 2**20, 0.0, 0.0]]
    for name in ("PagedAdamW", "PagedAdamW32bit", "PagedAdamW8bit"):
        m, alloc, n, n_paged, paged_bytes = train(getattr(bnb.optim, name), eps=1e-8)
        diff = max((p - q).abs().max().item() for p, q in zip(m.parameters(), reference.parameters()))
        rows.append([f"bitsandbytes {name}", n, n_paged, alloc / 2**20, paged_bytes / 2**20, diff])
        del m
        _free()
    return rows


# ------------------------------------------------------------------------------------------ 5. memory

def _random_model(name: str, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit import memory
    if name == "tiny":
        from lorakit.tooling.pretrain import MODEL_CONFIG
        cfg = memory.config({"model_type": "llama", **MODEL_CONFIG})
    else:
        cfg = memory.config(name)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model, cfg


def memory_vs_estimate(device, names, batch_size: int, seq_len: int, rank: int, budget: Budget | None = None,
                       reserve: float = 0) -> list[list]:
    """Peak memory of two training steps (after the model is built) vs lorakit.memory.estimate: LoRA and
    QLoRA at rank `rank` on all linear layers with gradient checkpointing, full fine-tuning with AdamW in
    fp32 weights under bf16 autocast (16 bytes per parameter, like the estimate's mixed precision)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorakit import memory
    cuda = device.type == "cuda"
    rows = []
    for name in names:
        if budget is not None and rows and budget.left() < reserve:
            rows.append([name, "skipped: the rest of the budget is kept for the lessons", "", "", ""])
            continue
        for method in ("lora", "qlora", "full"):
            _free()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            est_cfg = None
            with tempfile.TemporaryDirectory() as tmp:
                if method == "qlora":
                    base, est_cfg = _random_model(name, torch.bfloat16, "cpu")
                    base.save_pretrained(tmp)
                    del base
                    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                    bnb_4bit_use_double_quant=True,
                                                    bnb_4bit_compute_dtype=torch.bfloat16)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=bnb_config, dtype=torch.bfloat16,
                                                                 device_map={"": str(device) if not cuda else 0})
                else:
                    model, est_cfg = _random_model(name, torch.float32 if method == "full" else torch.bfloat16, device)
            if method != "full":
                model.gradient_checkpointing_enable()
                model.enable_input_require_grads()
                model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)
            g = torch.Generator().manual_seed(0)
            vocab = model.config.vocab_size
            for _ in range(2):
                ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=method == "full"):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            measured = torch.cuda.max_memory_allocated() if cuda else None
            est = memory.estimate(est_cfg, method, r=rank, target_modules="all-linear", batch_size=batch_size,
                                  seq_len=seq_len, gradient_checkpointing=method != "full")
            rows.append([name, method, est.total_bytes / 1e9, "" if measured is None else measured / 1e9,
                         "" if measured is None else measured / est.total_bytes])
            del model, opt, params
            _free()
    return rows


# ---------------------------------------------------------------------------------------- 6. lesson 05

def lesson05_row(out: Path) -> list[list]:
    files = sorted(out.glob("05_*.json"))
    if not files:
        return [["(no results: lesson 05 did not run or wrote no JSON)", "", "", "", "", "", ""]]
    r = json.loads(files[0].read_text())
    return [[r["model_id"], r["device"], r["compute_dtype"], r["max_steps"], f"{r['before']:.1%}",
             f"{r['after']:.1%}", r["train_seconds"], f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB"]]


# -------------------------------------------------------------------------------------------- main

def loftq_vs_peft(device, shapes, rank: int, num_iter: int = 2) -> list[list]:
    """peft's loftq_init on `device` (on the CPU through lorakit.loftq.peft_on_cpu) against lorakit.loftq on the
    CPU, on the same weights: how many dequantized NF4 values differ, and the largest |B A| difference."""
    import torch
    from peft.utils.loftq_utils import loftq_init as peft_loftq_init

    from lorakit.loftq import loftq_init, peft_on_cpu
    rows = []
    for shape in shapes:
        torch.manual_seed(0)
        W = 0.02 * torch.randn(*shape)
        with peft_on_cpu():
            q, A, B = peft_loftq_init(W.to(device), num_bits=4, reduced_rank=rank, num_iter=num_iter)
        mine = loftq_init(W, rank, num_iter=num_iter)
        differ = int((q.float().cpu() != mine.dequantize()).sum())
        ba = ((B @ A).float().cpu() - mine.lora_B @ mine.lora_A).abs().max().item()
        rows.append([f"{shape[0]}x{shape[1]}", rank, num_iter, f"{differ}/{W.numel()}", ba])
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from lorakit.env import print_versions
    if args.dry_run:
        device = torch.device("cpu")
        nf4_shapes, speed_shapes, models, loftq_shapes = DRY["nf4"], DRY["speed"], DRY["memory"], DRY["loftq"]
        reps, batch, seq = 2, 2, 32
    else:
        if not torch.cuda.is_available():
            print("gpu_checks: no CUDA device here: run it on a GPU machine, or with --dry-run on this one")
            return 2
        device = torch.device("cuda")
        nf4_shapes, speed_shapes, models, loftq_shapes = NF4_SHAPES, SPEED_SHAPES, args.memory_models, LOFTQ_SHAPES
        reps, batch, seq = args.reps, args.batch_size, args.seq_len
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    print_versions()
    print(f"device: {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu (dry run)'}; "
          f"sections: {', '.join(args.sections)}; budget {args.budget:.0f} s")

    report, failed = {}, []
    specs = {
        "lessons": ("lessons on cuda with the embedded model", ["lesson", "status", "seconds", "detail"],
                    lambda: run_lessons(args, out, budget)),
        "nf4": ("NF4: lorakit.nf4 vs bitsandbytes quantize_4bit on " + device.type,
                ["shape", "double quant", "verdict", "packed bytes differing", "absmax equal",
                 "dequantized max |diff|", "double quantization"],
                lambda: nf4_bytes(device, nf4_shapes)),
        "speed": (f"forward+backward, bf16, LoRA r={args.rank}: QLoRALinear vs Linear4bit + peft on {device.type}",
                  ["shape (out x in, tokens)", "lorakit ms", "bnb+peft ms", "ratio", "max |output diff|"],
                  lambda: fwd_bwd(device, speed_shapes, reps, args.rank)),
        "paged": ("paged optimizers (3 steps; state tensors of >= 100k elements are paged)",
                  ["optimizer", "state tensors", "paged", "MiB added in torch's allocator", "MiB paged",
                   "max |param diff| vs torch AdamW"],
                  (lambda: paged_optimizers(device)) if device.type == "cuda" else None),
        "memory": (f"peak memory vs lorakit.memory.estimate (batch {batch} x {seq}, r={args.rank}, all linear layers)",
                   ["model (random init)", "method", "estimate GB", "max_memory_allocated GB", "measured / estimate"],
                   lambda: memory_vs_estimate(device, models, batch, seq, args.rank, budget,
                                              reserve=RESERVE_FOR_LESSONS if "lessons" in args.sections else 0)),
        "loftq": (f"LoftQ: peft's loftq_init on {device.type} vs lorakit.loftq on the CPU, r={args.rank}",
                  ["shape", "r", "iterations", "NF4 values differing", "max |B A diff|"],
                  lambda: loftq_vs_peft(device, loftq_shapes, args.rank)),
        "lesson05": ("lesson 05 before/after (from the lesson's RESULTS_JSON)",
                     ["model", "device", "dtype", "steps", "exact match before", "after", "training s", "peak memory"],
                     lambda: lesson05_row(out)),
    }
    for name in args.sections:
        title, header, run = specs[name]
        t0 = time.perf_counter()
        if run is None:
            rows = [["needs CUDA: not run on the CPU"] + [""] * (len(header) - 1)]
        elif name == "lesson05" and args.dry_run:
            rows = [["dry run: lesson 05 is not executed"] + [""] * (len(header) - 1)]
        elif not budget.allows(name):
            rows = [[f"skipped: {budget.left():.0f} s left of the budget"] + [""] * (len(header) - 1)]
            failed.append(name)
        else:
            try:
                result = run()
                rows, ok = result if name == "lessons" else (result, True)
                if not ok:
                    failed.append(name)
            except Exception as e:  # noqa: BLE001 - one section's failure is reported, the others still run
                traceback.print_exc()
                rows = [[f"FAILED: {type(e).__name__}: {e}"[:300]] + [""] * (len(header) - 1)]
                failed.append(name)
        print(table(f"{title} ({time.perf_counter() - t0:.0f} s)", header, rows), flush=True)
        report[name] = {"title": title, "header": header, "rows": rows}
    (out / "gpu_report.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\nreport: {out / 'gpu_report.json'}; {budget.left():.0f} s of the budget left"
          + (f"; sections with failures or skips: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
