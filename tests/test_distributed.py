"""Lesson 08's library: per-device memory under ZeRO / FSDP (`lorakit.memory.estimate(world_size=...,
sharding=...)`) against the ZeRO paper and the FSDP + QLoRA release, the data-parallel loss, real 2-process
runs on CPU with gloo (DDP and FSDP2 equal one process on the combined batch; only rank 0 writes; a crashed
worker ends the run with its rank), and the shipped FSDP + QLoRA files for GPUs, parsed and checked."""

from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lorakit import distributed, launch, memory, sharding
from lorakit.checks import CheckFailed
from lorakit.checks import distributed as check

ZERO = dict(n=7_500_000_000, world=64, published_gb={"zero0": 120, "zero1": 31.4, "zero2": 16.6, "zero3": 1.9})
TINY_CFG = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)


# ------------------------------------------------------------------------------------- memory: sharding

@pytest.mark.parametrize("stage", ["zero0", "zero1", "zero2", "zero3"])
def test_estimate_reproduces_the_zero_paper(stage):
    """Rajbhandari et al. 2019, Figure 1: 7.5B parameters, 64 devices, mixed-precision Adam (K = 12)."""
    est = memory.estimate(ZERO["n"], "full", activations=False, world_size=ZERO["world"], sharding=stage)
    assert est.gb == pytest.approx(ZERO["published_gb"][stage], rel=0.015)


@pytest.mark.parametrize("name", ["llama-2-7b", "qwen2.5-0.5b"])
@pytest.mark.parametrize("method", memory.METHODS)
def test_existing_calls_are_unchanged_and_one_device_is_ddp(name, method):
    plain = memory.estimate(name, method, r=16, target_modules="all-linear")
    for sharding in ("none", "ddp", "zero0", "NO_SHARD", None):
        same = memory.estimate(name, method, r=16, target_modules="all-linear", world_size=1, sharding=sharding)
        assert same.parts == plain.parts and same.offloaded == {}
    ddp = memory.estimate(name, method, r=16, target_modules="all-linear", world_size=8)
    assert ddp.parts == plain.parts, "DDP replicates everything: per-device memory does not depend on world size"


