"""The course data: a small story world, the instruction datasets built from it, the prompt template,
tokenization with label masking, and exact-match evaluation.

Nothing can be downloaded on the course machines, so the kit generates its own text. One seeded
generator writes short stories about children who find things ("Mia found a red ball under a tree.").
The same world feeds two places:

- the pretraining corpus of the embedded base model (`lorakit.tooling.pretrain`): a share of its stories
  already ask and answer questions in plain words ("Who found the red ball? Mia found it."), so the
  model knows the material and the skill before it has ever seen our prompt template;
- the instruction datasets (`load_task`): a fresh story with one find among two to four children, a
  question in the Alpaca-style template, and a short answer. The base model does not answer in this
  format (0% exact match). Two tasks, one easy and one hard for the embedded model:
  - `who_found` ("Who found the red ball?" -> "Mia"): pick the finder among the children. A LoRA adapter
    learns it to about 100% in under a minute of CPU training (lessons 02-05);
  - `where_found` ("Where did Mia find the red ball?" -> "Under a tree."): copy the place, two to four
    words, from the story, where other places (the trip: "went to the park") are distractors. Rank and
    target modules decide how far an adapter gets in a few minutes (lesson 06's lab).

What makes that fine-tuning work (measured while building the kit; lesson 05 explains it): the answer
starts with a space right after the response marker, so it tokenizes exactly like the pretraining text,
and the loss is computed on the answer only (`tokenize_with_masking` sets every prompt and padding label
to -100).

`python -m lorakit.data` rewrites the JSON Lines files shipped under lib/lorakit/assets/tasks/ from the
generator; a test checks that the shipped files are what the generator writes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import tempfile
from pathlib import Path

__all__ = ["DATA_DIR", "NAMES", "TASKS", "SPLITS", "PROMPT_TEMPLATE", "CHAT_TEMPLATE", "make_story",
           "story_corpus", "make_example", "generate_task", "write_jsonl", "load_task", "format_prompt",
           "format_answer", "chat_messages", "tokenize_with_masking", "collate", "generate_answers",
           "exact_match_score", "exact_match", "answer_loss", "main"]

DATA_DIR = Path(__file__).parent / "assets" / "tasks"

# --------------------------------------------------------------------------------------------------
# The story world
# --------------------------------------------------------------------------------------------------

NAMES = ["Mia", "Tom", "Lily", "Ben", "Sam", "Anna", "Max", "Zoe", "Leo", "Ella", "Jack", "Ruby",
         "Finn", "Nora", "Owen", "Ivy", "Luke", "Rosa", "Eli", "Maya", "Noah", "Lucy", "Jake", "Emma",
         "Adam", "Ava", "Dan", "Kim", "Ted", "Amy", "Ray", "Sue", "Paul", "Jill", "Carl", "Beth",
         "Hugo", "Iris", "Omar", "Lena"]
ADJECTIVES = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "brown", "white", "black",
              "shiny", "small", "big", "old", "soft", "tiny"]
OBJECTS = ["ball", "key", "hat", "book", "cup", "shell", "stone", "coin", "kite", "box", "feather",
           "spoon", "map", "ring", "sock", "doll", "bell", "apple", "leaf", "button", "card", "duck"]
PLACES = ["under the bed", "in the garden", "behind the door", "near the pond", "under a tree",
          "on the beach", "in the kitchen", "by the river", "in the park", "under the sofa",
          "in the grass", "on the shelf", "next to the fence", "in the sand", "under a rock"]
TRIPS = ["went to the park", "played in the garden", "went to the beach", "walked by the river",
         "played at home", "went to the woods", "visited Grandma", "played in the yard"]
WEATHER = ["The sun was warm.", "It was a windy day.", "The sky was blue.", "It was a rainy day.",
           "The birds were singing.", "It was a cold morning."]
FEELINGS = ["was happy", "was very happy", "smiled", "laughed", "jumped up and down", "was proud",
            "clapped"]
ACTIONS = ["showed it to Mom", "put it in a bag", "held it up high", "gave it a name",
           "showed it to Dad", "kept it safe", "looked at it for a long time"]
ENDINGS = ["Then they went home for dinner.", "It was a good day.", "They all had a nice nap.",
           "Mom made them some soup.", "They could not wait to play again.", "The end."]


def _join_names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def make_story(rng: random.Random, *, recap: float = 0.0, n_finds: int | None = None) -> tuple[str, list[dict]]:
    """One short story and its finds: [{"who": "Mia", "what": "a red ball", "thing": "red ball",
    "where": "under a tree"}, ...]. With probability `recap` the story ends with questions about the
    finds answered in plain words, the skill the instruction tasks later ask for in a template.
    `n_finds=None` (the pretraining corpus) lets 2 or 3 children find something; the instruction tasks
    ask for 1, with the other children in the story as distractors."""
    n_kids = rng.choice([2, 2, 3, 3, 4])
    kids = rng.sample(NAMES, n_kids)
    if n_finds is None:
        n_finds = rng.randint(2, min(3, n_kids))
    finders = rng.sample(kids, n_finds)
    things = []
    while len(things) < n_finds:  # every find in a story is a different thing
        thing = f"{rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)}"
        if thing.split()[1] not in [t.split()[1] for t in things]:
            things.append(thing)
    places = rng.sample(PLACES, n_finds)
    finds = [{"who": who, "thing": thing, "what": _article(thing), "where": where}
             for who, thing, where in zip(finders, things, places)]

    s = [f"{_join_names(kids)} {rng.choice(TRIPS)}."]
    if rng.random() < 0.6:
        s.append(rng.choice(WEATHER))
    for f in finds:
        s.append(rng.choice([
            f"{f['who']} found {f['what']} {f['where']}.",
            f"{f['where'].capitalize()}, {f['who']} found {f['what']}.",
            f"{f['who']} looked {f['where']} and found {f['what']}.",
        ]))
        if rng.random() < 0.5:
            s.append(f"{f['who']} {rng.choice(FEELINGS + ACTIONS)}.")
    s.append(rng.choice(ENDINGS))
    if rng.random() < recap:
        for f in rng.sample(finds, len(finds)):
            q = rng.random()
            if q < 0.45:
                s.append(f"Who found the {f['thing']}? {f['who']} found the {f['thing']}.")
            elif q < 0.6:
                s.append(f"Who found the {f['thing']}? It was {f['who']}.")
            elif q < 0.85:
                s.append(f"What did {f['who']} find? {f['who']} found {f['what']}.")
            else:
                s.append(f"Where did {f['who']} find the {f['thing']}? {f['where'].capitalize()}.")
    return " ".join(s), finds


def _article(thing: str) -> str:
    return ("an " if thing[0] in "aeiou" else "a ") + thing


def story_corpus(n_stories: int, seed: int = 0, recap: float = 0.35):
    """Yield `n_stories` pretraining stories from a seeded generator (deterministic)."""
    rng = random.Random(seed)
    for _ in range(n_stories):
        yield make_story(rng, recap=recap)[0]


# --------------------------------------------------------------------------------------------------
# Instruction tasks
# --------------------------------------------------------------------------------------------------

TASKS = {
    "who_found": "Read the story, then answer the question with a name.",
    "where_found": "Read the story, then say where the child found it.",
}
SPLITS = {"train": 2000, "validation": 200, "test": 200}
# Each split comes from its own seed (and a seed far from the pretraining corpus' seed 0).
_SPLIT_SEEDS = {"train": 1001, "validation": 2002, "test": 3003}


def make_example(rng: random.Random, task: str) -> dict:
    """One example: {"instruction", "input", "output"}; `output` is the bare answer, no leading space.

    The story has one find among two to four children. With two or three finds in a story, the
    embedded model learns the format and the candidate names but not which child found which thing:
    exact match stalls near the 40% a guess among the finders gets (answer loss at ln 2), with any
    adapter and with more pretraining recaps (measured in issue #3). One find keeps a real reading
    task (pick the finder, not the other children) that a 2M-parameter model can learn."""
    story, finds = make_story(rng, recap=0.0, n_finds=1)
    f = finds[0]
    if task == "who_found":
        question, answer = f"Who found the {f['thing']}?", f["who"]
    elif task == "where_found":  # answered as the pretraining stories' recaps answer it: "Under a tree."
        question, answer = f"Where did {f['who']} find the {f['thing']}?", f["where"].capitalize() + "."
    else:
        raise ValueError(f"unknown task {task!r}: choose one of {sorted(TASKS)}")
    return {"instruction": TASKS[task], "input": f"{story}\nQuestion: {question}", "output": answer}


def generate_task(task: str = "who_found", sizes: dict | None = None, seed: int = 0) -> dict[str, list[dict]]:
    """The splits of `task` as lists of dicts, deterministic in (`task`, `sizes`, `seed`). Splits are
    disjoint: a prompt already used by an earlier split (or twice in one split) is drawn again."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {sorted(TASKS)}")
    sizes = dict(SPLITS if sizes is None else sizes)
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}: the splits are {list(SPLITS)}")
    seen, out = set(), {}
    for split, n in sizes.items():
        rng = random.Random(_SPLIT_SEEDS[split] + 7919 * seed + sorted(TASKS).index(task))
        rows = []
        while len(rows) < n:
            ex = make_example(rng, task)
            if ex["input"] not in seen:
                seen.add(ex["input"])
                rows.append(ex)
        out[split] = rows
    return out


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def load_task(name: str = "who_found", sizes: dict | None = None, seed: int = 0,
              data_dir: str | Path | None = None):
    """The `name` task as a `datasets.DatasetDict` with train / validation / test splits, loaded with
    `datasets.load_dataset("json", ...)` the way a learner loads their own data.

    The default sizes and seed load the JSON Lines files shipped under lib/lorakit/assets/tasks/<name>/; any
    other `sizes` (e.g. {"train": 200, "test": 50}) or `seed` generates them into `data_dir` (a
    temporary folder by default). Columns: instruction, input, output.
    """
    import datasets

    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {sorted(TASKS)}")
    shipped = DATA_DIR / name
    if sizes is None and seed == 0 and data_dir is None and all(
            (shipped / f"{s}.jsonl").exists() for s in SPLITS):
        folder = shipped
        splits = list(SPLITS)
    else:
        rows = generate_task(name, sizes, seed)
        folder = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix=f"lorakit-{name}-"))
        for split, r in rows.items():
            write_jsonl(r, folder / f"{split}.jsonl")
        splits = list(rows)
    files = {s: str(folder / f"{s}.jsonl") for s in splits}
    with _quiet_datasets():
        return datasets.load_dataset("json", data_files=files)


