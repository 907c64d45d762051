"""The measured promise of lorakit.memory (issue 4): `estimate(config, ...)` predicts the bytes of a
model's weights within 5% of `measure(model)` on models actually loaded on a CPU, in bf16 and in NF4
with double quantization (the QLoRA setting), for several sizes up to a few hundred million parameters.

Models are random-initialised from the configs in `lorakit.memory` (weights do not change sizes), saved
to a temporary folder and loaded back with transformers, the 4-bit ones through `BitsAndBytesConfig`,
exactly as a hub checkpoint would be. Beside each row: transformers' `get_memory_footprint()`, which
leaves out the 4-bit quantization constants.

    python benchmarks/bench_memory.py          # exits 1 when the promise is not met
    python benchmarks/bench_memory.py --quick  # the two smallest models only
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
import transformers  # noqa: E402

from lorakit import footprint, memory  # noqa: E402

TOLERANCE = 0.05
# name -> config: published configs where they are small enough, scaled-down ones otherwise (same
# architecture, fewer layers), so that the whole run stays under 2 minutes on 2 CPU cores.
MODELS = {
    "tiny llama (192 x 4)": dict(model_type="llama", vocab_size=4096, hidden_size=192, intermediate_size=512,
                                 num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=3,
                                 tie_word_embeddings=False),
    "smollm2-135m": memory.CONFIGS["smollm2-135m"],
    "qwen2.5-0.5b, 8 layers": dict(memory.CONFIGS["qwen2.5-0.5b"], num_hidden_layers=8),
    "mistral-7b, 1024 wide": dict(memory.CONFIGS["mistral-7b"], hidden_size=1024, intermediate_size=3584,
                                  num_hidden_layers=14, num_attention_heads=16, num_key_value_heads=4),
}


def load(cfg, folder: str, quantized: bool):
    kw = dict(dtype=torch.bfloat16, device_map="cpu")
    if quantized:
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, **kw)


def run(name: str, spec: dict) -> list[dict]:
    cfg = memory.config(spec)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(folder)
        del model
        for method, quantized in (("lora", False), ("qlora", True)):
            t0 = time.perf_counter()
            model = load(cfg, folder, quantized)
            measured = footprint.measure(model)
            footprint = model.get_memory_footprint()
            predicted = memory.estimate(cfg, method, activations=False).weights_bytes
            rows.append(dict(model=name, dtype="nf4+dq" if quantized else "bf16", params=memory.count_parameters(cfg),
                             measured=measured, estimate=predicted, footprint=footprint,
                             seconds=time.perf_counter() - t0))
            del model
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the two smallest models only")
    args = ap.parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    names = list(MODELS)[:2] if args.quick else list(MODELS)
    rows = [r for n in names for r in run(n, MODELS[n])]
    head = f"{'model':<26}{'dtype':<8}{'params':>13}{'measure()':>14}{'estimate/measure':>18}{'footprint/measure':>19}"
    print(head)
    print("-" * len(head))
    worst = 0.0
    for r in rows:
        ratio = r["estimate"] / r["measured"]
        worst = max(worst, abs(ratio - 1))
        print(f"{r['model']:<26}{r['dtype']:<8}{r['params']:>13,}{r['measured'] / 1e6:>11.2f} MB"
              f"{ratio:>18.4f}{r['footprint'] / r['measured']:>19.4f}")
    ok = worst <= TOLERANCE
    print(f"\nworst estimate/measure deviation: {worst:.3%} (promise: within {TOLERANCE:.0%}) -> "
          f"{'met' if ok else 'NOT MET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
