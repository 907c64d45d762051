"""What the model-level checks of lessons 02 and 04 build: small Llamas, and adapters drawn for them.

A check of `inject_lora` or `quantize_and_inject` runs the learner's function on a small Llama (the embedded
model's shapes for the notebook's own call, made-up shapes when graded), then sets drawn non-zero adapters
through the learner's own layers before it compares outputs: with B = 0, doing nothing gives the right answer.
The models come from `lorakit.models.seeded_llama` (every weight from an explicit generator, so the grader's
threads agree); this module holds what both lessons' checks draw and set on them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.checks.judged import as_tensor
from lorakit.models import building, tiny_config


def small_config(rng=None) -> dict:
    """A small Llama config as a dict: the embedded model's shapes with two blocks and a 256-token vocabulary;
    with an Rng, made-up shapes (grouped-query attention sometimes)."""
    if rng is None:
        return tiny_config(num_hidden_layers=2, vocab_size=256)
    heads = rng.choice([2, 3, 4])
    head_dim = rng.choice([16, 32])
    return dict(hidden_size=heads * head_dim, intermediate_size=64 * rng.integer(1, 4), num_hidden_layers=rng.integer(1, 2),
                num_attention_heads=heads, num_key_value_heads=rng.choice([k for k in (1, heads) if heads % k == 0]),
                head_dim=head_dim, vocab_size=rng.integer(128, 300), max_position_embeddings=64,
                tie_word_embeddings=rng.choice([True, False]), bos_token_id=0, eos_token_id=0, pad_token_id=1)


def linear_shapes(config: dict, targets) -> dict[str, list[int]]:
    """{name: [out, in]} of the `targets` linear layers of a Llama of `config`, sorted by name (shapes only:
    built on the meta device, no weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    with building(), torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    return {name: [m.out_features, m.in_features] for name, m in sorted(model.named_modules())
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets}


def alpha_for(rng, r: int, choices) -> int:
    """An alpha from `choices` that r does not divide (else one other than r): with alpha = r the scaling is 1,
    so multiplying by it and dividing by it give the same numbers, and alpha // r would equal alpha / r."""
    return rng.choice([a for a in choices if a % r] or [a for a in choices if a != r])


def draw_adapters(rng, config: dict, targets, r: int) -> dict[str, list]:
    """Non-zero adapters for every target layer: {name: [A (r, in), B (out, r)]}, as if trained."""
    return {name: [rng.randn(r, d_in) / math.sqrt(d_in), rng.randn(d_out, r) * 0.3]
            for name, (d_out, d_in) in linear_shapes(config, targets).items()}


def set_adapters(layer, A, B) -> bool:
    """Put the drawn A and B into the learner's layer (when the shapes allow); whether it was done."""
    if tuple(layer.lora_A.weight.shape) != tuple(A.shape) or tuple(layer.lora_B.weight.shape) != tuple(B.shape):
        return False
    with torch.no_grad():
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)
    return True


def has_adapters(module) -> bool:
    """Whether `module` has lora_A and lora_B linear layers (the learner's, the kit's or any LoRA layer's)."""
    return isinstance(getattr(module, "lora_A", None), nn.Linear) and isinstance(getattr(module, "lora_B", None), nn.Linear)


def set_drawn_adapters(model, adapters: dict) -> list[str]:
    """Set each drawn (A, B) through the layer of that name in `model` (the learner's own adapter modules);
    the names that took them (a layer that is missing, has no lora_A / lora_B or other shapes does not)."""
    done = []
    for name, (A, B) in adapters.items():
        try:
            layer = model.get_submodule(name)
            if has_adapters(layer) and set_adapters(layer, A, B):
                done.append(name)
        except AttributeError:
            continue
    return done


def logits(model, ids) -> torch.Tensor:
    """The model's logits on `ids`, without gradients, as data."""
    with torch.no_grad():
        return as_tensor(model(ids).logits)


def adapter_grads(model, ids) -> dict:
    """{name: [grad of lora_A, grad of lora_B]} of every layer with adapters after one backward of the loss
    on `ids` (train mode), None where there is no gradient."""
    model.train()
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    return {name: [None if g is None else as_tensor(g) for g in (m.lora_A.weight.grad, m.lora_B.weight.grad)]
            for name, m in model.named_modules() if has_adapters(m)}
