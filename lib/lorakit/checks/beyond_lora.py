"""Checks for lesson 07 (beyond plain LoRA), judged (see lorakit.checks.judged): the learner's DoRA forward
pass, one LoftQ iteration and the concatenation of two adapters are probed on inputs drawn from a seed, and
the answers are compared with the kit's references (`lorakit.dora`, `lorakit.loftq`, `lorakit.lora`)."""

from __future__ import annotations

import torch

from lorakit.checks import expect
from lorakit.checks.judged import as_tensor, judged_check


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=tol, atol=tol))


# ------------------------------------------------------------------------------------ ex07_dora_forward

@judged_check
class dora_forward:
    """`dora_forward(x, weight, bias, lora_A, lora_B, magnitude, scaling)`: DoRA's output, with the weight norm a
    constant in backward."""
    answer = {"cases": [{"y": torch.Tensor, "grad_A": (torch.Tensor, None), "grad_B": (torch.Tensor, None),
                         "grad_m": (torch.Tensor, None)}]}
    reference = ("lorakit.dora.dora_forward", "lorakit.dora.DoRALinear")

    def draw(rng):
        cases = []
        for k in range(4):
            d_in, d_out, r = rng.integer(8, 48), rng.integer(4, 40), rng.integer(1, 6)
            W = rng.randn(d_out, d_in) * 0.2
            m = torch.linalg.norm(W, dim=1) * (1 + 0.3 * rng.rand(d_out))   # a trained-looking magnitude
            cases.append({"x": rng.randn(*([2, 3] if k % 2 else [5]), d_in), "weight": W,
                          "bias": rng.randn(d_out) * 0.1 if k != 1 else None,
                          "lora_A": rng.randn(r, d_in) * 0.3, "lora_B": rng.randn(d_out, r) * 0.3,
                          "magnitude": m, "scaling": rng.choice([0.5, 1.0, 2.0]),
                          "grad_output": rng.randn(*([2, 3] if k % 2 else [5]), d_out)})
        return {"cases": cases}

    def probe(inputs, fn):
        out = []
        for case in inputs["cases"]:
            A, B, m = (case[k].clone().requires_grad_() for k in ("lora_A", "lora_B", "magnitude"))
            y = fn(case["x"], case["weight"], case["bias"], A, B, m, case["scaling"])
            y = y if isinstance(y, torch.Tensor) else torch.as_tensor(y)
            if y.requires_grad and y.shape == case["grad_output"].shape:
                (y.float() * case["grad_output"]).sum().backward()
            out.append({"y": y.detach().float(), "grad_A": A.grad, "grad_B": B.grad, "grad_m": m.grad})
        return {"cases": out}

    def judge(inputs, answer):
        from lorakit.dora import dora_forward as reference
        expect(len(answer["cases"]) == len(inputs["cases"]), "`dora_forward` should give one output per call.")
        for case, got in zip(inputs["cases"], answer["cases"]):
            A, B, m = (case[k].clone().requires_grad_() for k in ("lora_A", "lora_B", "magnitude"))
            y = reference(case["x"], case["weight"], case["bias"], A, B, m, case["scaling"])
            (y * case["grad_output"]).sum().backward()
            y, gA, gB, gm = y.detach(), A.grad, B.grad, m.grad
            shape = f"x of shape {tuple(case['x'].shape)}, weight {tuple(case['weight'].shape)}"
            expect(got["y"].shape == y.shape, f"{shape}: expected an output of shape {tuple(y.shape)}, found "
                   f"{tuple(got['y'].shape)}.", "the output keeps x's leading dimensions and has out_features last.")
            if not _close(got["y"], y, 1e-4):
                hint = ("the bias is added once, after the magnitude scaling." if case["bias"] is not None else
                        "m / ||W0 + s B A|| per output row times (x W0^T + s x A^T B^T), plus the bias.")
                expect(False, f"{shape}: the output differs from DoRA's by up to "
                       f"{(got['y'] - y).abs().max().item():.3g}.", hint + " The norm is over each row of the "
                       "(out, in) weight: torch.linalg.norm(W0 + scaling * B @ A, dim=1).")
            for name, mine, ref in (("lora_A", got["grad_A"], gA), ("lora_B", got["grad_B"], gB),
                                    ("magnitude", got["grad_m"], gm)):
                expect(mine is not None, f"{shape}: {name} received no gradient.",
                       "compute the output from the tensors you are given (no .detach() or torch.no_grad() on them).")
                expect(_close(mine.float(), ref, 1e-4), f"{shape}: the gradient of {name} differs from DoRA's by up "
                       f"to {(mine.float() - ref).abs().max().item():.3g}, although the output is right.",
                       "DoRA treats the weight norm as a constant in backward (paper section 4.3, and peft): "
                       "detach it, e.g. torch.linalg.norm(...).detach().")
        return "DoRA's forward pass and its gradients equal lorakit.dora.dora_forward's (and so peft's use_dora=True)"


