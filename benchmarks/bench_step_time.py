"""LoRA vs QLoRA: the time of one training step at several model widths, measured side by side in one run.

Lesson 06 quotes this benchmark instead of timing its sweep's runs (each run is timed once, next to other
jobs, so its step times are noise at the level of the QLoRA overhead). For each width a Llama of that hidden
size (2 layers, intermediate about 8/3 of the hidden size, random weights: speed does not depend on what the
weights hold) is loaded twice through `lorakit.models.load_base`: in the compute dtype (LoRA) and in NF4 with
double quantization (QLoRA, prepared as lesson 05 prepares it). Both get the same adapters (r=16 on every linear
layer of the blocks) and train on the same batch. The compute dtype is the lessons' (`lorakit.env.compute_dtype`):
bf16, with bf16 autocast, on a CPU with bf16 units, float32 on others. Steps (forward, backward, AdamW step) alternate
between the two, so a machine that slows down slows both; after warm-up steps each method is timed `--repeats`
times. A step is timed in CPU seconds of this process with one torch thread (as each run of the lab's sweep
trains), which other jobs on a shared machine disturb far less than wall-clock time; `--clock wall --threads 0`
times wall-clock seconds with torch's default threads instead. Printed per width: median and spread (max - min)
of each method's step time, QLoRA's overhead (median / median - 1), and whether the two differ beyond the spread
of the repeats (lorakit.lab.verdict).

    python benchmarks/bench_step_time.py                   # prints the table
    python benchmarks/bench_step_time.py --ship            # and writes lib/lorakit/experiments/step_times.csv
    python benchmarks/bench_step_time.py --clock wall --threads 0   # wall-clock seconds, torch's default threads

There is no promise to meet: the overhead depends on kernels and shapes, and the point is to measure it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import torch  # noqa: E402

from lorakit import env, lab  # noqa: E402
from lorakit.models import ALL_LINEAR, load_base  # noqa: E402

WIDTHS = (256, 512, 1024, 2048)


def model_folder(width: int, root: str) -> str:
    """A randomly initialised 2-layer Llama of hidden size `width`, saved where load_base can read it. Every
    size is a multiple of 64, as bitsandbytes' CPU 4-bit kernels want."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.models import TINY_PATH, load_tokenizer

    intermediate = 64 * round(width * 8 / 3 / 64)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=width, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=width // 64, num_key_value_heads=width // 64, tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(width)
    path = os.path.join(root, f"llama-{width}")
    LlamaForCausalLM(cfg).save_pretrained(path)
    load_tokenizer(str(TINY_PATH)).save_pretrained(path)  # load_base wants a tokenizer beside the weights
    return path


def trainer(path: str, method: str, rank: int, batch: dict):
    """One model with adapters and its optimizer; returns (step function, parameter count)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "lora":
        model, _ = load_base(path, device="cpu", dtype=env.compute_dtype("cpu"))
    else:
        model, _ = load_base(path, quantization="nf4", device="cpu")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    n_params = model.num_parameters()
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ALL_LINEAR,
                                             task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=env.bf16_supported("cpu")):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, n_params


def measure(widths, repeats: int, warmup: int, rank: int, batch_size: int, seq_len: int, clock=time.process_time
            ) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 2048, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with tempfile.TemporaryDirectory(prefix="bench-step-time-") as root:
        for width in widths:
            path = model_folder(width, root)
            steps = {m: trainer(path, m, rank, batch) for m in ("lora", "qlora")}
            for _ in range(warmup):
                for step, _ in steps.values():
                    step()
            for repeat in range(repeats):
                for method, (step, n_params) in steps.items():
                    t0 = clock()
                    step()
                    rows.append({"width": width, "params": n_params, "method": method, "repeat": repeat,
                                 "step_seconds": clock() - t0})
            row = lab.step_time_table(_frame(rows)).iloc[-1]
            print(f"width {width}: LoRA {row['lora ms']:.1f} ms, QLoRA {row['qlora ms']:.1f} ms per step "
                  f"({row['qlora overhead']:+.0%})", flush=True)
            del steps
    return rows


def _frame(rows):
    import pandas as pd
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="hidden sizes, multiples of 64")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="cpu: CPU seconds of this process (robust on a shared machine); wall: wall-clock seconds")
    p.add_argument("--ship", action="store_true", help=f"write the measurements to {lab.STEP_TIMES}")
    args = p.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    bad = [w for w in widths if w % 64]
    if bad:
        p.error(f"--widths {bad}: every width must be a multiple of 64 (bitsandbytes' CPU kernels need it)")
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    transformers.utils.logging.disable_progress_bar()  # loading and saving bars would drown the table
    t0 = time.perf_counter()
    compute = "bf16 autocast" if env.bf16_supported("cpu") else "float32"
    print(f"LoRA vs QLoRA step time: r={args.rank} on all linear layers, batch {args.batch_size} x {args.seq_len} "
          f"tokens, {compute}, {args.repeats} repeats after {args.warmup} warm-up steps, {torch.get_num_threads()} "
          f"threads, {args.clock} clock; CPU: {env.cpu_class()}\n")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = measure(widths, args.repeats, args.warmup, args.rank, args.batch_size, args.seq_len, clock)
    seconds = time.perf_counter() - t0
    print()
    print(lab.step_time_table(_frame(rows)).to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    print(f"\n{len(rows)} timed steps in {seconds:.0f} s")
    if args.ship:
        command = "python benchmarks/bench_step_time.py " + " ".join(sys.argv[1:] if argv is None else argv)
        path = lab.write_results(_frame(rows), lab.STEP_TIMES, [
            "LoRA vs QLoRA step time, produced by:", f"    {command.strip()}",
            f"2-layer Llamas of each width, r={args.rank} on all linear layers, batch {args.batch_size} x "
            f"{args.seq_len} tokens, {compute}, {args.repeats} repeats after {args.warmup} warm-up steps, "
            f"{torch.get_num_threads()} torch threads, {args.clock} clock, {seconds:.0f} s in all.",
            f"Machine: {lab.machine()}."])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