@contextlib.contextmanager
def _quiet_datasets():
    """Hide datasets' own progress bars for tiny local files (they only add noise to a notebook)."""
    import datasets

    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets.utils.logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------------
# The prompt template and tokenization with label masking
# --------------------------------------------------------------------------------------------------

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"


def format_prompt(example: dict) -> str:
    """The prompt the model sees; the answer follows it after one space (see `format_answer`)."""
    return PROMPT_TEMPLATE.format(instruction=example["instruction"], input=example.get("input", ""))


def format_answer(example: dict) -> str:
    """The target text: a space, then the answer, so that it tokenizes like the pretraining text."""
    return " " + example["output"].strip()


# The same format as a chat template (lesson 07). A chat template is a Jinja program stored with the
# tokenizer that renders a list of messages into the model's prompt format; `apply_chat_template` runs it.
# This one renders system = instruction, user = input, assistant = output into exactly the text above, so
# a model fine-tuned either way sees the same tokens. `{% generation %}` marks the assistant's answer, which
# is how transformers' `return_assistant_tokens_mask=True` (and trl's `assistant_only_loss`) find it.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '### Input:\\n' + message['content'] + '\\n\\n### Response:' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- ' ' + message['content'] | trim + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- raise_exception('this chat template knows the roles system, user and assistant, not ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def chat_messages(example: dict, with_answer: bool = True) -> list[dict]:
    """An instruction example as chat messages: system = instruction, user = input, assistant = output."""
    messages = [{"role": "system", "content": example["instruction"]},
                {"role": "user", "content": example.get("input", "")}]
    if with_answer:
        messages.append({"role": "assistant", "content": example["output"]})
    return messages