# --------------------------------------------------------------------------------- ex07_loftq_iteration

@judged_check
class loftq_iteration:
    """`loftq_iteration(weight, lora_A, lora_B, r, scaling)`: one LoftQ step, NF4 of what the adapters leave,
    then a rank-r SVD of what the quantization misses."""
    answer = {"cases": [{"dequantized": torch.Tensor, "lora_A": torch.Tensor, "lora_B": torch.Tensor}]}
    reference = ("lorakit.loftq.loftq_iteration",)

    def draw(rng):
        cases = []
        for k in range(3):
            out_f, in_f = 64 * rng.integer(1, 3), 64 * rng.integer(1, 3)
            r = rng.integer(2, 12)
            W = rng.randn(out_f, in_f) * 0.05 + rng.randn(out_f, 3) @ rng.randn(3, in_f) * 0.03
            first = k == 0
            cases.append({"weight": W, "r": r, "scaling": rng.choice([1.0, 2.0, 0.5]),
                          "lora_A": None if first else rng.randn(r, in_f) * 0.1,
                          "lora_B": None if first else rng.randn(out_f, r) * 0.1})
        return {"cases": cases}

    def probe(inputs, fn):
        from lorakit.nf4 import NF4State, dequantize_nf4
        out = []
        for case in inputs["cases"]:
            result = fn(case["weight"], case["lora_A"], case["lora_B"], case["r"], case["scaling"])
            if not (isinstance(result, tuple) and len(result) == 4):
                raise TypeError("loftq_iteration should return a tuple (packed, quant_state, lora_A, lora_B)")
            packed, state, A, B = result
            if not isinstance(state, NF4State):
                raise TypeError(f"the second result should be the NF4State quantize_nf4 returned; got {type(state).__name__}")
            out.append({"dequantized": dequantize_nf4(packed, state, dtype=torch.float32).float(),
                        "lora_A": as_tensor(A, "lora_A").float(), "lora_B": as_tensor(B, "lora_B").float()})
        return {"cases": out}

    def judge(inputs, answer):
        from lorakit.loftq import loftq_iteration as reference
        from lorakit.nf4 import dequantize_nf4

        expect(len(answer["cases"]) == len(inputs["cases"]), "`loftq_iteration` should give one result per call.")
        for case, got in zip(inputs["cases"], answer["cases"]):
            W, r, s = case["weight"], case["r"], case["scaling"]
            packed, state, A, B = reference(W, case["lora_A"], case["lora_B"], r, s)
            Q = dequantize_nf4(packed, state, dtype=torch.float32)
            where = (f"weight {tuple(W.shape)}, r={r}, scaling={s}, "
                     + ("first step (no adapters yet)" if case["lora_A"] is None else "with adapters from a previous step"))
            hint = ("quantize what the adapters do not cover: W itself on the first step, W - scaling * B @ A after "
                    "(lorakit.nf4.quantize_nf4, blocksize 64, no double quantization).")
            if got["dequantized"].shape == Q.shape:  # close everywhere but not equal: the method, at another precision
                far = int(((got["dequantized"] - Q).abs() > 1e-4 * Q.abs().max()).sum())
                if far <= Q.numel() // 50:
                    hint = ("your quantized weight is within rounding of the reference, not equal to it: the method is "
                            "right and the precision is not. Compute W - scaling * B @ A in float32, as the exercise says: "
                            "in float64 the block absmax values and the numbers near a midpoint between two NF4 values "
                            "round differently, and the test asks for the same bytes as bitsandbytes.")
            expect(got["dequantized"].shape == Q.shape and torch.equal(got["dequantized"], Q),
                   f"{where}: the quantized weight differs from NF4(W - scaling * B @ A).", hint)
            expect(tuple(got["lora_A"].shape) == (r, W.shape[1]) and tuple(got["lora_B"].shape) == (W.shape[0], r),
                   f"{where}: lora_A should be (r, in) = {(r, W.shape[1])} and lora_B (out, r) = {(W.shape[0], r)}; "
                   f"found {tuple(got['lora_A'].shape)} and {tuple(got['lora_B'].shape)}.")
            mine, ref = s * got["lora_B"] @ got["lora_A"], s * B @ A
            expect(_close(mine, ref, 1e-4),
                   f"{where}: scaling * B @ A differs from the best rank-{r} approximation of W - dequant(Q) by up "
                   f"to {(mine - ref).abs().max().item():.3g}.",
                   "take the SVD of the residual W - dequant(Q), keep the r largest singular values, put sqrt(S) on "
                   "both sides, and divide by the scaling so that scaling * B @ A is the residual's rank-r part.")
        return "one LoftQ iteration equals lorakit.loftq.loftq_iteration (and so peft's loftq_init step)"


