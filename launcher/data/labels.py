"""The classification formats: label sets, and encoding rows into examples.

Labels in the data are label names or integer indices into the label set (the Hugging Face
``ClassLabel`` convention, so hub datasets such as glue/sst2 or conll2003 need no mapping).
Token classification labels only the first sub-word of each word; the rest, and special
tokens, get ``IGNORE_INDEX``, so a word counts once however the tokenizer splits it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from launcher.data.tokenized import IGNORE_INDEX, Encoded, Row, RowError
from launcher.errors import UserInputError
from launcher.recipe.sections import DataSection, FieldNames, LabelsSection


def infer_label_names(rows: Iterable[Row], fmt: str, fields: FieldNames) -> list[str]:
    """The distinct labels of ``rows`` (read once, one at a time): names sorted (tagging:
    ``O`` first), or, when the data holds class indices, ``"0" .. str(max)``."""
    key = fields.tags if fmt == "tagging" else fields.label
    seen: set[Any] = set()
    for row in rows:
        value = row.data.get(key)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise UserInputError(
                    row.where, f"field '{key}' must hold label names or class indices, got {v!r}"
                )
            seen.add(v)
    if any(isinstance(v, int) for v in seen) and any(isinstance(v, str) for v in seen):
        raise UserInputError(key, "the data mixes label names and class indices; set labels.names")
    if all(isinstance(v, int) for v in seen):
        if any(v < 0 for v in seen):
            raise UserInputError(key, "class indices must be >= 0")
        names = [str(i) for i in range(max(seen, default=-1) + 1)]
    else:
        names = sorted(seen, key=lambda v: (v != "O", v)) if fmt == "tagging" else sorted(seen)
    if len(names) < 2:
        raise UserInputError(
            "labels.names",
            f"the training data holds fewer than two labels ({names}); set labels.names",
        )
    return names


def label_index(value: Any, names: Sequence[str], key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RowError(f"field '{key}' must be a label name or class index, got {value!r}")
    if isinstance(value, int):
        if not 0 <= value < len(names):
            raise RowError(f"class index {value} in '{key}' is outside the {len(names)} labels")
        return value
    try:
        return names.index(value)
    except ValueError:
        known = list(names)
        raise RowError(f"label '{value}' in '{key}' is not in the label set {known}") from None


def required_names(labels: LabelsSection) -> list[str]:
    if labels.names is None:
        raise UserInputError("labels.names", "the label set is not resolved (prepare() fills it)")
    return labels.names


def _text(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        raise RowError(f"missing field '{key}'")
    if not isinstance(value, str):
        raise RowError(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


Target = int | float | tuple[float, ...]


def classification_item(
    row: dict[str, Any], cfg: DataSection, labels: LabelsSection
) -> tuple[str, str | None, Target]:
    """A text (or text pair) and its target: a class index, a multi-hot tuple or a number."""
    names = cfg.fields
    text = _text(row, names.text)
    pair = _text(row, names.text_pair) if names.text_pair else None
    if names.label not in row or row[names.label] is None:
        raise RowError(f"missing field '{names.label}'")
    value = row[names.label]
    target: Target
    if labels.problem_type == "regression":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RowError(f"field '{names.label}' must be a number for regression, got {value!r}")
        target = float(value)
    elif labels.problem_type == "multi_label":
        if not isinstance(value, list):
            raise RowError(f"field '{names.label}' must be a list of labels for multi_label")
        label_names = required_names(labels)
        hot = [0.0] * len(label_names)
        for v in value:
            hot[label_index(v, label_names, names.label)] = 1.0
        target = tuple(hot)
    else:
        target = label_index(value, required_names(labels), names.label)
    return text, pair, target


def classification_tokens(
    items: Sequence[tuple[str, str | None, Target]], cfg: DataSection, tokenizer: Any
) -> list[Encoded]:
    pairs = [pair for _, pair, _ in items] if cfg.fields.text_pair else None
    enc = tokenizer([text for text, _, _ in items], pairs, add_special_tokens=True,
                    return_attention_mask=False)
    types = enc.get("token_type_ids") if pairs is not None else None
    return [
        Encoded(ids, [IGNORE_INDEX] * len(ids), target, types[i] if types is not None else None)
        for i, (ids, (_, _, target)) in enumerate(zip(enc["input_ids"], items))
    ]


def tagging_item(
    row: dict[str, Any], cfg: DataSection, labels: LabelsSection
) -> tuple[list[str], list[int]]:
    """Words and one tag per word, as tag indices."""
    names = cfg.fields
    words, tags = row.get(names.tokens), row.get(names.tags)
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words) or not words:
        raise RowError(f"field '{names.tokens}' must be a non-empty list of strings")
    if not isinstance(tags, list):
        raise RowError(f"field '{names.tags}' must be a list of tags")
    if len(tags) != len(words):
        raise RowError(
            f"'{names.tokens}' has {len(words)} words but '{names.tags}' has {len(tags)} tags"
        )
    label_names = required_names(labels)
    return words, [label_index(t, label_names, names.tags) for t in tags]


def tagging_tokens(items: Sequence[tuple[list[str], list[int]]], tokenizer: Any) -> list[Encoded]:
    """The tag goes on each word's first sub-word only."""
    enc = tokenizer([words for words, _ in items], is_split_into_words=True,
                    add_special_tokens=True, return_attention_mask=False,
                    return_token_type_ids=False)
    out = []
    for i, (_, tag_ids) in enumerate(items):
        aligned, previous = [], None
        for word in enc.word_ids(i):
            aligned.append(IGNORE_INDEX if word is None or word == previous else tag_ids[word])
            previous = word
        out.append(Encoded(enc["input_ids"][i], aligned))
    return out
