"""Lesson 07's judged checks (lorakit.checks.beyond_lora): they pass right answers, for any seed, and fail the
stubs and the mistakes a learner makes, with a message that names the mistake; the lesson's test cells hold
only judged-check calls."""

import nbformat
import pytest
import torch

from lorakit import course
from lorakit.checks import CheckFailed
from lorakit.checks import beyond_lora as check
from lorakit.checks.judged import aliases, calls, find
from lorakit.loftq import loftq_iteration, low_rank
from lorakit.lora import concat_lora
from lorakit.nf4 import dequantize_nf4, quantize_nf4

LESSON = "07_beyond_lora"


def dora_forward(x, weight, bias, lora_A, lora_B, magnitude, scaling):
    """The paper's form: (m / ||W0 + s B A||) * (x W0^T + s x A^T B^T) + bias, the norm detached."""
    norm = torch.linalg.norm(weight + scaling * lora_B @ lora_A, dim=1).detach()
    y = (magnitude / norm) * (x @ weight.T + scaling * (x @ lora_A.T @ lora_B.T))
    return y if bias is None else y + bias


def dora_forward_norm_in_graph(x, weight, bias, lora_A, lora_B, magnitude, scaling):
    norm = torch.linalg.norm(weight + scaling * lora_B @ lora_A, dim=1)
    y = (magnitude / norm) * (x @ weight.T + scaling * (x @ lora_A.T @ lora_B.T))
    return y if bias is None else y + bias


def dora_forward_column_norm(x, weight, bias, lora_A, lora_B, magnitude, scaling):
    norm = torch.linalg.norm(weight + scaling * lora_B @ lora_A, dim=0).detach()[: weight.shape[0]]
    y = (magnitude / norm) * (x @ weight.T + scaling * (x @ lora_A.T @ lora_B.T))
    return y if bias is None else y + bias


def stub(*args):
    raise NotImplementedError()


@pytest.mark.parametrize("seed", [0, 1, 2, "grading"])
def test_right_answers_pass_for_any_seed(seed, capsys):
    check.dora_forward(dora_forward, seed=seed)
    check.loftq_iteration(loftq_iteration, seed=seed)
    check.concat_lora(concat_lora, seed=seed)
    assert capsys.readouterr().out.count("\u2705") == 3


@pytest.mark.parametrize("c", [check.dora_forward, check.loftq_iteration, check.concat_lora])
def test_stubs_fail(c):
    with pytest.raises(CheckFailed, match="NotImplementedError"):
        c(stub)


def test_dora_mistakes_are_named():
    with pytest.raises(CheckFailed, match="constant in backward"):
        check.dora_forward(dora_forward_norm_in_graph)
    with pytest.raises(CheckFailed, match=r"dim=1"):
        check.dora_forward(dora_forward_column_norm)
    with pytest.raises(CheckFailed, match="no gradient"):
        check.dora_forward(lambda x, W, b, A, B, m, s: dora_forward(x, W, b, A.detach(), B, m, s))


def test_loftq_mistakes_are_named():
    def quantizes_w_always(W, A, B, r, s=1.0):
        return loftq_iteration(W, None, None, r, s)

    def ignores_scaling(W, A, B, r, s=1.0):
        packed, state, A2, B2 = loftq_iteration(W, A, B, r, s)
        A1, B1 = low_rank(W - dequantize_nf4(packed, state, dtype=torch.float32), r, 1.0)
        return packed, state, A1, B1

    def returns_dequantized(W, A, B, r, s=1.0):
        packed, state = quantize_nf4(W)
        return dequantize_nf4(packed, state), A, B

    with pytest.raises(CheckFailed, match="W - scaling \\* B @ A after"):
        check.loftq_iteration(quantizes_w_always)
    with pytest.raises(CheckFailed, match="divide by the scaling"):
        check.loftq_iteration(ignores_scaling)
    with pytest.raises(CheckFailed, match="tuple"):
        check.loftq_iteration(returns_dequantized)


def test_concat_mistakes_are_named():
    def no_scaling(As, Bs, scalings, weights):
        return concat_lora(As, Bs, [1.0] * len(As), weights)

    def scaling_on_b(As, Bs, scalings, weights):
        A, _ = concat_lora(As, Bs, [1.0] * len(As), [1.0] * len(As))
        return A, torch.cat([B * w * s for B, w, s in zip(Bs, weights, scalings)], dim=1)

    with pytest.raises(CheckFailed, match="weight_i \\* scaling_i"):
        check.concat_lora(no_scaling)
    with pytest.raises(CheckFailed, match="factors differ from peft's"):
        check.concat_lora(scaling_on_b)
    with pytest.raises(CheckFailed, match="dim=0"):
        check.concat_lora(lambda As, Bs, s, w: concat_lora(As, Bs, s, w)[::-1])   # (B, A) instead of (A, B)


def test_forged_answers_are_judged_on_the_inputs():
    """The judge recomputes: an answer copied from another seed's inputs fails."""
    c = check.concat_lora
    inputs, other = c.inputs(5), c.inputs(6)
    forged = {"ok": True, "answer": {"cases": [dict(zip(("lora_A", "lora_B"), concat_lora(
        k["lora_As"], k["lora_Bs"], k["scalings"], k["weights"]))) for k in other["cases"]]}}
    assert not c.verdict(inputs, forged).passed


def test_lesson_test_cells_are_judged_checks_only():
    nb = nbformat.read(course.solution_path(LESSON), as_version=4)
    known, found = {}, []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell.metadata.get("nbgrader", {}).get("grade"):
            cs = calls(cell.source, known)
            assert [c.seed for c in cs] == [0, "grading"], cell.source
            found += [find(c.check) for c in cs]
        known.update(aliases(cell.source))
    assert found == [check.dora_forward] * 2 + [check.loftq_iteration] * 2 + [check.concat_lora] * 2


@pytest.mark.parametrize("use_trainer", [False, True])
def test_finetune_trains_with_a_loraplus_optimizer(use_trainer):
    """lorakit.train.finetune(optimizer=...) uses the optimizer given (LoRA+: B's learning rate 16x A's) and keeps
    each group's ratio through warmup and decay."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    from lorakit import data, models
    from lorakit.train import finetune

    base, tok = models.load_base(device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    opt = create_loraplus_optimizer(model, optimizer_cls=torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    finetune(model, tok, data.load_task()["train"].select(range(8)), max_steps=3, batch_size=4, warmup_steps=1,
             optimizer=opt, use_trainer=use_trainer, progress=False)
    lrs = sorted({g["initial_lr"] for g in opt.param_groups if g["params"]})   # before the schedule scaled them
    assert len(lrs) == 2 and lrs[1] == pytest.approx(16 * lrs[0])
    assert len(opt.state) == len(before)                         # the optimizer given took the steps
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_A" in n)