# ------------------------------------------------------------------------------------- ex07_concat_lora

@judged_check
class concat_lora:
    """`concat_lora(lora_As, lora_Bs, scalings, weights)`: several adapters of one layer as one, by concatenation."""
    answer = {"cases": [{"lora_A": torch.Tensor, "lora_B": torch.Tensor}]}
    reference = ("lorakit.lora.concat_lora",)

    def draw(rng):
        cases = []
        for n in (2, 2, 3):
            out_f, in_f = rng.integer(4, 40), rng.integer(4, 40)
            ranks = [rng.integer(1, 8) for _ in range(n)]
            cases.append({"lora_As": [rng.randn(r, in_f) for r in ranks], "lora_Bs": [rng.randn(out_f, r) for r in ranks],
                          "scalings": [rng.choice([0.5, 1.0, 2.0, 4.0]) for _ in ranks],
                          "weights": [round(rng.uniform(-1, 2), 3) for _ in ranks]})
        return {"cases": cases}

    def probe(inputs, fn):
        out = []
        for case in inputs["cases"]:
            A, B = fn(case["lora_As"], case["lora_Bs"], case["scalings"], case["weights"])
            out.append({"lora_A": as_tensor(A, "lora_A").float(), "lora_B": as_tensor(B, "lora_B").float()})
        return {"cases": out}

    def judge(inputs, answer):
        from lorakit.lora import concat_lora as reference

        expect(len(answer["cases"]) == len(inputs["cases"]), "`concat_lora` should give one result per call.")
        for case, got in zip(inputs["cases"], answer["cases"]):
            A, B = reference(case["lora_As"], case["lora_Bs"], case["scalings"], case["weights"])
            ranks = [a.shape[0] for a in case["lora_As"]]
            where = f"{len(ranks)} adapters of ranks {ranks}, scalings {case['scalings']}, weights {case['weights']}"
            expect(got["lora_A"].shape == A.shape and got["lora_B"].shape == B.shape,
                   f"{where}: expected lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} (rank {sum(ranks)}); found "
                   f"{tuple(got['lora_A'].shape)} and {tuple(got['lora_B'].shape)}.",
                   "stack the A's row-wise (torch.cat(..., dim=0)) and the B's column-wise (dim=1).")
            expect(_close(got["lora_B"] @ got["lora_A"], B @ A, 1e-5),
                   f"{where}: B @ A should be sum_i weight_i * scaling_i * B_i @ A_i; it differs by up to "
                   f"{(got['lora_B'] @ got['lora_A'] - B @ A).abs().max().item():.3g}.",
                   "multiply each A_i by weight_i * scaling_i; the combined adapter then has scaling 1.")
            expect(_close(got["lora_A"], A, 1e-6) and _close(got["lora_B"], B, 1e-6),
                   f"{where}: the product is right but the factors differ from peft's: put weight_i * scaling_i on "
                   f"the A's and leave the B's as they are, adapters in the order given.")
        return "concatenated adapters equal peft's add_weighted_adapter(combination_type='cat')"
