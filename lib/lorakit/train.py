"""A small fine-tuning routine the lessons share: `finetune(model, tokenizer, train_ds, ...)`.

Two ways to run the same training, chosen by `use_trainer`:
- a hand-written loop (AdamW, linear warmup and decay, gradient clipping, bf16 autocast where the device
  computes bf16 natively, tqdm) that a learner can read top to bottom;
- `transformers.Trainer` with the same settings, which lessons 05 and 06 use because that is what one
  uses on a GPU.

Both take a dataset of instruction examples (instruction / input / output) or one already tokenized
with `lorakit.data.tokenize_with_masking`, train only what requires grad (the LoRA adapters of a peft
model), and return a `FinetuneResult` with the losses and the seconds spent.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from lorakit.data import collate, tokenize_with_masking
from lorakit.env import bf16_supported

__all__ = ["FinetuneResult", "tokenize_dataset", "training_step", "finetune"]


@dataclass
class FinetuneResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    seconds: float = 0.0                                 # training time, without tokenization
    steps: int = 0
    examples_seen: int = 0

    @property
    def final_loss(self) -> float:
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else float("nan")


def tokenize_dataset(dataset, tokenizer, max_length: int = 256):
    """Tokenize instruction examples with label masking, unpadded (batches are padded when drawn)."""
    if "input_ids" in dataset.column_names:
        return dataset
    return dataset.map(lambda ex: tokenize_with_masking(ex, tokenizer, max_length, padding=False),
                       remove_columns=dataset.column_names, desc="tokenizing")


def _autocast(model, device: torch.device, bf16: bool | None):
    """bf16 autocast when the trainable weights are fp32 and the device computes bf16 well."""
    if bf16 is None:
        bf16 = bf16_supported(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(bf16) and device.type in ("cpu", "cuda"))


def training_step(model, batch: dict, optimizer) -> float:
    """One optimizer step on `batch` (lesson 02's exercise): the loss on the answer tokens, its gradients, the
    optimizer's step, the gradients cleared for the next step. Returns the loss as a Python float."""
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def finetune(model, tokenizer, train_ds, max_steps: int = 100, learning_rate: float = 2e-3,
             batch_size: int = 16, max_length: int = 256, warmup_steps: int = 10, weight_decay: float = 0.0,
             max_grad_norm: float = 1.0, seed: int = 0, bf16: bool | None = None, use_trainer: bool = False,
             progress: bool = True, optimizer: torch.optim.Optimizer | None = None, **trainer_args) -> FinetuneResult:
    """Train `model`'s trainable parameters on `train_ds` for `max_steps` optimizer steps.

    `train_ds`: a `datasets.Dataset` of instruction examples or of tokenized ones. Batches are drawn by
    shuffling with `seed`, epoch after epoch. `bf16=None` uses bf16 autocast where it is native
    (`lorakit.env.bf16_supported`: CPUs with AVX512-BF16/AMX or ARM's bf16, GPUs of compute capability 8.0+)
    and float32 elsewhere, where bf16 would be emulated and several times slower. Extra keyword arguments go to `transformers.TrainingArguments` when
    `use_trainer=True` (for example `optim="paged_adamw_32bit"` on a GPU). `optimizer`: one you built
    yourself (LoRA+'s `create_loraplus_optimizer`, say) instead of AdamW(learning_rate); the warmup and
    decay then scale each of its parameter groups' own learning rate.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters: wrap it with peft's get_peft_model "
                         "(or set requires_grad=True on what you want to train)")
    data = tokenize_dataset(train_ds, tokenizer, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if use_trainer:
        return _finetune_trainer(model, tokenizer, data, pad_id, max_steps, learning_rate, batch_size,
                                 warmup_steps, weight_decay, max_grad_norm, seed, bf16, progress, trainer_args,
                                 optimizer)
    if trainer_args:
        raise TypeError(f"unexpected arguments {sorted(trainer_args)} (they are for use_trainer=True)")

    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    opt = optimizer or torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)) * max(0.0, 1 - s / max_steps))
    rng = random.Random(seed)
    order: list[int] = []
    result = FinetuneResult()
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(max_steps), desc="fine-tuning", unit="step", disable=not progress)
    for step in bar:
        idx = []
        while len(idx) < batch_size:  # reshuffle at every epoch boundary
            if not order:
                order = list(range(len(data)))
                rng.shuffle(order)
            idx.append(order.pop())
        batch = {k: v.to(device) for k, v in collate([data[i] for i in idx], pad_id).items()}
        with _autocast(model, device, bf16):
            loss = model(**batch).loss
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
        if step % 5 == 0 or step == max_steps - 1:
            bar.set_postfix(loss=f"{result.final_loss:.3f}")
    result.seconds = time.perf_counter() - t0
    result.steps = max_steps
    result.examples_seen = max_steps * batch_size
    return result


def _finetune_trainer(model, tokenizer, data, pad_id, max_steps, learning_rate, batch_size, warmup_steps,
                      weight_decay, max_grad_norm, seed, bf16, progress, trainer_args, optimizer=None):
    import tempfile

    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments

    device = next(model.parameters()).device
    if bf16 is None:
        bf16 = bf16_supported(device)
    result = FinetuneResult()

    class _Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                result.losses.append(float(logs["loss"]))

    class _QuietProgress(ProgressCallback):
        """Trainer's progress bar, with the loss on the bar instead of one printed dict per step."""
        def on_log(self, args, state, control, logs=None, **kw):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{float(logs['loss']):.3f}")

    args = dict(output_dir=tempfile.mkdtemp(prefix="lorakit-trainer-"), max_steps=max_steps,
                per_device_train_batch_size=batch_size, learning_rate=learning_rate,
                warmup_steps=warmup_steps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to=[],
                seed=seed, data_seed=seed, bf16=bool(bf16), use_cpu=device.type == "cpu",
                disable_tqdm=not progress, remove_unused_columns=False, dataloader_num_workers=0)
    args.update(trainer_args)
    trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=data,
                      data_collator=lambda rows: collate(rows, pad_id), callbacks=[_Losses()],
                      optimizers=(optimizer, None))
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(_QuietProgress())
    t0 = time.perf_counter()
    trainer.train()
    result.seconds = time.perf_counter() - t0
    result.steps = trainer.state.global_step
    result.examples_seen = result.steps * batch_size
    return result
