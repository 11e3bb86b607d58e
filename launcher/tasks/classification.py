"""Sequence and token classification: label sets, encoding rows into examples, and the loss.

Labels in the data are label names or integer indices into the label set (the Hugging Face
``ClassLabel`` convention, so hub datasets such as glue/sst2 or conll2003 need no mapping).
Token classification labels only the first sub-word of each word; the rest, and special
tokens, get ``IGNORE_INDEX``, so a word counts once however the tokenizer splits it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from launcher.data.pipeline import IGNORE_INDEX, Encoded, Row, RowError
from launcher.errors import UserInputError
from launcher.recipe import DataSection, FieldNames, LabelsSection

HF_PROBLEM_TYPES = {
    "single_label": "single_label_classification",
    "multi_label": "multi_label_classification",
    "regression": "regression",
}


# ---------------------------------------------------------------- label sets


def infer_label_names(rows: Sequence[Row], fmt: str, fields: FieldNames) -> list[str]:
    """The distinct labels of ``rows``: names sorted (tagging: ``O`` first), or, when the data
    holds class indices, ``"0" .. str(max)``."""
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


# ---------------------------------------------------------------- encoding


def _text(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        raise RowError(f"missing field '{key}'")
    if not isinstance(value, str):
        raise RowError(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def encode_classification(
    row: dict[str, Any], cfg: DataSection, tokenizer: Any, labels: LabelsSection
) -> Encoded:
    """A text (or text pair) and its target: a class index, a multi-hot tuple or a number."""
    names = cfg.fields
    text = _text(row, names.text)
    pair = _text(row, names.text_pair) if names.text_pair else None
    enc = tokenizer(text, pair, add_special_tokens=True)
    if names.label not in row or row[names.label] is None:
        raise RowError(f"missing field '{names.label}'")
    value = row[names.label]
    target: int | float | tuple[float, ...]
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
    token_types = enc.get("token_type_ids") if pair is not None else None
    return Encoded(enc["input_ids"], [IGNORE_INDEX] * len(enc["input_ids"]), target, token_types)


def encode_tagging(
    row: dict[str, Any], cfg: DataSection, tokenizer: Any, labels: LabelsSection
) -> Encoded:
    """Words and one tag per word; the tag goes on each word's first sub-word only."""
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
    tag_ids = [label_index(t, label_names, names.tags) for t in tags]
    enc = tokenizer(words, is_split_into_words=True, add_special_tokens=True)
    aligned, previous = [], None
    for word in enc.word_ids():
        aligned.append(IGNORE_INDEX if word is None or word == previous else tag_ids[word])
        previous = word
    return Encoded(enc["input_ids"], aligned)


# ---------------------------------------------------------------- model config and loss


def configure_labels(config: Any, task: str, labels: LabelsSection, pad_token_id: int) -> Any:
    """Give a model config its head: label count, id2label/label2id and problem type."""
    names = labels.names or ["score"]
    config.num_labels = labels.num_labels if labels.problem_type != "regression" else 1
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}
    if task == "sequence_classification":
        config.problem_type = HF_PROBLEM_TYPES[labels.problem_type]
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = pad_token_id  # sequence classification finds the last real token
    return config


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    """Summed loss over a batch's targets (the caller normalises by :func:`target_count`)."""
    logits = logits.float()
    if problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum")
    if problem_type == "multi_label":
        return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum")
    return F.cross_entropy(
        logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def target_count(labels: torch.Tensor, problem_type: str) -> int:
    """Targets a batch's loss is summed over: labelled examples or tokens, or, for multi_label,
    every (example, class) pair, so the mean is per binary decision as in BCE."""
    if problem_type == "single_label":
        return int((labels != IGNORE_INDEX).sum())
    return labels.numel()


def model_logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The model's logits; token-level ones only at the input's positions (prompt tuning
    prepends virtual tokens, whose outputs are no prediction)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return logits[:, -batch["input_ids"].shape[1] :] if logits.dim() == 3 else logits


def batch_loss_sum(model: Any, batch: dict[str, Any], problem_type: str) -> torch.Tensor:
    return loss_sum(model_logits(model, batch), batch["labels"], problem_type)


def pads_left(task: str, method: str, model_type: str) -> bool:
    """Whether batches pad on the left. A decoder classifier scores its last non-padding token,
    which it finds from input_ids; under prompt tuning peft gives it embeddings (the virtual
    tokens prepended) instead, so it scores the last position, which must then be a real token.
    Encoders (architectures with a masked-LM head) pool the first position and keep right
    padding, as their absolute position embeddings need."""
    if task != "sequence_classification" or method != "prompt_tuning":
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def head_module_names(model: torch.nn.Module) -> list[str]:
    """The task head's top-level modules (``classifier`` for BERT, ``score`` for Llama): the
    children with parameters that are not the pretrained body."""
    body = getattr(model, "base_model_prefix", "")
    return [
        name
        for name, child in model.named_children()
        if name != body and any(True for _ in child.parameters())
    ]
