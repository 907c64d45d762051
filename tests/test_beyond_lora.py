"""Lesson 07's judged checks (lorakit.checks.beyond_lora): they pass right answers, for any seed, and fail the
stubs and the mistakes a learner makes, with a message that names the mistake; the lesson's test cells hold
only judged-check calls."""

import nbformat
import pytest
import torch

from lorakit import course
from lorakit.checks import CheckFailed
from lorakit.checks import beyond_lora as check
from lorakit.checks.judged import find
from lorakit.grading.testcells import aliases, calls
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

    def in_float64(W, A, B, r, s=1.0):   # the method, with W - s B A computed in float64 and quantized as float32
        W64 = W.double()
        target = W64 if A is None else W64 - s * (B.double() @ A.double())
        packed, state = quantize_nf4(target.float(), blocksize=64, double_quant=False)
        return (packed, state, *low_rank(W.float() - dequantize_nf4(packed, state, dtype=torch.float32), r, s))

    with pytest.raises(CheckFailed, match="the precision is not.*float32"):
        check.loftq_iteration(in_float64)


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


@pytest.mark.slow
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


# ------------------------------------------------------------- section 3: the other starts and LoRA+, measured

def test_inits_grid_compares_the_starts_with_the_default_at_low_rank_with_the_labs_seeds():
    from lorakit import lab, sweep

    g = sweep.load_grid("inits")
    sweep.validate(g)
    assert g.seeds == lab.SEEDS and g.parameters["TASK"] == lab.TASK
    assert {k: g.parameters[k] for k in ("MAX_STEPS", "N_EVAL")} == \
        {k: sweep.load_grid("full").parameters[k] for k in ("MAX_STEPS", "N_EVAL")}
    (default,) = [c for s, c in g.entries if s == "default"]
    assert default.params == () and sweep.notebook_parameters()["INIT_LORA_WEIGHTS"] is True
    assert sweep.notebook_parameters()["LORAPLUS_LR_RATIO"] is None        # the default trains with plain AdamW
    assert default in sweep.load_grid("full").configs                      # the lab ran it too: r=4, alpha=2r
    assert default.r <= 4 and all((c.r, c.alpha, c.target_modules) == (default.r, default.alpha, default.target_modules)
                                  for c in g.configs)
    assert [dict(c.params) for c in g.configs[1:]] == [{"INIT_LORA_WEIGHTS": "gaussian"}, {"INIT_LORA_WEIGHTS": "pissa"},
                                                     {"INIT_LORA_WEIGHTS": "olora"}, {"LORAPLUS_LR_RATIO": 16}]


def test_shipped_inits_results_are_the_grid_with_seeds_and_say_how_they_were_made():
    from lorakit import lab, sweep

    path = lab.results_path("inits")
    assert path.parent == sweep.GRIDS["inits"].parent
    table = lab.read_results(path)
    g = sweep.load_grid("inits")
    assert list(zip(table.study, table.name, table.seed)) == [(s, c.name, seed) for s, c in g.entries for seed in g.seeds], \
        "results_inits.csv no longer matches grid_inits.yml: run `lorakit sweep --grid inits --workers 2 --ship`"
    assert (table.status == "ok").all(), table[table.status != "ok"][["name", "seed", "error"]]
    header = lab.provenance(path)
    assert header[0] == "Results of the grid lib/lorakit/experiments/grid_inits.yml, produced by:"
    assert header[1].startswith("lorakit sweep --grid inits") and "--ship" in header[1]
    assert header[2].startswith("15 runs (5 configurations x seeds [0, 1, 2]) in ") and header[2].endswith("0 failed.")
    assert header[3].startswith("Machine: ") and "peft " in header[3]
    assert (table.n_eval == 200).all() and (table.steps == 300).all() and table.exact_match.between(0, 1).all()
    assert table.trainable_params.nunique() == 1    # every start trains the same adapters


