"""Self-checks for lesson 00 (setup)."""

from . import close, expect, passed

BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "nf4": 4}


def bytes_per_param(table) -> None:
    expect(isinstance(table, dict), f"`bytes_per_param` should be a dict like {{'fp32': 4, ...}}, found {type(table).__name__}.")
    missing = [k for k in BITS if k not in table]
    expect(not missing, f"`bytes_per_param` is missing {missing}.", "add one entry per data type: fp32, fp16, bf16, int8, nf4.")
    for k, bits in BITS.items():
        expect(close(table[k], bits / 8), f"{k}: expected {bits / 8} bytes per parameter, found {table[k]!r}.",
               f"{k} stores {bits} bits per number and a byte has 8 bits.")
    passed("bytes per parameter: fp32 4, fp16 2, bf16 2, int8 1, nf4 0.5 (before quantization constants)")


def weights_gb(fn) -> None:
    expect(callable(fn), "`weights_gb` should be a function of (n_params, dtype).")
    got = fn(6_738_415_616, "bf16")
    expect(close(got, 13.476831232, rel=1e-3), f"Llama-2-7B in bf16: expected about 13.48 GB, found {got!r}.",
           "multiply the parameter count by bytes per parameter and divide by 1e9 (GB, not GiB).")
    passed(f"Llama-2-7B weights in bf16: {got:.2f} GB")
