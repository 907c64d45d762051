"""Pretrain the embedded base model: `python -m lorakit.tooling.pretrain`.

The course fine-tunes a model that already "knows language", and nothing can be downloaded here, so the
kit pretrains its own: a 4-layer Llama (the same module names as Llama-2/3: q_proj ... down_proj) of
about two million parameters, on short stories written by the seeded generator in `lorakit.data`.

Steps, each reproducible from the seed:
1. generate the corpus (80k stories, about a second);
2. train a byte-level BPE tokenizer with the `tokenizers` library (2,048 tokens, digits split one by one);
3. pack the tokenized stories, separated by EOS, into blocks of 256 tokens;
4. train with AdamW on the CPU, under bf16 autocast where the CPU computes bf16 natively (`lorakit.env.cpu_bf16`;
   about 6-7 minutes on 2 cores with AMX), in float32 elsewhere;
5. write safetensors + config.json + generation_config.json + tokenizer files and a MODEL_CARD.md with
   the validation loss and sample generations into lib/lorakit/assets/tiny-stories-llama/.

Every hidden and intermediate size is a multiple of 64: bitsandbytes' CPU 4-bit inference path fails on
other shapes (`bitsandbytes.functional._convert_weight_packed_for_cpu` asserts them), and the course
quantizes this model.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from lorakit.data import story_corpus
from lorakit.env import bf16_supported

__all__ = ["MODEL_CONFIG", "train_tokenizer", "pack", "lr_at", "evaluate", "samples", "main", "write_card"]

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-stories-llama"  # lorakit/assets/
EOS, PAD = "<|endoftext|>", "<|pad|>"

MODEL_CONFIG = dict(
    vocab_size=2048,
    hidden_size=192,          # 3 x 64
    intermediate_size=512,    # 8 x 64
    num_hidden_layers=4,
    num_attention_heads=3,    # head_dim 64
    num_key_value_heads=3,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    rope_theta=10000.0,
)


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) that splits digits one by one, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   model_max_length=MODEL_CONFIG["max_position_embeddings"],
                                   padding_side="right", clean_up_tokenization_spaces=False)


def pack(tokenizer, stories: list[str], block: int) -> torch.Tensor:
    """Tokenize, join with EOS and cut into (n_blocks, block) token ids."""
    ids = []
    for enc in tokenizer(stories, add_special_tokens=False)["input_ids"]:
        ids += enc + [tokenizer.eos_token_id]
    n = len(ids) // block
    return torch.tensor(ids[: n * block]).view(n, block)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    losses = []
    for i in range(0, len(blocks), batch_size):
        x = blocks[i:i + batch_size]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_supported("cpu")):
            losses.append(model(input_ids=x, labels=x).loss.float().item())
    model.train()
    return sum(losses) / len(losses)


def samples(model, tokenizer, prompts: list[str], max_new_tokens: int = 60) -> list[str]:
    model.eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            enc = tokenizer(p, return_tensors="pt", add_special_tokens=False)
            g = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            out.append(tokenizer.decode(g[0], skip_special_tokens=True))
    model.train()
    return out


SAMPLE_PROMPTS = [
    "Mia and Tom went to the park.",
    "Lena found a shiny key",
    "Ben and Zoe played in the garden. Ben found a red ball under a tree. Zoe found a small shell "
    "on the shelf. It was a good day. Who found the small shell?",
    "Omar, Ivy and Sam went to the beach. Ivy found a blue kite in the sand. Omar found an old coin "
    "near the pond. The end. What did Omar find?",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stories", type=int, default=80_000)
    p.add_argument("--val-stories", type=int, default=1_000)
    p.add_argument("--steps", type=int, default=1_200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recap", type=float, default=0.35,
                   help="share of stories that end with plain-language questions and answers about the finds")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads: 1 gives the same numbers on any machine and does not fight other "
                        "processes for the cores (0: torch's default)")
    p.add_argument("--out", default=str(ASSET_DIR))
    args = p.parse_args(argv)

    from tqdm.auto import tqdm
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)

    t0 = time.perf_counter()
    stories = list(story_corpus(args.stories + args.val_stories, seed=args.seed, recap=args.recap))
    train_stories, val_stories = stories[: args.stories], stories[args.stories:]
    tokenizer = train_tokenizer(train_stories, MODEL_CONFIG["vocab_size"])
    train_blocks = pack(tokenizer, train_stories, args.block)
    val_blocks = pack(tokenizer, val_stories, args.block)
    print(f"corpus: {len(train_stories):,} stories, {train_blocks.numel():,} train tokens, "
          f"{val_blocks.numel():,} validation tokens, vocab {len(tokenizer)} "
          f"({time.perf_counter() - t0:.1f} s)")

    config = LlamaConfig(**MODEL_CONFIG, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    n_params = model.num_parameters()
    print(f"model: {n_params:,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    g = torch.Generator().manual_seed(args.seed)
    model.train()
    tokens_per_step = args.batch_size * args.block
    t_train = time.perf_counter()
    bar = tqdm(range(args.steps), desc="pretraining", unit="step")
    losses = []
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        idx = torch.randint(len(train_blocks), (args.batch_size,), generator=g)
        x = train_blocks[idx]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_supported("cpu")):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            elapsed = time.perf_counter() - t_train
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}",
                            tok_s=f"{(step + 1) * tokens_per_step / elapsed:,.0f}")
    train_s = time.perf_counter() - t_train
    tok_s = args.steps * tokens_per_step / train_s
    val_loss = evaluate(model, val_blocks, 32)
    print(f"trained {args.steps} steps in {train_s:.0f} s ({tok_s:,.0f} tokens/s); "
          f"validation loss {val_loss:.3f} (perplexity {math.exp(val_loss):.2f})")

    texts = samples(model, tokenizer, SAMPLE_PROMPTS)
    for t in texts:
        print("  >", t)

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id,
                                               do_sample=False, max_new_tokens=64)
    model.save_pretrained(out)  # float32 safetensors
    tokenizer.save_pretrained(out)
    # Name the class every transformers version knows (5.x writes its new "TokenizersBackend").
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir())
    cmd = "python -m lorakit.tooling.pretrain" + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else "")
    write_card(out, args, cmd, n_params, val_loss, train_s, tok_s, train_blocks.numel(), texts, losses, size)
    print(f"wrote {out} ({size / 1e6:.1f} MB)")
    return 0


def write_card(out: Path, args, cmd, n_params, val_loss, train_s, tok_s, n_tokens, texts, losses, size):
    import transformers

    curve = ", ".join(f"{sum(losses[i:i + 50]) / len(losses[i:i + 50]):.2f}"
                      for i in range(0, len(losses), max(1, len(losses) // 10)))
    sample_md = "\n".join(f"- prompt `{p}`\n\n  > {t}\n" for p, t in zip(SAMPLE_PROMPTS, texts))
    card = f"""# tiny-stories-llama (lorakit's embedded base model)