def tokenize_with_masking(example: dict, tokenizer, max_length: int = 256, padding: bool = True) -> dict:
    """Tokenize prompt + answer + EOS for causal-LM training with the loss on the answer only.

    Returns `input_ids`, `attention_mask` and `labels` (lists of ints). `labels` is -100 on the
    prompt and on padding, the token id elsewhere (answer and EOS). With `padding=True` every
    sequence is right-padded to `max_length`; with `padding=False` the collator pads the batch.
    A sequence that is too long loses the start of its prompt, never the answer.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: set tokenizer.eos_token before tokenizing")
    prompt_ids = tokenizer(format_prompt(example), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(format_answer(example), add_special_tokens=False)["input_ids"]
    answer_ids = answer_ids + [tokenizer.eos_token_id]
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
    room = max_length - len(answer_ids) - len(bos)
    if room <= 0:
        raise ValueError(f"max_length={max_length} leaves no room for the prompt: the answer alone "
                         f"takes {len(answer_ids)} tokens")
    prompt_ids = bos + prompt_ids[-room:]
    input_ids = prompt_ids + answer_ids
    labels = [-100] * len(prompt_ids) + answer_ids
    attention_mask = [1] * len(input_ids)
    if padding:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        n_pad = max_length - len(input_ids)
        input_ids += [pad_id] * n_pad
        labels += [-100] * n_pad
        attention_mask += [0] * n_pad
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate(batch: list[dict], pad_token_id: int) -> dict:
    """Right-pad a list of tokenized examples to the longest one: tensors for a training step."""
    import torch

    n = max(len(b["input_ids"]) for b in batch)
    def pad(key, value):
        return torch.tensor([list(b[key]) + [value] * (n - len(b[key])) for b in batch])
    return {"input_ids": pad("input_ids", pad_token_id), "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", -100)}


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------

def generate_answers(model, tokenizer, dataset, max_new_tokens: int = 8, batch_size: int = 32,
                     progress: bool = True) -> list[str]:
    """Greedy answers to every prompt of `dataset` (rows with instruction/input), batched with left
    padding. Works for plain, peft and 4-bit models. Returns the decoded text up to EOS, stripped."""
    import torch
    from tqdm.auto import tqdm

    from lorakit.models import cpu_inference_repack_off

    prompts = [format_prompt(ex) for ex in dataset]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training, side = model.training, tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    out = []
    try:
        model.eval()
        with torch.no_grad(), cpu_inference_repack_off(model):
            for i in tqdm(range(0, len(prompts), batch_size), desc="exact match", unit="batch",
                          disable=not progress):
                enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
                new = gen[:, enc["input_ids"].shape[1]:]
                out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def exact_match_score(answers, dataset) -> float:
    """Share of `answers` equal to the `output` of the matching example of `dataset`, both stripped of
    surrounding spaces (lesson 05's exercise). Case counts, and an answer that goes on after the right
    words ("Mia found the ball. Then...") does not: the model must also know when to stop."""
    if not answers:
        raise ValueError("exact_match_score got no answers to score")
    expected = [ex["output"].strip() for ex in dataset]
    hits = [given.strip() == want for given, want in zip(answers, expected)]
    return sum(hits) / len(answers)


def exact_match(model, tokenizer, dataset, max_new_tokens: int = 8, batch_size: int = 32,
                progress: bool = True) -> float:
    """`exact_match_score` of the model's greedy answers (up to EOS) to every prompt of `dataset`."""
    answers = generate_answers(model, tokenizer, dataset, max_new_tokens, batch_size, progress)
    if not answers:
        raise ValueError("exact_match got an empty dataset")
    return exact_match_score(answers, dataset)


def answer_loss(model, tokenizer, dataset, batch_size: int = 32, max_length: int = 256,
                progress: bool = True) -> float:
    """Mean cross-entropy (nats per token) of the expected answers of `dataset`, EOS included, given their
    prompts: the training loss, measured on held-out examples. Unlike exact match it does not round: an
    answer that is almost right and one that is far off both score 0 in exact match, but not in answer
    loss, so it separates models that exact match lumps together."""
    import torch
    from tqdm.auto import tqdm

    from lorakit.models import cpu_inference_repack_off

    rows = [tokenize_with_masking(ex, tokenizer, max_length, padding=False) for ex in dataset]
    if not rows:
        raise ValueError("answer_loss got an empty dataset")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, count = 0.0, 0
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), cpu_inference_repack_off(model):
            for i in tqdm(range(0, len(rows), batch_size), desc="answer loss", unit="batch", disable=not progress):
                batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size], pad_id).items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]  # the token at t is predicted from the logits at t - 1
                total += torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
                count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return total / count


def main(argv=None):
    p = argparse.ArgumentParser(description="Write the course datasets as JSON Lines under lib/lorakit/assets/tasks/.")
    p.add_argument("--out", default=str(DATA_DIR))
    args = p.parse_args(argv)
    for task in TASKS:
        for split, rows in generate_task(task).items():
            path = Path(args.out) / task / f"{split}.jsonl"
            write_jsonl(rows, path)
            print(f"{path}: {len(rows)} examples")


if __name__ == "__main__":
    main()
