"""Checks for lesson 08 (past one device), judged (see lorakit.checks.judged): the learner's functions are
probed on inputs drawn from a seed, and the answers are compared with the kit's references, which have the
exercises' names and signatures: `lorakit.sharding.per_device_bytes` (per-device memory under ZeRO) and
`lorakit.distributed.rank_loss`."""

from __future__ import annotations

from lorakit.checks import close, expect
from lorakit.checks.judged import judged_check

# The ZeRO paper's worked example (Rajbhandari et al. 2019, Figure 1): 7.5B parameters, 64 devices, mixed-
# precision Adam (K = 12), per-device memory of the model states in GB at stages 0 (DDP) to 3.
ZERO_EXAMPLE = {"n_params": 7_500_000_000, "world_size": 64, "k": 12, "published_gb": [120, 31.4, 16.6, 1.9]}
# K (bytes of optimizer state per parameter, the fp32 master copy included) drawn from what real setups keep:
# Adam with an fp32 master copy (12), bf16 Adam states (8), 8-bit Adam (6), SGD with a master copy (4),
# 8-bit Adam without one (2), plain SGD (0).
K_VALUES = (0, 2, 4, 6, 8, 12)
STAGE_HINTS = {
    0: "stage 0 is plain data parallel: every device holds bf16 weights (2), bf16 gradients (2) and K bytes of "
       "optimizer state per parameter: (2 + 2 + K) * n_params.",
    1: "stage 1 shards only the optimizer states: 2 + 2 bytes per parameter stay whole, K is divided by "
       "world_size: (2 + 2) * n + K * n / world_size.",
    2: "stage 2 shards the gradients too: only the bf16 weights stay whole: 2 * n + (2 + K) * n / world_size.",
    3: "stage 3 shards everything: (2 + 2 + K) * n / world_size.",
}


@judged_check
class zero_bytes:
    """`per_device_bytes(n_params, world_size, stage, k=12)`: bytes of model states on one device."""
    answer = {"bytes": [object]}
    reference = ("lorakit.sharding.per_device_bytes",)

    def draw(rng):
        ex = ZERO_EXAMPLE
        cases = [[ex["n_params"], ex["world_size"], stage, ex["k"]] for stage in range(4)]
        for _ in range(8):
            cases.append([rng.integer(10**8, 10**12), rng.choice([1, 2, 3, 8, 64, 100, 1024]), rng.integer(0, 3),
                          rng.choice(K_VALUES)])
        return {"cases": cases}

    def probe(inputs, fn):
        out = []
        for n, world, stage, k in inputs["cases"]:
            v = fn(n, world, stage, k)
            out.append(v if type(v) in (int, float) else repr(v)[:60])
        return {"bytes": out}

    def judge(inputs, answer):
        from lorakit.sharding import per_device_bytes
        expect(len(answer["bytes"]) == len(inputs["cases"]), "`per_device_bytes` should return one number per call.")
        for (n, world, stage, k), got in zip(inputs["cases"], answer["bytes"]):
            want = per_device_bytes(n, world, stage, k)
            expect(type(got) in (int, float) and close(got, want, rel=1e-3),
                   f"stage {stage}, {n:,} parameters on {world} device(s), K = {k}: expected about {want / 1e9:,.4g} GB "
                   f"({want:,} bytes) per device, found {got!r}.",
                   STAGE_HINTS[stage] + " Return bytes, not GB.")
        gb = ", ".join(f"{b / 1e9:.3g}" for b in answer["bytes"][:4])
        paper = ", ".join(str(g) for g in ZERO_EXAMPLE["published_gb"])
        return f"7.5B parameters on 64 devices, stages 0-3: {gb} GB per device (the ZeRO paper: {paper} GB)"


def _rank_loss_reference(logits, labels, n_label, world):
    from lorakit.distributed import rank_loss
    logits = logits.clone().requires_grad_(True)
    loss = rank_loss(logits, labels, n_label, world)
    loss.backward()
    return float(loss.detach()), logits.grad


@judged_check
class rank_loss:
    """`rank_loss(logits, labels, n_label_tokens, world_size)`: one process's share of the batch loss."""
    answer = {"losses": [object], "grads": [object]}
    reference = ("lorakit.distributed.rank_loss",)

    def draw(rng):
        world = rng.integer(2, 4)
        vocab, length = 11, rng.integer(5, 9)
        slices = []
        for rank in range(world):
            b = rng.integer(2, 3) if rank == 0 else rng.integer(1, 3)   # one slice of several rows at least
            labels = rng.randint(0, vocab, (b, length))
            # a prompt of random length without loss, then the answer; sometimes padding at the end
            for row in range(b):
                start = rng.integer(1, length - 2)
                stop = rng.integer(start + 1, length)
                labels[row, :start] = -100
                labels[row, stop:] = -100
            slices.append({"logits": rng.randn(b, length, vocab), "labels": labels})
        n_label = int(sum(int((s["labels"][:, 1:] != -100).sum()) for s in slices))  # >= 1 per row
        return {"world_size": world, "n_label_tokens": n_label, "slices": slices}

    def probe(inputs, fn):
        losses, grads = [], []
        for s in inputs["slices"]:
            logits = s["logits"].clone().requires_grad_(True)
            loss = fn(logits, s["labels"].clone(), inputs["n_label_tokens"], inputs["world_size"])
            if not hasattr(loss, "backward"):
                losses.append(loss if type(loss) in (int, float) else repr(loss)[:60])
                grads.append(None)
                continue
            if loss.dim():
                losses.append(f"a tensor of shape {tuple(loss.shape)}, not a single number")
                grads.append(None)
                continue
            losses.append(float(loss.detach()))
            if loss.requires_grad:
                loss.backward()
            grads.append(logits.grad)
        return {"losses": losses, "grads": grads}

    def judge(inputs, answer):
        import torch
        world, n_label = inputs["world_size"], inputs["n_label_tokens"]
        expect(len(answer["losses"]) == world, "`rank_loss` should be called once per process' slice.")
        batch_loss = 0.0
        for r, (s, got, grad) in enumerate(zip(inputs["slices"], answer["losses"], answer["grads"])):
            want, want_grad = _rank_loss_reference(s["logits"], s["labels"], n_label, world)
            batch_loss += want / world
            expect(type(got) in (int, float) and close(got, want, rel=1e-4, abs_=1e-6),
                   f"rank {r} of {world} (its slice has {int((s['labels'][:, 1:] != -100).sum())} of the batch's "
                   f"{n_label} labelled tokens): expected {want:.6g}, found {got!r}.",
                   "position i predicts label i + 1 (compare logits[:, :-1] with labels[:, 1:]); skip labels of -100; "
                   "SUM the token cross-entropies of this slice, divide by the whole batch's n_label_tokens and "
                   "multiply by world_size (the all-reduce averages over processes).")
            expect(isinstance(grad, torch.Tensor) and grad.shape == want_grad.shape,
                   f"rank {r}: the loss has no gradient with respect to the logits.",
                   "return a torch tensor computed from the logits (no .item(), no float()), so that backward() reaches them.")
            expect(torch.allclose(grad, want_grad, rtol=1e-4, atol=1e-7),
                   f"rank {r}: the value is right but the gradient is not (largest difference "
                   f"{(grad - want_grad).abs().max().item():.3g}).",
                   "compute the loss from the logits with torch operations only.")
        return (f"{world} slices: the average of the ranks' losses, {batch_loss:.4f}, is the whole batch's mean "
                "token loss, and so is the average of their gradients")
