"""lorakit.data: the generator, the shipped JSON Lines, the splits, masking, and exact match."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from lorakit import data
from lorakit.data import (PROMPT_TEMPLATE, SPLITS, TASKS, exact_match, format_prompt, generate_task,
                          load_task, tokenize_with_masking)
from lorakit.models import TINY, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


def test_generator_is_deterministic():
    a = generate_task("who_found", {"train": 50, "test": 20})
    b = generate_task("who_found", {"train": 50, "test": 20})
    assert a == b
    assert generate_task("who_found", {"train": 50}, seed=1)["train"] != a["train"]
    assert list(data.story_corpus(20, seed=3)) == list(data.story_corpus(20, seed=3))
    assert list(data.story_corpus(20, seed=3)) != list(data.story_corpus(20, seed=4))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_shipped_files_are_what_the_generator_writes(task):
    expected = generate_task(task)
    for split, rows in expected.items():
        path = data.DATA_DIR / task / f"{split}.jsonl"
        shipped = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert shipped == rows, f"{path} differs from generate_task({task!r}): run `python -m lorakit.data`"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_load_task_splits_are_disjoint(task):
    ds = load_task(task)
    assert {k: len(v) for k, v in ds.items()} == SPLITS
    assert set(ds["train"].column_names) == {"instruction", "input", "output"}
    inputs = {split: set(ds[split]["input"]) for split in ds}
    for split in ds:
        assert len(inputs[split]) == len(ds[split]), f"duplicate prompts inside {split}"
    assert not inputs["train"] & inputs["validation"]
    assert not inputs["train"] & inputs["test"]
    assert not inputs["validation"] & inputs["test"]


def test_answers_are_in_the_story():
    for ex in load_task("who_found")["test"]:
        story, question = ex["input"].split("\nQuestion: ")
        assert ex["output"] in story and question.startswith("Who found the ")
        thing = question[len("Who found the "):-1]
        assert f"{ex['output']} found a" in story or f"{ex['output']} looked" in story
        assert thing in story


def test_load_task_generates_other_sizes(tmp_path):
    ds = load_task("where_found", sizes={"train": 12, "test": 5}, data_dir=tmp_path)
    assert {k: len(v) for k, v in ds.items()} == {"train": 12, "test": 5}
    assert (tmp_path / "train.jsonl").exists()
    place = ds["test"][0]["output"]
    assert place.endswith(".") and place[:-1].lower() in ds["test"][0]["input"].lower()  # from the story


def test_bad_task_names_say_what_exists():
    with pytest.raises(ValueError, match="who_found"):
        load_task("who_lost")
    with pytest.raises(ValueError, match="train"):
        generate_task("who_found", {"training": 3})


def test_prompt_template():
    ex = {"instruction": "Do it.", "input": "A story.", "output": "Mia"}
    assert format_prompt(ex) == "### Instruction:\nDo it.\n\n### Input:\nA story.\n\n### Response:"
    assert PROMPT_TEMPLATE.endswith("### Response:")  # the answer follows after one space


def test_masking(tokenizer):
    ex = load_task("who_found")["train"][0]
    out = tokenize_with_masking(ex, tokenizer, max_length=256)
    ids, mask, labels = out["input_ids"], out["attention_mask"], out["labels"]
    assert len(ids) == len(mask) == len(labels) == 256
    n_prompt = len(tokenizer(format_prompt(ex), add_special_tokens=False)["input_ids"])
    n_real = sum(mask)
    assert all(l == -100 for l in labels[:n_prompt]), "prompt tokens must be masked"
    assert all(l == -100 for l in labels[n_real:]), "padding must be masked"
    assert all(m == 0 for m in mask[n_real:]) and all(i == tokenizer.pad_token_id for i in ids[n_real:])
    answer = labels[n_prompt:n_real]
    assert answer == ids[n_prompt:n_real] and -100 not in answer, "answer tokens must be trained on"
    assert answer[-1] == tokenizer.eos_token_id, "EOS must end the answer"
    assert tokenizer.decode(answer[:-1]) == " " + ex["output"], "the answer starts with a space"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_masking_unpadded_and_truncation(tokenizer):
    ex = load_task("who_found")["train"][1]
    full = tokenize_with_masking(ex, tokenizer, max_length=512, padding=False)
    assert sum(full["attention_mask"]) == len(full["input_ids"]) < 512
    short = tokenize_with_masking(ex, tokenizer, max_length=20)
    n_answer = sum(l != -100 for l in full["labels"])
    assert len(short["input_ids"]) == 20
    assert short["labels"][-n_answer:] == full["labels"][-n_answer:], "truncation must keep the answer"
    with pytest.raises(ValueError, match="max_length"):
        tokenize_with_masking(ex, tokenizer, max_length=2)


class _Oracle(torch.nn.Module):
    """A stand-in model whose generate() appends a fixed answer + EOS (or `wrong`) to every row, so that
    exact_match's batching, left padding and decoding are tested without training anything."""

    def __init__(self, tokenizer, answers, wrong_every=0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.answers, self.wrong_every, self.calls = tokenizer, answers, wrong_every, 0

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        assert (attention_mask[:, -1] == 1).all(), "prompts must be left-padded for generation"
        rows = []
        for _ in range(len(input_ids)):
            i = self.calls
            self.calls += 1
            ans = " " + self.answers[i] + (" found it" if self.wrong_every and i % self.wrong_every == 0 else "")
            rows.append(self.tok(ans, add_special_tokens=False)["input_ids"][:max_new_tokens] + [self.tok.eos_token_id])
        n = max(map(len, rows))
        new = torch.tensor([r + [self.tok.pad_token_id] * (n - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_exact_match_counts_right_answers_only(tokenizer):
    ds = load_task("who_found")["test"].select(range(20))
    answers = ds["output"]
    assert exact_match(_Oracle(tokenizer, answers), tokenizer, ds, batch_size=6, progress=False) == 1.0
    # every 4th answer goes on after the name: 5 of 20 wrong
    score = exact_match(_Oracle(tokenizer, answers, wrong_every=4), tokenizer, ds, batch_size=7, progress=False)
    assert score == pytest.approx(0.75)
    assert tokenizer.padding_side == "right", "exact_match must restore the tokenizer's padding side"


def test_answer_loss_is_the_training_loss_on_held_out_answers(tokenizer):
    """answer_loss pools every answer token of every example; with one example it equals the model's own
    loss on that example with the prompt masked, and batching and padding do not change it."""
    from lorakit.data import answer_loss, collate, tokenize_with_masking
    from lorakit.models import load_base

    model, _ = load_base(device="cpu")
    ds = load_task("where_found")["test"].select(range(5))
    rows = [tokenize_with_masking(ex, tokenizer, padding=False) for ex in ds]
    with torch.no_grad():
        one = model(**collate(rows[:1], tokenizer.pad_token_id)).loss.item()
        per_example = [(model(**collate([r], tokenizer.pad_token_id)).loss.item(),
                        sum(label != -100 for label in r["labels"])) for r in rows]
    assert answer_loss(model, tokenizer, ds.select(range(1)), progress=False) == pytest.approx(one, rel=1e-4)
    pooled = sum(loss * n for loss, n in per_example) / sum(n for _, n in per_example)
    assert answer_loss(model, tokenizer, ds, batch_size=2, progress=False) == pytest.approx(pooled, rel=1e-4)
    model.train()  # the mode is put back
    answer_loss(model, tokenizer, ds, progress=False)
    assert model.training


def test_the_chat_template_renders_the_prompt_format_and_masks_like_tokenize_with_masking(tokenizer):
    """Lesson 07: apply_chat_template with data.CHAT_TEMPLATE gives the same text, tokens and loss mask as the
    prompt template and tokenize_with_masking; the generation prompt is the prompt."""
    tok = tokenizer
    tok.chat_template = data.CHAT_TEMPLATE
    try:
        for ex in load_task("who_found")["validation"]:
            msgs = data.chat_messages(ex)
            assert tok.apply_chat_template(msgs, tokenize=False) == format_prompt(ex) + data.format_answer(ex) + tok.eos_token
            assert tok.apply_chat_template(data.chat_messages(ex, with_answer=False), tokenize=False,
                                           add_generation_prompt=True) == format_prompt(ex)
            enc = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
            ref = tokenize_with_masking(ex, tok, 256, padding=False)
            assert enc["input_ids"] == ref["input_ids"]
            assert [t if m else -100 for t, m in zip(enc["input_ids"], enc["assistant_masks"])] == ref["labels"]
        with pytest.raises(Exception, match="system, user and assistant"):
            tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    finally:
        tok.chat_template = None


def test_exact_match_score_is_lesson_05s_rule():
    rows = [{"output": o} for o in (" Mia", "Tom ", "Ben", "Eli")]
    assert data.exact_match_score(["Mia", " Tom\n", "ben", "Eli found it"], rows) == 0.5
    with pytest.raises(ValueError, match="no answers"):
        data.exact_match_score([], rows)