def test_what_lesson_07_says_about_the_shipped_starts_is_what_they_show():
    """The prose of section 3 states these verdicts of the shipped results: re-shipping results that say otherwise
    must fail here until the text is changed."""
    from lorakit import lab

    table = lab.read_results(lab.results_path("inits"))
    summary = lab.summarize(table)
    default, *others = list(summary.name)
    for name in others:   # every other start beats the default beyond the seed spread, on both metrics
        assert all(lab.compare(table, name, default, m).winner == name for m in lab.METRICS), name
    loraplus = summary.name[summary.name.str.contains("LORAPLUS")].iloc[0]
    assert summary.exact_match_spread.idxmax() == summary.index[summary.name == loraplus][0]
    low, mid, high = sorted(lab.seed_values(table, loraplus))     # one seed went further than the other two
    assert high - mid > 2 * (mid - low)
    pairs = [(a, b) for i, a in enumerate(others) for b in others[i + 1:]]
    assert all(lab.compare(table, a, b).winner is None for a, b in pairs)          # exact match ranks none of them
    touching = [(a, b) for a, b in pairs if min(lab.seed_values(table, a)) == max(lab.seed_values(table, b))
                or min(lab.seed_values(table, b)) == max(lab.seed_values(table, a))]
    assert len(touching) == 2   # "overlap, or touch": two pairs share only one value (110 of 200), the rest overlap
    assert all(110 / 200 in lab.seed_values(table, a) + lab.seed_values(table, b) for a, b in touching)
    assert any(lab.compare(table, a, b, "answer_loss").winner for a, b in pairs)   # the loss separates some pairs
    lab_runs = lab.committed_results()   # the lab's own default at alpha = 16 got further; this default repeats it
    assert lab.compare(lab_runs, "lora_r4_a16_all-linear", default).winner == "lora_r4_a16_all-linear"
    assert lab.seed_values(lab_runs, default) == lab.seed_values(table, default)
    with pytest.raises(ValueError, match="ships"):
        lab.results_path("reduced")


@pytest.mark.slow
def test_loraplus_ratio_reaches_the_experiment_notebooks_optimizer(tmp_path):
    """The grid's LORAPLUS_LR_RATIO builds peft's LoRA+ optimizer in the experiment notebook: every lora_B weight
    learns at ratio x the learning rate, every lora_A weight at the learning rate (one short real run)."""
    from lorakit import sweep

    cfg = sweep.load_grid({"base": {"r": 2}, "studies": {"loraplus": {"LORAPLUS_LR_RATIO": 16}}}).configs[0]
    lr = sweep.notebook_parameters()["LEARNING_RATE"]
    row = sweep.run_config(cfg, tmp_path, {"MAX_STEPS": 1, "N_EVAL": 2, "N_TRAIN": 16, "BATCH_SIZE": 4,
                                           "DEVICE": "cpu", "THREADS": 1})
    assert row["status"] == "ok", row["error"]
    assert row["learning_rates"] == {"lora_A": [pytest.approx(lr)], "lora_B": [pytest.approx(16 * lr)]}


def test_lesson_verdicts_on_the_starts_are_the_labs_rule(monkeypatch):
    """Section 3's cells read the shipped results and ask lorakit.lab.compare (the lab's verdict rule) for every
    start against the default on both metrics; its table shows exactly those verdicts, and no cell of the lesson
    carries a rule of its own or types the words of a verdict."""
    import ast

    import matplotlib
    import pandas as pd

    from lorakit import lab

    matplotlib.use("Agg")
    nb = nbformat.read(course.solution_path(LESSON), as_version=4)
    start = next(i for i, c in enumerate(nb.cells) if c.source.startswith("### Measured on the lab's task"))
    end = next(i for i, c in enumerate(nb.cells) if i > start and c.source.startswith("## 4."))
    cells = [c.source for c in nb.cells[start:end] if c.cell_type == "code"]
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert "not distinguishable" not in cell.source.lower()           # the words come from lab
            defined = {n.name for n in ast.walk(ast.parse(cell.source)) if isinstance(n, ast.FunctionDef)}
            assert not defined & {"verdict", "compare"}, defined

    calls = []
    real = lab.compare

    def spy(results, a, b, metric="exact_match"):
        calls.append((a, b, metric))
        return real(results, a, b, metric)

    monkeypatch.setattr(lab, "compare", spy)
    import matplotlib.pyplot as plt
    ns = {"pd": pd, "plt": plt}
    for source in cells:
        exec(compile(source, "<lesson 07 section 3>", "exec"), ns)
    plt.close("all")
    table, default = lab.read_results(lab.results_path("inits")), ns["DEFAULT"]
    others = [n for n in dict.fromkeys(table.name) if n != default]
    assert {(n, default, m) for n in others for m in lab.METRICS} <= set(calls)
    verdicts = ns["init_verdicts"]
    assert len(verdicts) == len(others)
    for name, (_, row) in zip(others, verdicts.iterrows()):
        for m in lab.METRICS:
            c = real(table, name, default, m)
            want = lab.NOT_DISTINGUISHABLE if c.winner is None else ("better" if c.winner == name else "worse")
            assert row[lab.LABELS[m]] == want, (name, m)