@pytest.mark.parametrize("method", memory.METHODS)
@pytest.mark.parametrize("world", [2, 3, 64])
def test_each_stage_divides_its_parts(method, world):
    kw = dict(r=8, target_modules="all-linear", activations=False, quant_storage="bf16" if method == "qlora" else "uint8")
    base = memory.estimate("mistral-7b", method, **kw).parts
    share = lambda part: -(-base[part] // world)  # noqa: E731
    for stage, sharded in [(1, {"fp32 master weights", "optimizer states"}),
                           (2, {"fp32 master weights", "optimizer states", "gradients"}),
                           (3, set(base))]:
        parts = memory.estimate("mistral-7b", method, world_size=world, sharding=f"zero{stage}", **kw).parts
        for part, nbytes in base.items():
            assert parts[part] == (share(part) if part in sharded else nbytes), (stage, part)
        assert ("gathered layers" in parts) == (stage == 3)


# K of the ZeRO paper (optimizer bytes per parameter, the fp32 master copy included) -> how estimate says it.
K_SETTINGS = {12: (True, "adamw"), 8: (True, "adamw_bf16"), 6: (True, "adamw_8bit"), 4: (True, "sgd"),
              2: (False, "adamw_8bit"), 0: (False, "sgd")}


@pytest.mark.parametrize("k", sorted(K_SETTINGS))
def test_per_device_bytes_is_what_estimate_says_for_full_fine_tuning(k):
    """Lesson 08's exercise in the library, with its signature: the same bytes as estimate's parts under the same
    rule (`sharding.device_share`), to the byte or two estimate's per-part rounding adds."""
    master, optimizer = K_SETTINGS[k]
    for n, world in [(7_500_000_000, 64), (123_456_789, 3), (10**9, 1)]:
        for stage in range(4):
            est = memory.estimate(n, "full", activations=False, world_size=world, sharding=stage,
                                  master_weights=master, optimizer=optimizer).total_bytes
            assert abs(sharding.per_device_bytes(n, world, stage, k) - est) <= 2, (n, world, stage, k)


def test_per_device_bytes_reproduces_the_zero_paper():
    gb = [sharding.per_device_bytes(7_500_000_000, 64, stage) / 1e9 for stage in range(4)]
    assert [round(g, 1) for g in gb] == [120.0, 31.4, 16.6, 1.9]


def test_device_share_offloads_what_the_stage_shards():
    parts = {"weights": 100, "gradients": 100, "optimizer states": 400, "activations": 7}
    assert sharding.device_share(parts, 4, 2) == ({"weights": 100, "gradients": 25, "optimizer states": 100,
                                                  "activations": 7}, {})
    assert sharding.device_share(parts, 4, 2, cpu_offload=True) == ({"weights": 100, "gradients": 25, "activations": 7},
                                                                    {"optimizer states": 100})
    assert sharding.device_share(parts, 4, 3, cpu_offload=True) == ({"activations": 7}, {"weights": 25, "gradients": 25,
                                                                                         "optimizer states": 100})
    assert [sharding.sharding_stage(s) for s in (0, 3, "ddp", "zero2", "FULL_SHARD")] == [0, 3, 0, 2, 3]
    with pytest.raises(ValueError, match="unknown sharding 4"):
        sharding.sharding_stage(4)


def test_fsdp_names_are_zero_stages():
    kw = dict(r=8, batch_size=2, world_size=4)
    for fsdp, zero in sharding.FSDP_SHARDING.items():
        assert memory.estimate("llama-2-13b", "lora", sharding=fsdp.lower(), **kw).parts == \
            memory.estimate("llama-2-13b", "lora", sharding=zero, **kw).parts


def _meta(cfg):
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(memory.config(cfg), dtype=torch.bfloat16)


def test_gathered_layers_are_the_root_unit_and_two_decoder_layers():
    model = _meta(TINY_CFG)
    nbytes = lambda mod: sum(p.numel() * p.element_size() for p in mod.parameters())  # noqa: E731
    root = nbytes(model) - nbytes(model.model.layers)
    est = memory.estimate(TINY_CFG, "lora", activations=False, world_size=2, sharding="zero3")
    assert est.parts["gathered layers"] == root + 2 * nbytes(model.model.layers[0])


def test_cpu_offload_moves_the_sharded_states_to_the_host():
    kw = dict(r=8, target_modules="all-linear", batch_size=1, seq_len=1024, quant_storage="bf16")
    for stage, on_host in [("zero2", {"optimizer states"}), ("zero3", {"weights", "quantization constants",
                                                                      "adapters", "gradients", "optimizer states"})]:
        kept = memory.estimate("llama-2-13b", "qlora", world_size=4, sharding=stage, **kw)
        off = memory.estimate("llama-2-13b", "qlora", world_size=4, sharding=stage, cpu_offload=True, **kw)
        assert set(off.offloaded) == on_host
        assert off.offloaded == {k: kept.parts[k] for k in on_host}
        assert off.total_bytes + off.offloaded_bytes == kept.total_bytes + (
            off.parts.get("gathered layers", 0) - kept.parts.get("gathered layers", 0))
        assert "(CPU)" in off.table() and "per device" in off.table()


FSDP_QLORA_70B = dict(r=8, target_modules="all-linear", batch_size=2, seq_len=2048, world_size=2,
                      sharding="FULL_SHARD", quant_storage="bf16")


def test_fsdp_qlora_70b_on_two_24gb_gpus_matches_the_published_verdicts():
    """peft's FSDP + QLoRA guide, Llama-2-70B on 2 GPUs at batch 2 x 2048 tokens: 19.6 GB per GPU with CPU
    offload (fits 24 GB), 35.6 GB without (does not). The estimate leaves out the CUDA context, allocator
    cache and temporary buffers, so it is lower than both; it must agree on which one fits."""
    without = memory.estimate("llama-2-70b", "qlora", **FSDP_QLORA_70B)
    offload = memory.estimate("llama-2-70b", "qlora", cpu_offload=True, **FSDP_QLORA_70B)
    assert without.gb > 24 > offload.gb
    assert 0.4 < offload.gb / 19.6 <= 1 and 0.6 < without.gb / 35.6 <= 1
    # lesson 08 compares (it does not claim to reproduce): "about half ... with CPU offload and four fifths without"
    assert round(offload.gb / 19.6, 1) == 0.5 and round(without.gb / 35.6, 1) == 0.8
    import nbformat

    from lorakit import course
    nb = nbformat.read(course.solution_path("08_distributed"), as_version=4)
    text = next(c.source for c in nb.cells if c.source.startswith("Compare, not reproduce"))
    assert "about half the measurement with CPU offload and four fifths without" in text
    assert not any("reproduced two published results" in c.source for c in nb.cells)
    largest = max(m[1] * m[2] for n, m in memory.modules("llama-2-70b").items()
                  if m[0] == "linear" and n.startswith("model.layers.0."))
    assert round(largest * 2 / 1e9, 2) == 0.47          # the 16-bit copy of up_proj the estimate leaves out


@pytest.mark.parametrize("kw, words", [
    (dict(world_size=0), "world_size"), (dict(world_size=2.5), "whole number"), (dict(world_size=True), "world_size"),
    (dict(sharding="zero4"), "unknown sharding"), (dict(sharding="HYBRID_SHARD", world_size=8), "per node"),
    (dict(cpu_offload=True), "zero2"), (dict(cpu_offload=True, world_size=4), "DDP keeps a full copy"),
    (dict(quant_storage="int4"), "quant_storage must be one of"),
])
def test_bad_sharding_input_names_the_fix(kw, words):
    with pytest.raises(ValueError, match=words):
        memory.estimate("llama-2-7b", "qlora", **kw)


@pytest.mark.parametrize("sharding", ["zero3", "FULL_SHARD", "SHARD_GRAD_OP"])
def test_fsdp_cannot_shard_uint8_4bit_weights(sharding):
    with pytest.raises(ValueError, match="bnb_4bit_quant_storage=torch.bfloat16"):
        memory.estimate("llama-2-70b", "qlora", world_size=2, sharding=sharding)
    memory.estimate("llama-2-70b", "qlora", world_size=2, sharding=sharding, quant_storage="bf16")
    memory.estimate("llama-2-70b", "qlora", world_size=2, sharding="zero2")  # DeepSpeed ZeRO-2 leaves them whole


def test_bare_parameter_counts_are_for_full_fine_tuning_without_activations():
    with pytest.raises(ValueError, match="activations=False"):
        memory.estimate(10**9, "full")
    with pytest.raises(ValueError, match="pass a config"):
        memory.estimate(10**9, "lora", activations=False)
    with pytest.raises(ValueError, match="applies to method='qlora'"):
        memory.estimate("llama-2-7b", "lora", quant_storage="bf16")


def test_sharding_curves_draw_one_line_per_strategy():
    import matplotlib
    matplotlib.use("Agg")
    from lorakit import viz
    ax = viz.sharding_curves("llama-2-70b", "qlora", devices=(1, 2, 4), r=8, target_modules="all-linear", seq_len=512)
    lines = {l.get_label(): l.get_ydata() for l in ax.get_lines() if not l.get_label().startswith("_")}
    assert set(lines) == set(viz.SHARDING_STYLES)
    assert lines["DDP"][0] == lines["DDP"][-1] > lines["ZeRO-3 / FULL_SHARD"][-1]


# -------------------------------------------------------------------------------------- the loss, backends

def _slices(world, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(world):
        labels = torch.randint(0, 13, (r + 1, 7), generator=g)
        labels[:, : 2 + r] = -100  # prompts of different lengths: the slices hold different label counts
        out.append((torch.randn(r + 1, 7, 13, generator=g), labels))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_losses_average_to_the_combined_batch(world):
    slices = _slices(world)
    n = sum(int((y[:, 1:] != -100).sum()) for _, y in slices)
    grads, values = [], []
    for logits, labels in slices:
        logits = logits.clone().requires_grad_(True)
        loss = distributed.rank_loss(logits, labels, n, world)
        loss.backward()
        values.append(loss.item())
        grads.append(logits.grad / world)  # what DDP's all-reduce (an average) hands each rank
    # one process on the combined batch: the mean over all labelled tokens
    combined = torch.cat([torch.nn.functional.cross_entropy(l[:, :-1].reshape(-1, 13), y[:, 1:].reshape(-1),
                                                            ignore_index=-100, reduction="none")
                          for l, y in slices])
    mean = combined[torch.cat([(y[:, 1:] != -100).reshape(-1) for _, y in slices])].mean()
    assert sum(values) / world == pytest.approx(mean.item(), rel=1e-6)
    whole = [l.clone().requires_grad_(True) for l, _ in slices]
    sum(torch.nn.functional.cross_entropy(l[:, :-1].reshape(-1, 13), y[:, 1:].reshape(-1), ignore_index=-100,
                                          reduction="sum") for l, (_, y) in zip(whole, slices)).div(n).backward()
    for g, w in zip(grads, whole):
        torch.testing.assert_close(g, w.grad)


def test_rank_loss_on_one_process_is_transformers_loss():
    from lorakit import data, models
    model, tokenizer = models.load_base(device="cpu")
    rows = data.load_task("who_found")["train"].select(range(4))
    batch = data.collate([data.tokenize_with_masking(ex, tokenizer, 256, padding=False) for ex in rows],
                         tokenizer.pad_token_id)
    out = model(**batch)
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert distributed.rank_loss(out.logits, batch["labels"], n, 1).item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_split_batch_refuses_sizes_that_do_not_divide():
    assert distributed.split_batch(8, 2) == 4
    with pytest.raises(ValueError, match=r"10 does not split evenly over 4 processes: use a multiple of 4 \(8 or 12\)"):
        distributed.split_batch(10, 4)
    with pytest.raises(ValueError, match="whole number"):
        distributed.split_batch(8, 0)


def test_backends_say_what_is_missing():
    assert "gloo" in distributed.require_backend("gloo", 2)
    with pytest.raises(ValueError, match="unknown backend"):
        distributed.require_backend("mpi-ish")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs NVIDIA GPUs.*gloo"):
            distributed.require_backend("nccl", 2)


def test_run_config_refuses_unknown_sharding():
    with pytest.raises(ValueError, match="none, fsdp"):
        distributed.RunConfig(out_dir="x", sharding="zero3")


# ------------------------------------------------------------------------------------------ the checks

def _stub(*a, **k):
    raise NotImplementedError()


def test_checks_pass_on_the_references_and_fail_on_stubs():
    def per_device_bytes(n, world, stage, k=12):
        return [(4 + k) * n, 4 * n + k * n / world, 2 * n + (2 + k) * n / world, (4 + k) * n / world][stage]
    check.zero_bytes(per_device_bytes)
    check.zero_bytes(per_device_bytes, seed="grading")
    check.rank_loss(distributed.rank_loss)
    check.rank_loss(distributed.rank_loss, seed="grading")
    for c in (check.zero_bytes, check.rank_loss):
        with pytest.raises(CheckFailed, match="NotImplementedError"):
            c(_stub)


def test_rank_loss_check_catches_the_per_slice_mean_and_a_detached_value():
    def mean_per_slice(logits, labels, n, world):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
    with pytest.raises(CheckFailed, match="SUM the token cross-entropies"):
        check.rank_loss(mean_per_slice)
    with pytest.raises(CheckFailed, match="no gradient"):
        check.rank_loss(lambda *a: distributed.rank_loss(*a).item())


def test_zero_check_catches_a_stage_off_by_one():
    def shifted(n, world, stage, k=12):
        return [(4 + k) * n, 2 * n + (2 + k) * n / world, (4 + k) * n / world, (4 + k) * n / world][stage]
    with pytest.raises(CheckFailed, match="stage 1"):
        check.zero_bytes(shifted)


# --------------------------------------------------------------------------- real runs: 2 processes, gloo

RUN = dict(max_steps=4, global_batch_size=8, n_train=64)


def _launch(tmp_path, name, nproc, timeout=300, **kw):
    cfg = distributed.RunConfig(out_dir=str(tmp_path / name / "out"), **{**RUN, **kw})
    return launch.accelerate_launch(launch.write_launch_files(tmp_path / name, cfg, nproc), timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process on the combined batch, two with DDP (the right loss and the per-rank mean), two with FSDP2:
    the same 4 optimizer steps on the same global batches."""
    tmp = tmp_path_factory.mktemp("runs")
    return {"one": _launch(tmp, "one", 1), "ddp": _launch(tmp, "ddp", 2), "fsdp": _launch(tmp, "fsdp", 2, sharding="fsdp"),
            "mean": _launch(tmp, "mean", 2, loss="mean_per_rank")}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_processes_step_like_one_process_on_the_combined_batch(runs):
    one, ddp = runs["one"], runs["ddp"]
    assert (one.world_size, ddp.world_size) == (1, 2)
    assert {(r["backend"], r["distributed_type"], r["threads"]) for r in ddp.ranks} == {("gloo", "MULTI_CPU", 1)}
    assert len({r["pid"] for r in ddp.ranks}) == 2
    assert ddp.losses == pytest.approx(one.losses, rel=1e-4)
    w1, w2 = one.adapter_weights(), ddp.adapter_weights()
    assert set(w1) == set(w2) and len(w1) == 2 * 4 * 2  # lora_A and lora_B of q_proj and v_proj in 4 layers
    assert any(w1[k].abs().max() > 0 for k in w1 if "lora_B" in k), "B starts at zero: the runs must have trained"
    # equal to float rounding (the all-reduce adds in another order), far closer than the per-rank-mean trap
    assert _difference(one, ddp) < 1e-4
    assert _difference(one, runs["mean"]) > 10 * _difference(one, ddp)


def _difference(a, b) -> float:
    wa, wb = a.adapter_weights(), b.adapter_weights()
    assert set(wa) == set(wb)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_mean_per_rank_does_not_step_like_one_process(runs):
    """The course tasks mixed: answers of 2 and 4 tokens, so the slices hold different numbers of them."""
    assert _difference(runs["one"], runs["mean"]) > 1e-4
    assert any(abs(a - b) > 1e-4 * abs(b) for a, b in zip(runs["mean"].losses, runs["one"].losses))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_only_rank_0_writes_the_adapter(runs):
    for run in (runs["ddp"], runs["fsdp"]):
        assert [r["wrote_adapter"] for r in run.ranks] == [True, False]
        assert sorted(p.name for p in run.adapter_dir.iterdir()) == ["README.md", "adapter_config.json",
                                                                    "adapter_model.safetensors"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fsdp2_shards_the_model_and_steps_like_one_process(runs):
    one, fsdp = runs["one"], runs["fsdp"]
    full = one.ranks[0]["local_param_bytes"]
    for r in fsdp.ranks:
        assert r["local_param_bytes"] == pytest.approx(full / 2, rel=0.01), "each rank should hold half the weights"
    assert fsdp.losses == pytest.approx(one.losses, rel=1e-4)
    assert _difference(one, fsdp) < 1e-4
    assert _difference(one, runs["mean"]) > 10 * _difference(one, fsdp)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_crashed_worker_ends_the_run_with_its_rank_and_error(tmp_path):
    """The surviving rank is stopped rather than left waiting for its peer: its collectives would wait 600 s
    (timeout_s), and a launch still running after 120 s is killed with another error than the crash's."""
    with pytest.raises(launch.DistributedRunError, match=r"rank 1 failed: RuntimeError: rank 1 was told to crash"):
        _launch(tmp_path, "crash", 2, timeout=120, crash_rank=1, max_steps=3, timeout_s=600)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_launch_that_overruns_its_timeout_is_stopped(tmp_path):
    cfg = distributed.RunConfig(out_dir=str(tmp_path / "slow" / "out"), **{**RUN, "max_steps": 10_000})
    files = launch.write_launch_files(tmp_path / "slow", cfg, 2)
    with pytest.raises(launch.DistributedRunError, match="did not finish within 20 s"):
        launch.accelerate_launch(files, timeout=20)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_written_script_runs_under_torchrun_too(tmp_path):
    """The script's docstring offers `torchrun --nproc_per_node 2 train_lora.py config.json`: it works."""
    cfg = distributed.RunConfig(out_dir=str(tmp_path / "out"), **{**RUN, "max_steps": 2})
    files = launch.write_launch_files(tmp_path, cfg, 2)
    assert "torchrun --nproc_per_node 2 train_lora.py config.json" in files["script"].read_text()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(launch.free_port()), str(files["script"]), str(files["config"])],
                         capture_output=True, text=True, timeout=280, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    run = launch.collect(tmp_path / "out")
    assert run.world_size == 2 and [r["wrote_adapter"] for r in run.ranks] == [True, False]


def test_launch_files_refuse_a_batch_the_processes_cannot_split(tmp_path):
    with pytest.raises(ValueError, match="does not split evenly over 3 processes"):
        launch.write_launch_files(tmp_path, distributed.RunConfig(out_dir=str(tmp_path), global_batch_size=8), 3)


NOTEBOOK = """
import json, sys
from lorakit import distributed, launch
cfg = distributed.RunConfig(out_dir=sys.argv[1], max_steps=2, global_batch_size=4, n_train=32, crash_rank={crash})
try:
    r = launch.notebook_launch(cfg, 2)
    print("RESULT=" + json.dumps([r.world_size, [x["wrote_adapter"] for x in r.ranks]]))
except launch.DistributedRunError as e:
    print("ERROR=" + str(e))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("crash", [None, 0])
def test_notebook_launcher_runs_two_processes_and_reports_a_crash(tmp_path, crash):
    """accelerate's notebook_launcher forks the calling process, which must not have imported bitsandbytes:
    run it from a fresh interpreter, as a notebook kernel would."""
    res = subprocess.run([sys.executable, "-c", NOTEBOOK.format(crash=crash), str(tmp_path)], capture_output=True,
                         text=True, timeout=280, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    if crash is None:
        assert "RESULT=[2, [true, false]]" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    else:
        assert "ERROR=rank 0 failed: RuntimeError: rank 0 was told to crash" in res.stdout, res.stdout[-2000:]


@pytest.mark.slow
def test_notebook_launcher_refuses_after_bitsandbytes_is_imported(tmp_path):
    code = ("import bitsandbytes\nfrom lorakit import distributed, launch\n"
            f"launch.notebook_launch(distributed.RunConfig(out_dir={str(tmp_path)!r}), 2)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "keep these imports inside your training function" in res.stderr


# ----------------------------------------------------------------------- FSDP + QLoRA files, for GPUs

FILES = distributed.fsdp_qlora_files()


def _accelerate_config() -> dict:
    return yaml.safe_load(FILES["accelerate_config"].read_text())


def test_the_fsdp_qlora_config_is_a_valid_accelerate_config():
    from accelerate.commands.config.config_args import load_config_from_file
    cfg = load_config_from_file(str(FILES["accelerate_config"]))
    assert str(cfg.distributed_type).endswith("FSDP") and cfg.num_processes == 2 and cfg.mixed_precision == "no"
    fsdp = cfg.fsdp_config
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["fsdp_offload_params"] is True
    assert fsdp["fsdp_cpu_ram_efficient_loading"] and not fsdp["fsdp_use_orig_params"]


def _script_dtypes() -> tuple[str, str]:
    """The 4-bit storage and the model dtype the training script passes, read from its source."""
    tree = ast.parse(FILES["script"].read_text())
    consts = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}
    calls = {ast.unparse(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
    storage_var = next(ast.unparse(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                       and ast.unparse(n.targets[0]) == "storage")
    assert storage_var == "getattr(torch, QUANT_STORAGE)"
    bnb = {k.arg: ast.unparse(k.value) for k in calls["BitsAndBytesConfig"].keywords}
    load = {k.arg: ast.unparse(k.value) for k in calls["AutoModelForCausalLM.from_pretrained"].keywords}
    assert bnb["bnb_4bit_quant_storage"] == "storage" and load["dtype"] == "storage"
    assert bnb["load_in_4bit"] == "True" and bnb["bnb_4bit_quant_type"] == "'nf4'"
    return consts["QUANT_STORAGE"], consts["QUANT_STORAGE"]


def test_the_script_stores_4bit_weights_in_a_dtype_fsdp_can_shard():
    storage, dtype = _script_dtypes()
    summary = distributed.check_fsdp_qlora(_accelerate_config(), storage, dtype)
    assert "FULL_SHARD over 2 processes" in summary and "bfloat16" in summary


FSDP2 = {"fsdp_version": 2}


@pytest.mark.parametrize("change, words", [
    (dict(storage="uint8"), "bnb_4bit_quant_storage=torch.bfloat16"),
    (dict(dtype="float32"), "load with dtype=torch.bfloat16"),
    (dict(config={"mixed_precision": "fp16"}, trainer=False), "without transformers' Trainer nothing stops it"),
    (dict(storage="float32", dtype="float32", mixed_precision="bf16", trainer=False), "cast every parameter to bfloat16"),
    (dict(storage="float32", dtype="float32", mixed_precision="bf16", fsdp=FSDP2), "under FSDP2 Trainer does not"),
    (dict(config={"distributed_type": "MULTI_GPU"}), "distributed_type: FSDP"),
    (dict(mixed_precision="fp8"), "'no', 'bf16' or 'fp16'"),
])
def test_check_fsdp_qlora_refuses_what_fsdp_cannot_train(change, words):
    cfg = {**_accelerate_config(), **change.get("config", {})}
    cfg["fsdp_config"] = {**cfg["fsdp_config"], **change.get("fsdp", {})}
    with pytest.raises(ValueError, match=words):
        distributed.check_fsdp_qlora(cfg, change.get("storage", torch.bfloat16), change.get("dtype", torch.bfloat16),
                                     mixed_precision=change.get("mixed_precision"), trainer=change.get("trainer", True))


@pytest.mark.parametrize("storage, mixed", [("bfloat16", "bf16"), ("float32", "bf16"), ("float32", "no"),
                                            ("bfloat16", "no"), ("float32", "fp16")])
def test_check_fsdp_qlora_accepts_mixed_precision_where_nothing_casts_the_packed_weights(storage, mixed):
    """Under Trainer with FSDP1 any mixed precision works with bf16 or fp32 storage (peft's guide: fp32 "for automatic
    mixed precision"); without Trainer, and under FSDP2, only 'no' or the storage dtype itself."""
    cfg = _accelerate_config()
    assert "FULL_SHARD" in distributed.check_fsdp_qlora(cfg, storage, storage, mixed_precision=mixed)
    fsdp2 = {**cfg, "fsdp_config": {**cfg["fsdp_config"], **FSDP2}}
    same = mixed == "no" or {"bf16": "bfloat16", "fp16": "float16"}[mixed] == storage
    for config, trainer in ((cfg, False), (fsdp2, True)):
        if same:
            distributed.check_fsdp_qlora(config, storage, storage, mixed_precision=mixed, trainer=trainer)
        else:
            with pytest.raises(ValueError, match="turns their bytes into other weights"):
                distributed.check_fsdp_qlora(config, storage, storage, mixed_precision=mixed, trainer=trainer)


def test_a_cast_to_another_dtype_rewrites_packed_weights_and_trainer_prevents_it_under_fsdp1():
    """What check_fsdp_qlora's rule rests on, in the installed libraries: FSDP's MixedPrecision cast of 4-bit weights
    packed as float32 to bf16 changes their bytes (and the weights), the cast to float32 does not; accelerate sets
    FSDP's param_dtype to the run's mixed precision, and transformers' Trainer (FSDP1, a peft model on 4-bit weights
    stored in a float dtype) resets it to the storage dtype; under FSDP2 Trainer does not call that reset."""
    import inspect
    import warnings
    from types import SimpleNamespace

    import bitsandbytes.functional as bnbF
    from accelerate.utils import FullyShardedDataParallelPlugin
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer
    from transformers.distributed.fsdp import update_fsdp_plugin_peft

    from lorakit import models

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.float32)
    same = bnbF.dequantize_4bit(packed.to(torch.float32), state)
    cast = bnbF.dequantize_4bit(packed.to(torch.bfloat16).to(torch.float32), state)
    assert torch.equal(same, bnbF.dequantize_4bit(packed, state))
    assert (cast - w).abs().max() > max(w.abs().max(), 5 * (same - w).abs().max())   # errors larger than the weights
    assert (packed.to(torch.bfloat16).to(torch.float32).view(torch.uint8) != packed.view(torch.uint8)).float().mean() > 0.3

    plugin = FullyShardedDataParallelPlugin(fsdp_version=1)
    plugin.set_mixed_precision("bf16")
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_quant_storage=torch.float32,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(models.resolve(models.TINY), dtype=torch.float32,
                                                     quantization_config=quant, device_map={"": "cpu"})
        model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    update_fsdp_plugin_peft(model, SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
    assert plugin.mixed_precision_policy.param_dtype == torch.float32
    loop = inspect.getsource(Trainer._prepare_for_training)
    assert "update_fsdp_plugin_peft" in loop and "delay_optimizer_creation = False" in loop and "is_fsdp2" in loop


def _launch_lines() -> dict[str, list[str]]:
    """The launch script's two commands, with line continuations joined and $HERE resolved."""
    text = FILES["launch"].read_text().replace("\\\n", " ")
    lines = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("accelerate launch", "torchrun")):
            words = shlex.split(line.replace('"$@"', ""))
            words = [w.replace("$HERE", str(FILES["launch"].parent)) for w in words]
            lines[words[0]] = words[1:] if words[0] == "torchrun" else words[2:]
    return lines


def test_launch_script_commands_parse_with_the_launchers_own_parsers():
    res = subprocess.run(["bash", "-n", str(FILES["launch"])], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = _launch_lines()
    from accelerate.commands.launch import launch_command_parser
    acc = launch_command_parser().parse_args(lines["accelerate"])
    assert Path(acc.config_file) == FILES["accelerate_config"] and Path(acc.training_script) == FILES["script"]
    assert acc.training_script_args[:2] == ["--fsdp_config", str(FILES["accelerate_config"])]
    from torch.distributed.run import get_args_parser
    env = {"${NNODES:?set NNODES}": "2", "${GPUS_PER_NODE:-8}": "8", "${NODE_RANK:?set NODE_RANK}": "0",
           "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}": "10.0.0.1:29500"}
    args = [env.get(w, w) for w in lines["torchrun"]]
    run = get_args_parser().parse_args(args)
    assert (run.nnodes, run.nproc_per_node, run.node_rank, run.rdzv_backend) == ("2", "8", 0, "c10d")
    assert run.rdzv_endpoint == "10.0.0.1:29500" and Path(run.training_script) == FILES["script"]
    assert run.training_script_args[:2] == ["--fsdp_config", str(FILES["accelerate_config"])]
    from importlib.util import module_from_spec, spec_from_file_location
    spec = spec_from_file_location("train_fsdp_qlora", FILES["script"])
    script = module_from_spec(spec)
    spec.loader.exec_module(script)
    parsed = script.parse_args(run.training_script_args)  # the script accepts what both launchers pass it
    assert parsed.fsdp_config == str(FILES["accelerate_config"])


def test_trainer_accepts_the_configs_fsdp_settings(tmp_path):
    from importlib.util import module_from_spec, spec_from_file_location
    from transformers import TrainingArguments
    spec = spec_from_file_location("train_fsdp_qlora", FILES["script"])
    script = module_from_spec(spec)
    spec.loader.exec_module(script)
    fsdp = script.trainer_fsdp_args(_accelerate_config())
    assert fsdp["fsdp"] == "full_shard auto_wrap offload"
    plugin = TrainingArguments(output_dir=str(tmp_path), **fsdp).fsdp_plugin_args
    assert plugin["fsdp_version"] == 1 and plugin["cpu_offload"] is True and plugin["use_orig_params"] is False
    assert plugin["cpu_ram_efficient_loading"] is True and plugin["sync_module_states"] is True
    assert plugin["state_dict_type"] == "SHARDED_STATE_DICT" and plugin["backward_prefetch"] == "BACKWARD_PRE"


def test_multi_node_launch_without_its_settings_says_which(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR")}
    res = subprocess.run(["bash", str(FILES["launch"]), "multi-node"], capture_output=True, text=True, env=env,
                         timeout=30)
    assert res.returncode != 0 and "set NNODES" in res.stderr


@pytest.mark.hardware
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gets")
def test_the_gpu_script_stops_at_once_without_cuda():
    res = subprocess.run([sys.executable, str(FILES["script"]), "--fsdp_config", str(FILES["accelerate_config"])],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "FSDP + QLoRA needs NVIDIA GPUs" in res.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP + QLoRA needs a CUDA device")
@pytest.mark.timeout(900)
def test_fsdp_qlora_trains_on_one_gpu(tmp_path):
    """The shipped config and script with one process: bitsandbytes' 4-bit weights stored as bf16 under FSDP."""
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
           str(FILES["accelerate_config"]), "--num_processes", "1", str(FILES["script"]), "--fsdp_config",
           str(FILES["accelerate_config"]), "--max_steps", "3", "--seq_len", "256", "--output_dir", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "peak GPU memory allocated" in res.stdout
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP + QLoRA on two GPUs needs two CUDA devices")
@pytest.mark.timeout(900)
def test_fsdp_qlora_trains_on_two_gpus(tmp_path):
    res = subprocess.run(["bash", str(FILES["launch"]), "two-gpu", "--max_steps", "3", "--seq_len", "256",
                          "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8