A {n_params / 1e6:.2f}M-parameter Llama pretrained on short stories generated by lorakit itself, so that the
course can fine-tune a model that already "knows language" on machines that cannot download one. It is
loaded exactly like a hub model: `AutoModelForCausalLM.from_pretrained(path)`,
`AutoTokenizer.from_pretrained(path)`, or `lorakit.models.load_base()` (id `lorakit/tiny-stories-llama`).

| | |
|---|---|
| architecture | `LlamaForCausalLM`: {MODEL_CONFIG['num_hidden_layers']} layers, hidden {MODEL_CONFIG['hidden_size']}, intermediate {MODEL_CONFIG['intermediate_size']}, {MODEL_CONFIG['num_attention_heads']} heads of 64, tied embeddings |
| module names | `q_proj k_proj v_proj o_proj gate_proj up_proj down_proj` (as in Llama-2/3) |
| parameters | {n_params:,} |
| weights | float32 safetensors, {size / 1e6:.1f} MB for the whole folder |
| tokenizer | byte-level BPE, {MODEL_CONFIG['vocab_size']:,} tokens, digits split one by one, `{EOS}` (EOS/BOS), `{PAD}` (padding); trained with `tokenizers` |
| corpus | {args.stories:,} stories from `lorakit.data.story_corpus(seed={args.seed}, recap={args.recap})`, {n_tokens:,} tokens; {args.val_stories:,} more for validation |
| training | {args.steps} steps x {args.batch_size} x {args.block} tokens, AdamW lr {args.lr} (warmup {args.warmup}, cosine to 10%), {'bf16 autocast' if bf16_supported('cpu') else 'float32'} on CPU |
| time | {train_s:.0f} s on {torch.get_num_threads()} CPU thread(s) ({platform.processor() or platform.machine()}), {tok_s:,.0f} tokens/s |
| **validation loss** | **{val_loss:.3f}** (perplexity {math.exp(val_loss):.2f}) |
| software | torch {torch.__version__}, transformers {transformers.__version__} |

Training loss, every {max(1, len(losses) // 10)} steps: {curve}

Reproduce: `{cmd}` (a different CPU or thread count can change the last digits).

## Sample generations (greedy)

{sample_md}
## What it is for

Lessons 02-06 fine-tune it with LoRA and QLoRA on `lorakit.data` tasks ("Who found the red ball?",
"Where did Mia find it?").
Every hidden and intermediate size is a multiple of 64 so bitsandbytes' 4-bit CPU kernels accept it. It
is a teaching model: it knows one small world of children finding things, and nothing else.

What it cannot do: keep several finds apart. In the samples above it answers "Who found the small
shell?" with a child who found something else, and when a story has two or three finds, a LoRA or QLoRA
adapter reaches only about 40% exact match (a guess among the finders; the answer loss stays at ln 2).
The course tasks therefore give each story one find, with the other children as distractors: the model
must pick the finder from the story, which an adapter learns to about 100% in under a minute of CPU
training. Copying a longer span is harder: "Where did Mia find the red ball?" ("Under a rock.", the
`where_found` task of lesson 06's lab) reaches 55-60% exact match on average over 3 seeds after 300 steps with
r = 16 on all linear layers, about 49% with the same number of trainable parameters on q_proj and v_proj only, and
about 10% at r = 1, alpha = 2 (lib/lorakit/experiments/results_full.csv). It picks the right kind of place ("Under
...", "In the ...") but often the wrong noun.

## Licence

MIT, like lorakit. The corpus is generated by the project's own code (`lorakit/data.py`), so there is
no third-party text in the training data.
"""
    (out / "MODEL_CARD.md").write_text(card)
    # Where it was written is not a training argument, and a path of the build machine must not ship.
    recorded = {k: v for k, v in vars(args).items() if k != "out"}
    (out / "training_args.json").write_text(json.dumps(recorded | {"val_loss": round(val_loss, 4),
                                                                     "train_seconds": round(train_s, 1),
                                                                     "tokens_per_second": round(tok_s)}, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