def _lesson_text(starts: str) -> str:
    nb = nbformat.read(course.solution_path(LESSON), as_version=4)
    return next(c.source for c in nb.cells if c.source.startswith(starts))


def test_loraplus_optimizer_has_the_four_groups_lesson_07_describes():
    """peft's create_loraplus_optimizer: A at lr; embedding adapters at loraplus_lr_embedding (1e-6 by default);
    the B side, 1-dimensional parameters included, at lr * ratio; and the B side's no-weight-decay parameters at
    lr * ratio with weight decay 0."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    from lorakit.models import seeded_llama, tiny_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(seeded_llama(tiny_config(num_hidden_layers=2, vocab_size=256), 0), LoraConfig(
            r=2, target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True))
    opt = create_loraplus_optimizer(model, optimizer_cls=torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                    loraplus_weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    kind = {i: next(part for part in n.split(".") if part.startswith("lora_")) for i, n in names.items() if "lora_" in n}
    groups = [(g["lr"], g["weight_decay"], sorted(kind[id(p)] for p in g["params"])) for g in opt.param_groups]
    assert len(groups) == 4
    (lr_a, wd_a, a), (lr_e, wd_e, e), (lr_b, wd_b, b), (lr_b0, wd_b0, _) = groups
    assert (lr_a, wd_a) == (1e-3, 0.1) and set(a) == {"lora_A"}
    assert (lr_e, wd_e) == (1e-6, 0.1) and e and all(n.startswith("lora_embedding") for n in e)
    assert (lr_b, wd_b, lr_b0, wd_b0) == (16e-3, 0.1, 16e-3, 0.0)
    assert {"lora_B", "lora_magnitude_vector"} <= {n for n in b}      # DoRA's 1-D magnitudes go to the B side
    text = " ".join(_lesson_text("Every choice starts from the same function").split())
    assert "four groups: the `A` side at `lr`" in text and "`loraplus_lr_embedding` (default 1e-6)" in text
    assert "at `lr * loraplus_lr_ratio`, in two groups" in text and "weight decay 0" in text


def test_nfquantizer_is_gone_from_the_tested_peft():
    """Lesson 07: peft shipped NFQuantizer from its LoftQ integration (0.7) to 0.19; 0.20 removed it."""
    import peft
    from packaging.version import Version
    from peft.utils import loftq_utils

    assert Version(peft.__version__) >= Version("0.20") and not hasattr(loftq_utils, "NFQuantizer")
    assert "(peft 0.7, PR #1150) to 0.19" in _lesson_text("**Where the quantizers agree")


def test_linear_combination_is_the_weighted_sum_of_square_root_weighted_factors():
    """peft's add_weighted_adapter(combination_type="linear"), as lesson 07 states it: A = sum sqrt(w s) A_i,
    B = sum sqrt(w s) B_i, scaling 1, so B A = sum w s B_i A_i + cross terms; "cat" has no cross terms."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from lorakit.models import seeded_llama, tiny_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = seeded_llama(tiny_config(num_hidden_layers=2, vocab_size=256), 0)
        model = get_peft_model(small, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
                               adapter_name="a")
        model.add_adapter("b", LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        for name in ("a", "b"):
            layer.lora_B[name].weight.normal_()
    weights = [0.7, 1.5]
    model.add_weighted_adapter(["a", "b"], weights, "linear", combination_type="linear")
    model.add_weighted_adapter(["a", "b"], weights, "cat", combination_type="cat")
    c = [w * layer.scaling[n] for w, n in zip(weights, "ab")]
    A = sum(c_i ** 0.5 * layer.lora_A[n].weight for c_i, n in zip(c, "ab"))
    B = sum(c_i ** 0.5 * layer.lora_B[n].weight for c_i, n in zip(c, "ab"))
    assert layer.scaling["linear"] == 1.0
    assert torch.allclose(layer.lora_A["linear"].weight, A) and torch.allclose(layer.lora_B["linear"].weight, B)
    wanted = sum(c_i * layer.lora_B[n].weight @ layer.lora_A[n].weight for c_i, n in zip(c, "ab"))
    cat = layer.scaling["cat"] * layer.lora_B["cat"].weight @ layer.lora_A["cat"].weight
    assert torch.allclose(cat, wanted, atol=1e-6) and not torch.allclose(B @ A, wanted, atol=1e-3)
    assert "\\sqrt{w_i s_i}" in _lesson_text("`add_weighted_adapter` builds")
