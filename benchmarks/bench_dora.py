"""The measured promise of lorakit.dora (issue 18), side by side in one run:

- `DoRALinear` forward+backward time / peft's DoRA layer (`LoraConfig(use_dora=True)`) on the same weights
  and inputs: <= 1.05;
- DoRA's overhead: `DoRALinear` forward+backward / `LoRALinear` forward+backward (reported, no promise: it
  is the price of the method, paid by peft alike). DoRA recomputes ||W0 + s B A|| per output row on every
  forward pass: an (out x r) @ (r x in) product and a norm over the whole weight, which LoRA never touches.

    python benchmarks/bench_dora.py              # exits 1 when the promise is not met
    python benchmarks/bench_dora.py --hidden 512 1024 --tokens 128 --budget 1

Timing as in bench_lora.py (its `ratio`: calls interleaved one by one, median over median, one torch thread).
"""

from __future__ import annotations

import copy
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench_lora import _Holder, calls_within, fwd_bwd, layer_arguments, print_table, ratio  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from lorakit.dora import DoRALinear  # noqa: E402
from lorakit.lora import LoRALinear  # noqa: E402

PROMISE = {"fwd_bwd_vs_peft": 1.05}


def peft_dora(base: nn.Linear, mine: DoRALinear) -> nn.Module:
    """peft's DoRA layer around the same frozen `base` (one weight in memory), with `mine`'s A, B and m."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_Holder(base), LoraConfig(r=mine.r, lora_alpha=mine.lora_alpha, lora_dropout=0.0,
                                                         target_modules=["proj"], use_dora=True))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(mine.lora_A.weight)
        layer.lora_B["default"].weight.copy_(mine.lora_B.weight)
        layer.lora_magnitude_vector["default"].weight.copy_(mine.lora_magnitude_vector)
    return layer


def main(argv=None) -> int:
    args = layer_arguments(__doc__.split("\n")[0], argv)
    rows, ok = [], True
    for h in args.hidden:
        base = nn.Linear(h, h, bias=False)
        mine = DoRALinear(base, r=args.rank, alpha=2 * args.rank)
        nn.init.normal_(mine.lora_B.weight, std=0.02)
        theirs = peft_dora(base, mine)
        lora = LoRALinear(base, r=args.rank, alpha=2 * args.rank)   # plain LoRA on the same base, same A and B
        with torch.no_grad():
            lora.lora_A.weight.copy_(mine.lora_A.weight)
            lora.lora_B.weight.copy_(mine.lora_B.weight)
        x = torch.randn(args.tokens, h, requires_grad=True)
        torch.testing.assert_close(mine(x), theirs(x))                 # the same computation, or timing means nothing

        n = calls_within(fwd_bwd(mine, x), args.budget)
        r_peft, ms_mine, ms_peft = ratio(fwd_bwd(mine, x), fwd_bwd(theirs, x), n)
        r_lora, ms_dora, ms_lora = ratio(fwd_bwd(copy.deepcopy(mine), x), fwd_bwd(lora, x), n)
        rows.append((h, r_peft, ms_mine, ms_peft, r_lora, ms_dora, ms_lora))
        ok &= r_peft <= PROMISE["fwd_bwd_vs_peft"]

    return print_table(f"| hidden | DoRALinear fwd+bwd / peft DoRA (<= {PROMISE['fwd_bwd_vs_peft']}) | ms: ours, peft "
                       f"| DoRA fwd+bwd / LoRA fwd+bwd (overhead) | ms: DoRA, LoRA |", rows, ok)

if __name__ == "__main__":
    sys.exit(main())
