"""Synthetic tasks and a word-level tokenizer built locally, for the quickstart and the tests.

The task is small enough for a 2-layer model to learn on a laptop CPU in minutes, and has an
exact answer: add two digits and write the sum in words, or spell a short number digit by
digit. ``python -m launcher.synthetic OUT_DIR`` writes the tokenizer and every data set.
"""

from __future__ import annotations

import argparse
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
    """Write a word-level fast tokenizer with a chat template that AutoTokenizer loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_words = SPECIAL + ROLES + [str(d) for d in range(10)] + ONES + TEENS + WORDS
    vocab = {w: i for i, w in enumerate(dict.fromkeys(vocab_words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.model_max_length = 512
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_all(out_dir: Path, n_train: int = 4000, n_val: int = 200) -> None:
    build_tokenizer(out_dir / "tokenizer")
    train, val = instruction_rows(n_train, seed=1), instruction_rows(n_val, seed=2)
    write_jsonl(out_dir / "digits_train.jsonl", train)
    write_jsonl(out_dir / "digits_val.jsonl", val)
    write_jsonl(out_dir / "digits_chat_train.jsonl", [to_chat(r) for r in train])
    write_jsonl(out_dir / "digits_chat_val.jsonl", [to_chat(r) for r in val])
    write_jsonl(out_dir / "digits_sharegpt_train.jsonl", [to_chat(r, True) for r in train])
    write_jsonl(out_dir / "digits_text_train.jsonl", [to_text(r) for r in train])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--val", type=int, default=200)
    args = parser.parse_args()
    write_all(args.out_dir, args.train, args.val)


if __name__ == "__main__":
    main()
