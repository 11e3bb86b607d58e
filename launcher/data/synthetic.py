"""Synthetic tasks and a word-level tokenizer built locally, for the quickstart and the tests.

The task is small enough for a 2-layer model to learn on a laptop CPU in minutes, and has an
exact answer: add two digits and write the sum in words, or spell a short number digit by
digit. The classification tasks are decided by keywords among filler words, so a tiny model
learns them in a few dozen steps: sentiment (SST-2-shaped), paraphrase of a sentence pair
(MRPC-shaped), number entities in BIO tags (CoNLL-shaped) and multi-label topics.
``python -m launcher.data.synthetic OUT_DIR`` writes the tokenizer and every data set.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

ONES = "zero one two three four five six seven eight nine".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
ROLES = ["<|", "|>", "system", "user", "assistant"]
WORDS = (
    "### Instruction Input Response : . , ? ! add spell the digits of and sum is what you are "
    "a helpful calculator answer in words please"
).split()
CHAT_TEMPLATE = (
    "{{ bos_token }} {% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
    "{{ eos_token }} {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def number_words(n: int) -> str:
    return ONES[n] if n < 10 else TEENS[n - 10]


def make_example(rng: random.Random) -> dict[str, str]:
    if rng.random() < 0.5:
        a, b = rng.randrange(10), rng.randrange(10)
        return {"instruction": "add", "input": f"{a} {b}", "output": number_words(a + b)}
    digits = [rng.randrange(10) for _ in range(rng.randint(1, 4))]
    return {
        "instruction": "spell the digits",
        "input": " ".join(map(str, digits)),
        "output": " ".join(ONES[d] for d in digits),
    }


def instruction_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [make_example(rng) for _ in range(n)]


def to_chat(row: dict[str, str], sharegpt: bool = False) -> dict[str, list[dict[str, str]]]:
    turns = [
        ("system", "you are a helpful calculator"),
        ("user", f"{row['instruction']} {row['input']}"),
        ("assistant", row["output"]),
    ]
    if sharegpt:
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": names[r], "value": c} for r, c in turns]}
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def to_text(row: dict[str, str]) -> dict[str, str]:
    return {"text": f"{row['instruction']} {row['input']} : {row['output']} ."}


def build_tokenizer(out_dir: Path) -> Path:
    """Write the digits task's word-level tokenizer, with a chat template."""
    vocab_words = SPECIAL + ROLES + [str(d) for d in range(10)] + ONES + TEENS + WORDS
    return save_word_level_tokenizer(
        list(dict.fromkeys(vocab_words)), out_dir, chat_template=CHAT_TEMPLATE, max_length=512
    )


def save_word_level_tokenizer(
    words: list[str], out_dir: Path, chat_template: str | None = None,
    max_length: int | None = None,
) -> Path:
    """A fast word-level tokenizer over ``words`` (which include <s>, </s>, <unk>, <pad>), saved
    where AutoTokenizer loads it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=chat_template,
    )
    if max_length is not None:
        tokenizer.model_max_length = max_length
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


FILLER = "the of and a is in you are answer words".split()
SENTIMENT = {"positive": ("helpful", "please"), "negative": ("what", "?")}
TOPICS = {"arithmetic": ("add", "sum"), "spelling": ("spell", "digits"), "polite": ("please", "helpful")}


def _filler(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(FILLER + ONES) for _ in range(rng.randint(lo, hi))]


def _insert(rng: random.Random, words: list[str], *extra: str) -> list[str]:
    words = list(words)
    for word in extra:
        words.insert(rng.randint(0, len(words)), word)
    return words


def sentiment_rows(n: int, seed: int) -> list[dict[str, object]]:
    """SST-2-shaped: a sentence and a class index (0 negative, 1 positive) from its keyword."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        keyword = rng.choice(SENTIMENT["positive" if label else "negative"])
        rows.append({"sentence": " ".join(_insert(rng, _filler(rng, 3, 9), keyword)), "label": label})
    return rows


def pair_rows(n: int, seed: int) -> list[dict[str, object]]:
    """MRPC-shaped: a sentence and a rewording of it; the rewording is equivalent (1) unless
    it adds a question word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        first = _filler(rng, 3, 7)
        label = rng.randrange(2)
        second = _insert(rng, first, rng.choice(("please", "and")) if label else rng.choice(("what", "?")))
        rows.append({"sentence1": " ".join(first), "sentence2": " ".join(second), "label": label})
    return rows


def ner_rows(n: int, seed: int) -> list[dict[str, list[str]]]:
    """CoNLL-shaped: words and BIO tags; NUM spans are runs of digit words, TEEN a teen word.
    A trailing '.' glued to the last word makes it two sub-words, exercising the alignment."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens: list[str] = []
        tags: list[str] = []
        for _ in range(rng.randint(2, 5)):
            kind = rng.random()
            if kind < 0.3:  # a run of digit words, then a word that ends it
                run = [rng.choice(ONES) for _ in range(rng.randint(1, 3))]
                tokens += [*run, rng.choice(FILLER)]
                tags += ["B-NUM"] + ["I-NUM"] * (len(run) - 1) + ["O"]
            elif kind < 0.45:
                tokens.append(rng.choice(TEENS))
                tags.append("B-TEEN")
            else:
                tokens.append(rng.choice(FILLER))
                tags.append("O")
        if rng.random() < 0.5:
            tokens[-1] += "."
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def topic_rows(n: int, seed: int) -> list[dict[str, object]]:
    """Multi-label: each topic whose keyword appears is a label (possibly none)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topics = sorted(t for t in TOPICS if rng.random() < 0.4)
        words = _insert(rng, [rng.choice(ONES) for _ in range(rng.randint(2, 6))],
                        *(rng.choice(TOPICS[t]) for t in topics))
        rows.append({"text": " ".join(words), "labels": topics})
    return rows


def write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_classification(out_dir: Path, n_train: int = 2000, n_val: int = 101) -> None:
    """The classification data sets; 101 validation rows leave an uneven last batch."""
    for name, make, write, suffix in (
        ("sentiment", sentiment_rows, write_csv, "csv"),
        ("pairs", pair_rows, write_csv, "csv"),
        ("ner", ner_rows, write_jsonl, "jsonl"),
        ("topics", topic_rows, write_jsonl, "jsonl"),
    ):
        write(out_dir / f"{name}_train.{suffix}", make(n_train, seed=11))
        write(out_dir / f"{name}_val.{suffix}", make(n_val, seed=12))


def write_all(out_dir: Path, n_train: int = 4000, n_val: int = 200) -> None:
    build_tokenizer(out_dir / "tokenizer")
    train, val = instruction_rows(n_train, seed=1), instruction_rows(n_val, seed=2)
    write_jsonl(out_dir / "digits_train.jsonl", train)
    write_jsonl(out_dir / "digits_val.jsonl", val)
    write_jsonl(out_dir / "digits_chat_train.jsonl", [to_chat(r) for r in train])
    write_jsonl(out_dir / "digits_chat_val.jsonl", [to_chat(r) for r in val])
    write_jsonl(out_dir / "digits_sharegpt_train.jsonl", [to_chat(r, True) for r in train])
    write_jsonl(out_dir / "digits_text_train.jsonl", [to_text(r) for r in train])
    write_classification(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--val", type=int, default=200)
    args = parser.parse_args()
    write_all(args.out_dir, args.train, args.val)


if __name__ == "__main__":
    main()
