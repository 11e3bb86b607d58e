"""``ftlaunch check --show N``: the first N encoded training examples as the model sees them.

Trained tokens are highlighted and masked ones dim (rich, on a terminal); without a terminal
each trained span is wrapped in ``⟦`` and ``⟧``, characters ordinary data does not hold, so
the output can be read, diffed and checked by a program. A causal LM trains token j when its
label is not -100 and j > 0 (the loss predicts token j from the ones before it); a sequence
classifier shows the example's label; a tagger shows ``word/TAG`` for each tagged word.
Then the token-length percentiles of each split and its truncation and drop counts.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import numpy as np

from launcher.data import IGNORE_INDEX, PreparedData, TokenizedSplit
from launcher.recipe import LabelsSection, Recipe

OPEN, CLOSE = "⟦", "⟧"
Span = tuple[str, bool]  # text, trained


def trained_mask(labels: np.ndarray, task: str) -> np.ndarray:
    """Which positions the loss trains on."""
    mask = labels != IGNORE_INDEX
    if task == "causal_lm" and len(mask):
        mask[0] = False
    return mask


def causal_spans(ids: np.ndarray, labels: np.ndarray, tokenizer: Any) -> list[Span]:
    """Runs of consecutive tokens alike in being trained, each decoded as one piece."""
    mask = trained_mask(labels, "causal_lm")
    spans: list[Span] = []
    start = 0
    for j in range(1, len(ids) + 1):
        if j == len(ids) or mask[j] != mask[start]:
            spans.append((tokenizer.decode(ids[start:j].tolist()), bool(mask[start])))
            start = j
    return spans


def tagged_spans(ids: np.ndarray, labels: np.ndarray, tokenizer: Any, names: list[str]) -> list[Span]:
    """``word/TAG`` for every tagged word (its first sub-word holds the tag; the sub-words
    after it belong to it); special tokens stay dim."""
    special = set(tokenizer.all_special_ids)
    spans: list[Span] = []
    j = 0
    while j < len(ids):
        if labels[j] == IGNORE_INDEX:
            spans.append((tokenizer.decode([int(ids[j])]), False))
            j += 1
            continue
        end = j + 1
        while end < len(ids) and labels[end] == IGNORE_INDEX and int(ids[end]) not in special:
            end += 1
        word = tokenizer.decode(ids[j:end].tolist()).strip()
        spans += [(f"{word}/{names[int(labels[j])]}", True), (" ", False)]
        j = end
    return spans


def label_text(target: Any, labels: LabelsSection) -> str:
    if labels.problem_type == "regression":
        return f"{float(target):g}"
    names = labels.names or []
    if labels.problem_type == "multi_label":
        return ", ".join(names[i] for i in np.flatnonzero(np.asarray(target) > 0)) or "(none)"
    return names[int(target)]


def example_spans(split: TokenizedSplit, i: int, recipe: Recipe, tokenizer: Any) -> list[Span]:
    ids, labels = split.example(i)
    if recipe.task == "causal_lm":
        return causal_spans(ids, labels, tokenizer)
    if recipe.task == "token_classification":
        return tagged_spans(ids, labels, tokenizer, list(recipe.labels.names or []))
    text = tokenizer.decode(ids.tolist())
    return [(text, False), ("  -> label: ", False), (label_text(split.targets[i], recipe.labels), True)]


def plain(spans: list[Span]) -> str:
    return "".join(f"{OPEN}{text}{CLOSE}" if trained else text for text, trained in spans)


def length_summary(name: str, split: TokenizedSplit, stats: Any) -> str:
    lengths = split.lengths()
    p50, p90, p99 = (int(np.percentile(lengths, q)) for q in (50, 90, 99)) if len(lengths) else (0,) * 3
    top = int(lengths.max()) if len(lengths) else 0
    counts = f"; {stats.summary(name)}" if stats is not None else ""
    return f"{name} lengths (tokens): p50 {p50}, p90 {p90}, p99 {p99}, max {top}{counts}"


def show(recipe: Recipe, data: PreparedData, n: int, stream: TextIO | None = None) -> None:
    """Print ``n`` training examples (fewer when the split is smaller) and the length summary."""
    from launcher.modeling import load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    stream = stream or sys.stdout
    styled = stream.isatty()
    console = None
    if styled:
        from rich.console import Console

        console = Console(file=stream, highlight=False)
    stream.write(f"# {min(n, len(data.train))} of {len(data.train)} training examples "
                 f"(trained tokens {'highlighted, masked dim' if styled else f'in {OPEN} {CLOSE}'})\n")
    for i in range(min(n, len(data.train))):
        spans = example_spans(data.train, i, recipe, tokenizer)
        stream.write(f"--- example {i} ({len(data.train.example(i)[0])} tokens)\n")
        if console is not None:
            console.print(styled_text(spans))
        else:
            stream.write(plain(spans) + "\n")
    splits = {"train": data.train, "validation": data.validation}
    for name, split in splits.items():
        if split is not None:
            stream.write(f"# {length_summary(name, split, data.stats.get(name))}\n")
    stream.flush()


def styled_text(spans: list[Span]) -> Any:
    from rich.text import Text

    text = Text()
    for piece, trained in spans:
        text.append(piece, style="bold green" if trained else "dim")
    return text
