"""Synthetic instruction data for the benchmark, and the word-level tokenizer it is written in.

Lengths are either long-tailed like real SFT data (log-normal: most examples short, a tail out
to the sequence length) or all equal to the sequence length. The task is learnable, so final
losses mean something: words are Zipf-distributed (the unigram statistics are learnt in a few
steps) and the response is the prompt's words mapped through a fixed permutation (learnt
through attention over more steps).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launcher.data.synthetic import save_word_level_tokenizer

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "=")
PROMPT_TEMPLATE = "{instruction} ="


@dataclass(frozen=True)
class LengthSpec:
    kind: str  # "long_tailed" | "fixed"
    seq_len: int
    median: int
    sigma: float = 0.9
    shortest: int = 8


def build_tokenizer(vocab_size: int, out_dir: Path) -> Path:
    """A whitespace word-level tokenizer with ``vocab_size`` entries: w0, w1, ... and specials."""
    words = [*SPECIALS, *(f"w{i}" for i in range(vocab_size - len(SPECIALS)))]
    return save_word_level_tokenizer(words, out_dir)


def sample_lengths(spec: LengthSpec, count: int, rng: np.random.Generator) -> np.ndarray:
    """Total tokens per example (prompt, '=', response and end-of-sequence)."""
    if spec.kind == "fixed":
        return np.full(count, spec.seq_len)
    raw = rng.lognormal(np.log(spec.median), spec.sigma, count)
    return np.clip(np.round(raw), spec.shortest, spec.seq_len).astype(int)


def make_examples(
    lengths: np.ndarray, vocab_size: int, rng: np.random.Generator, zipf_a: float = 1.1
) -> list[dict[str, str]]:
    words = vocab_size - len(SPECIALS)
    weights = 1.0 / np.arange(10, words + 10) ** zipf_a
    weights /= weights.sum()
    mapping = np.random.default_rng(0).permutation(words)
    rows = []
    for total in lengths.tolist():
        respond = (total - 2) // 2
        prompt = rng.choice(words, size=total - 2 - respond, p=weights)
        response = mapping[prompt[:respond]]
        rows.append(
            {
                "instruction": " ".join(f"w{w}" for w in prompt),
                "output": " ".join(f"w{w}" for w in response),
            }
        )
    return rows


def write_jsonl(rows: list[dict[str, str]], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_dataset(
    spec: LengthSpec, train: int, validation: int, vocab_size: int, seed: int, out_dir: Path
) -> tuple[Path, Path, np.ndarray]:
    """Train and validation files for one length distribution, and the training examples'
    token lengths."""
    rng = np.random.default_rng([seed, len(spec.kind)])
    lengths = sample_lengths(spec, train + validation, rng)
    rows = make_examples(lengths, vocab_size, rng)
    train_path = write_jsonl(rows[:train], out_dir / f"{spec.kind}_train.jsonl")
    val_path = write_jsonl(rows[train:], out_dir / f"{spec.kind}_val.jsonl")
    return train_path, val_path, lengths[:train]
