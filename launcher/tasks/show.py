"""What ``ftlaunch check --show`` prints of one encoded example, per task.

A causal LM trains token j when its label is not -100 and j > 0 (the loss predicts token j
from the ones before it); a sequence classifier shows the example's label; a tagger shows
``word/TAG`` for each tagged word.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from launcher.data.tokenized import IGNORE_INDEX, TokenizedSplit
from launcher.recipe import LabelsSection, Recipe

OPEN, CLOSE = "⟦", "⟧"
Span = tuple[str, bool]  # text, trained


def trained_mask(labels: np.ndarray) -> np.ndarray:
    """Which positions a causal LM's loss trains on: a label, and a token before it."""
    mask = labels != IGNORE_INDEX
    if len(mask):
        mask[0] = False
    return mask


def causal_spans(ids: np.ndarray, labels: np.ndarray, tokenizer: Any) -> list[Span]:
    """Runs of consecutive tokens alike in being trained, each decoded as one piece."""
    mask = trained_mask(labels)
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


def labelled_spans(split: TokenizedSplit, i: int, recipe: Recipe, tokenizer: Any) -> list[Span]:
    """A sequence classifier's example: its text, then its label (or labels, or value)."""
    text = tokenizer.decode(split.example(i)[0].tolist())
    return [(text, False), ("  -> label: ", False), (label_text(split.targets[i], recipe.labels), True)]


SPANS = {
    "causal_lm": lambda split, i, recipe, tok: causal_spans(*split.example(i), tok),
    "token_classification": lambda split, i, recipe, tok: tagged_spans(
        *split.example(i), tok, list(recipe.labels.names or [])
    ),
}


def example_spans(split: TokenizedSplit, i: int, recipe: Recipe, tokenizer: Any) -> list[Span]:
    """Example ``i`` of ``split`` as text pieces, each marked trained or not."""
    return SPANS.get(recipe.task, labelled_spans)(split, i, recipe, tokenizer)
