"""FSDP + QLoRA fine-tuning on NVIDIA GPUs (lesson 08).

The frozen model is loaded in 4-bit NF4 with its packed bytes stored as bfloat16 (`bnb_4bit_quant_storage`):
FSDP flattens and shards only floating-point tensors, one dtype per unit, so the 4-bit weights are stored in
the dtype of the layers beside them (the model is loaded with the same dtype). LoRA adapters go on every
linear layer; transformers' Trainer runs FSDP FULL_SHARD with CPU offload, as in fsdp_qlora.yaml, so that
Llama-2-70B fits two 24 GB GPUs (Answer.AI's release, March 2024; the Hugging Face peft guide measured
19.6 GB per GPU at batch 2 x 2048 tokens with offload, 35.6 GB without).

    bash launch.sh two-gpu --model_id meta-llama/Llama-2-70b-hf --batch_size 2 --seq_len 2048
    NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch.sh multi-node ...     (on every node)

The default model is the course's tiny model, so that a GPU machine without network can check the launch.
Without CUDA the script stops at once and says so: bitsandbytes runs 4-bit layers under FSDP on CUDA only.
"""

from __future__ import annotations

import argparse
import os
import sys

QUANT_STORAGE = "bfloat16"  # the dtype the 4-bit weights are packed into, and the model's dtype


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fsdp_config", required=True, help="the accelerate FSDP config (fsdp_qlora.yaml)")
    p.add_argument("--model_id", default="lorakit/tiny-stories-llama")
    p.add_argument("--task", default="who_found")
    p.add_argument("--batch_size", type=int, default=2, help="sequences per GPU per step")
    p.add_argument("--seq_len", type=int, default=2048, help="longest sequence, in tokens")
    p.add_argument("--max_steps", type=int, default=20)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--output_dir", default="fsdp_qlora_out")
    return p.parse_args(argv)


def trainer_fsdp_args(accelerate_config: dict) -> dict:
    """The accelerate YAML's FSDP settings as TrainingArguments(fsdp=..., fsdp_config=...), so that the same
    file drives `accelerate launch` and `torchrun` (which reads no accelerate config)."""
    fsdp = dict(accelerate_config["fsdp_config"])
    options = [str(fsdp.pop("fsdp_sharding_strategy", "FULL_SHARD")).lower(), "auto_wrap"]
    if fsdp.pop("fsdp_offload_params", False):
        options.append("offload")
    return {"fsdp": " ".join(options), "fsdp_config": {k.removeprefix("fsdp_"): v for k, v in fsdp.items()}}


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    import yaml

    if not torch.cuda.is_available():
        sys.exit("FSDP + QLoRA needs NVIDIA GPUs: bitsandbytes runs 4-bit layers under FSDP on CUDA only, and this "
                 "machine has none. On a CPU, lesson 08 runs data parallel and FSDP with plain LoRA (gloo) instead.")
    from lorakit.distributed import check_fsdp_qlora, require_backend

    require_backend("nccl", int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    with open(args.fsdp_config) as fh:
        accelerate_config = yaml.safe_load(fh)
    storage = getattr(torch, QUANT_STORAGE)
    summary = check_fsdp_qlora(accelerate_config, storage, storage, mixed_precision="bf16")  # Trainer's bf16=True

    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    from lorakit import data, models

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=storage,      # packed 4-bit weights as bfloat16: a dtype FSDP can shard
    )
    tokenizer = models.load_tokenizer(args.model_id)
    model = AutoModelForCausalLM.from_pretrained(models.resolve(args.model_id), quantization_config=bnb_config,
                                                 dtype=storage)  # the layers beside them in the same dtype
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.1,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    train = data.load_task(args.task)["train"].map(
        lambda ex: data.tokenize_with_masking(ex, tokenizer, args.seq_len, padding=False),
        remove_columns=["instruction", "input", "output"])
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, bf16=True, logging_steps=1, save_strategy="no", report_to=[],
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True},
        **trainer_fsdp_args(accelerate_config))
    trainer = Trainer(model=model, args=training_args, train_dataset=train,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
    if trainer.accelerator.is_main_process:
        print(summary, flush=True)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"rank {trainer.accelerator.process_index}: peak GPU memory allocated {peak:.2f} GiB", flush=True)
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(os.path.join(args.output_dir, "adapter"))


if __name__ == "__main__":
    main()
