"""Lesson 05's graded adapter: what the probe sends of a learner's fine-tuned model, and what the grader rebuilds.

The `improvement` check (lorakit.checks.finetune) never trusts the notebook's scores. Its probe sends the adapter
as data (`adapter_as_data`: tensors, LoRA settings, how the base was loaded); its judge validates that data and
rebuilds the model from it (`rebuild`: the base loaded as the learner loaded it, the adapter on top, its rank read
from the tensors' shapes, never from a number in the reply), then measures it on questions the grader draws.
"""

from __future__ import annotations

import torch

from lorakit.checks import expect
from lorakit.models import building

QUANT_KEYS = {"load_in_4bit": bool, "bnb_4bit_quant_type": ("nf4", "fp4"), "bnb_4bit_use_double_quant": bool,
              "bnb_4bit_compute_dtype": ("float32", "bfloat16", "float16")}


def adapter_as_data(model) -> dict:
    """What the judge needs to rebuild the learner's fine-tuned model: the adapter's tensors, its LoRA
    settings and how the base was loaded (data only)."""
    from peft import get_peft_model_state_dict
    cfg = model.peft_config[model.active_adapter]
    quant = getattr(model.config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else (quant or {})
    targets = cfg.target_modules
    return {"tensors": {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(model).items()},
            "r": cfg.r, "alpha": cfg.lora_alpha, "use_rslora": bool(getattr(cfg, "use_rslora", False)),
            "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else str(targets),
            "base": str(cfg.base_model_name_or_path),
            "quantization": {k: str(quant[k]).removeprefix("torch.") if k == "bnb_4bit_compute_dtype" else quant[k]
                             for k in QUANT_KEYS if k in quant}}


def base_model_id(name: str) -> str:
    """The model id of the adapter's base, if it is one the grader may load: the embedded model (by id or
    by its packaged folder) or a preset (from the local cache: the grader is offline)."""
    import os

    from lorakit.models import PRESETS, TINY, TINY_PATH
    if name == TINY or os.path.realpath(name) == os.path.realpath(TINY_PATH):
        return TINY
    ids = {p.model_id for p in PRESETS.values()}
    expect(name in ids, f"the adapter's base model is {name!r}; the grader evaluates adapters of the embedded model "
           f"({TINY}) or of {sorted(ids)}.", "fine-tune the lesson's MODEL_ID.")
    return name


def adapter_rank(adapter: dict, model, targets) -> int:
    """The adapter's rank, from its tensors' shapes checked against the base model's layers: every target
    layer has a lora_A of (r, in) and a lora_B of (out, r) with one r (at most min(in, out)), and nothing else.
    The size of what the grader builds comes from these validated shapes, never from a number in the reply."""
    expected = {}
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and hasattr(m, "in_features") and hasattr(m, "out_features"):
            expected[f"base_model.model.{name}.lora_A.weight"] = (m.in_features, m.out_features, "A")
            expected[f"base_model.model.{name}.lora_B.weight"] = (m.in_features, m.out_features, "B")
    tensors = adapter["tensors"]
    unexpected, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
    expect(expected and not unexpected and not missing, f"the adapter does not fit its base model: unexpected tensors "
           f"{unexpected[:3]}, missing {missing[:3]}.")
    ranks = set()
    for key, (d_in, d_out, part) in expected.items():
        t = tensors[key]
        r = t.shape[0] if part == "A" else (t.shape[1] if t.dim() == 2 else -1)
        want = (r, d_in) if part == "A" else (d_out, r)
        expect(t.dim() == 2 and tuple(t.shape) == want and 1 <= r <= min(d_in, d_out) and t.is_floating_point(),
               f"the adapter's {key} has shape {tuple(t.shape)}, which does not fit a layer of {d_in} -> {d_out}.")
        ranks.add(r)
    expect(len(ranks) == 1 and adapter["r"] in ranks, f"the adapter's tensors have ranks {sorted(ranks)} and its "
           f"config says r={adapter['r']}: they should agree.")
    return ranks.pop()


def rebuild(adapter: dict, allowed_targets):
    """The base model loaded as the learner loaded it, with the learner's adapter: (model, tokenizer). The adapter's
    target modules must be names from `allowed_targets` (never a regex)."""
    import warnings

    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import BitsAndBytesConfig

    from lorakit import models
    q = adapter["quantization"]
    for k, v in q.items():
        allowed = QUANT_KEYS[k]
        expect(isinstance(v, allowed) if isinstance(allowed, type) else v in allowed,
               f"the base model's quantization setting {k}={v!r} is not one the lesson uses.")
    quantization = None
    if q.get("load_in_4bit"):
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.get("bnb_4bit_quant_type", "nf4"),
                                          bnb_4bit_use_double_quant=q.get("bnb_4bit_use_double_quant", False),
                                          bnb_4bit_compute_dtype=getattr(torch, q.get("bnb_4bit_compute_dtype", "float32")))
    targets = adapter["target_modules"]
    expect(isinstance(targets, list) and targets and set(targets) <= set(allowed_targets),  # names, never a regex
           f"the adapter targets {targets!r}; the grader rebuilds adapters on a list of {list(allowed_targets)}.")
    with building():
        model, tokenizer = models.load_base(base_model_id(adapter["base"]), quantization=quantization, device="cpu",
                                            dtype=torch.float32)
    r = adapter_rank(adapter, model, targets)
    with warnings.catch_warnings(), building():   # peft draws lora_A from the global generator: overwritten
        warnings.simplefilter("ignore")
        config = LoraConfig(r=r, lora_alpha=adapter["alpha"], use_rslora=adapter["use_rslora"],
                            target_modules=list(targets), task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        result = set_peft_model_state_dict(peft_model, adapter["tensors"])
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    expect(not unexpected, f"the adapter does not fit its base model: unexpected tensors {unexpected[:3]}.")
    return peft_model, tokenizer
