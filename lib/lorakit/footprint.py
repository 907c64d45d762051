"""Footprints: how many bytes real tensors hold, measured rather than estimated.

`lorakit.memory` computes what a model and its training step should need from a config alone; this module
measures what a loaded model and a real training step do hold, so the two can be read side by side (lessons
01, 04 and 06):

- `measure(model)`: the bytes a loaded model's tensors really hold, including bitsandbytes' 4-bit
  quantization constants (`quant_state_tensors`), which transformers' `get_memory_footprint()` leaves out;
- `measure_training_step(model, batch)`: the same per part of one real training step, keyed like
  `lorakit.memory.estimate(...).parts`;
- `saved_tensors_meter` / `saved_bytes`: what autograd keeps for the backward pass (lesson 04's
  recomputation, lesson 06's measured activations).
"""

from __future__ import annotations

from contextlib import contextmanager

__all__ = ["quant_state_tensors", "measure", "saved_tensors_meter", "saved_bytes", "measure_training_step"]


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def quant_state_tensors(param) -> list:
    """The tensors a bitsandbytes 4-bit parameter keeps beside its packed bytes (absmax, code, and with
    double quantization the offset and the nested absmax and code); [] for an ordinary tensor."""
    import torch
    qs = getattr(param, "quant_state", None)
    out = []
    while qs is not None:
        for attr in ("absmax", "code", "offset"):
            t = getattr(qs, attr, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
        qs = getattr(qs, "state2", None)
    scb = getattr(param, "SCB", None)  # 8-bit (LLM.int8) row scales
    if isinstance(scb, torch.Tensor):
        out.append(scb)
    return out


def measure(model, *, buffers: bool = True) -> int:
    """Bytes held by `model`'s parameters (each shared tensor once), buffers, and bitsandbytes
    quantization constants. Works on the meta device too (no memory is held there, but the sizes are)."""
    seen: set = set()
    total = 0

    def add(t):
        nonlocal total
        key = id(t) if t.device.type == "meta" else (t.device.type, t.untyped_storage().data_ptr(),
                                                       t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += _tensor_bytes(t)

    for p in model.parameters():
        add(p)
        for t in quant_state_tensors(p):
            add(t)
    if buffers:
        for b in model.buffers():
            add(b)
    return total


def _storage_key(t):
    return (t.device.type, t.untyped_storage().data_ptr())


@contextmanager
def saved_tensors_meter(exclude=None):
    """Count the bytes autograd saves for the backward pass inside the `with` block (each storage once).
    Tensors `exclude` already holds cost nothing extra and are left out: a module (its parameters and
    buffers) or an iterable of tensors. Yields a dict whose "bytes" and "tensors" entries grow as tensors
    are saved (`torch.autograd.graph.saved_tensors_hooks`)."""
    import torch

    if exclude is None:
        held_tensors = ()
    elif hasattr(exclude, "parameters") and hasattr(exclude, "buffers"):
        held_tensors = (*exclude.parameters(), *exclude.buffers())
    else:
        held_tensors = tuple(exclude)
    held = {_storage_key(t) for t in held_tensors}
    seen: set = set()
    meter = {"bytes": 0, "tensors": 0}

    def pack(t):
        key = _storage_key(t)
        if key not in held and key not in seen:
            seen.add(key)
            meter["bytes"] += t.untyped_storage().nbytes()
            meter["tensors"] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield meter


def saved_bytes(fn, *args, exclude=None) -> int:
    """Bytes autograd keeps for backward while computing `fn(*args)` (see `saved_tensors_meter`)."""
    with saved_tensors_meter(exclude) as meter:
        fn(*args)
    return meter["bytes"]


def measure_training_step(model, batch: dict, optimizer=None, *, autocast_dtype=None) -> dict[str, int]:
    """Bytes one training step of `model` holds, measured part by part on a real forward and backward pass
    over `batch` (a dict of tensors such as input_ids / attention_mask / labels). The keys are those of
    `lorakit.memory.estimate(...).parts`, so the two can be read side by side:

    - "weights": parameters that do not train (the frozen base, 4-bit weights as their packed bytes) and
      buffers; "quantization constants": bitsandbytes' absmax and codes; "adapters": trainable parameters;
    - "gradients": the `.grad` of every trainable parameter after `loss.backward()`;
    - "optimizer states": the tensors `optimizer.state` holds (AdamW: m and v, plus a step count). Without an
      optimizer (or one that has not stepped yet), a throwaway `torch.optim.AdamW(lr=0)` takes one step so that
      its states exist; with lr = 0 the weights do not move;
    - "activations": every tensor autograd saves for the backward pass (`torch.autograd.graph.saved_tensors_hooks`)
      that is not a parameter or buffer, each storage counted once: layer inputs, attention and MLP
      intermediates, the logits, and the 16-bit copies autocast makes of fp32 weights.

    The model's gradients are cleared afterwards (set to None) and its train/eval mode is put back."""
    import torch

    params = list(model.parameters())
    owned = {}  # storage -> the tensor, for everything the model itself holds
    parts = {"weights": 0, "quantization constants": 0, "adapters": 0}

    def own(t, part):
        key = _storage_key(t)
        if key not in owned:
            owned[key] = t
            parts[part] += _tensor_bytes(t)

    for p in params:
        own(p, "adapters" if p.requires_grad else "weights")
        for t in quant_state_tensors(p):
            own(t, "quantization constants")
    for b in model.buffers():
        own(b, "weights")

    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters: add adapters (peft's get_peft_model) first")
    was_training = model.training
    model.train()
    device = trainable[0].device
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    try:
        with saved_tensors_meter(exclude=owned.values()) as saved, \
                torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        grads = {}
        for p in trainable:
            if p.grad is not None:
                grads.setdefault(_storage_key(p.grad), _tensor_bytes(p.grad))
        parts["gradients"] = sum(grads.values())
        if optimizer is None or not optimizer.state:
            optimizer = torch.optim.AdamW(trainable, lr=0.0)
            optimizer.step()
        states = {}
        for state in optimizer.state.values():
            for t in state.values():
                if isinstance(t, torch.Tensor):
                    states.setdefault(_storage_key(t), _tensor_bytes(t))
        parts["optimizer states"] = sum(states.values())
        parts["activations"] = saved["bytes"]
    finally:
        for p in trainable:
            p.grad = None
        model.train(was_training)
    return parts
