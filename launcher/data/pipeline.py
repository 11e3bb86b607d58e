"""Data preparation: read, split, encode and tokenize train/validation, once per node through
the cache (cache.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from launcher.data.cache import _write_cache, cache_key, default_cache_dir, read_cache
from launcher.data.encode import encode_rows
from launcher.data.read import numeric_fields, read_rows
from launcher.data.tokenized import PreparedData, Row, TokenizedSplit
from launcher.errors import UserInputError
from launcher.recipe.sections import DataSection, LabelsSection


def prepare_data(
    cfg: DataSection, tokenizer: Any, seed: int, labels: LabelsSection | None = None
) -> PreparedData:
    """Read, validate and tokenize train/validation, through the cache when it is warm. An
    entry that fails its checksums is rebuilt, never used."""
    key = cache_key(cfg, tokenizer, labels, seed)
    if key is None:
        return _tokenize_all(cfg, tokenizer, seed, labels)
    entry = (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()) / key
    cached = read_cache(entry)
    if cached is not None:
        return cached
    prepared = _tokenize_all(cfg, tokenizer, seed, labels)
    _write_cache(entry, prepared)
    return prepared


def _split_rows(cfg: DataSection, seed: int) -> tuple[list[Row], list[Row]]:
    numeric = numeric_fields(cfg)
    train_rows = read_rows(cfg.train, numeric)
    if cfg.validation is not None:
        return train_rows, read_rows(cfg.validation, numeric)
    if cfg.val_fraction > 0:
        order = np.random.default_rng(seed).permutation(len(train_rows))
        n_val = max(1, int(round(cfg.val_fraction * len(train_rows))))
        held = set(order[:n_val].tolist())
        return (
            [r for i, r in enumerate(train_rows) if i not in held],
            [r for i, r in enumerate(train_rows) if i in held],
        )
    return train_rows, []


def _tokenize_all(
    cfg: DataSection, tokenizer: Any, seed: int, labels: LabelsSection | None
) -> PreparedData:
    train_rows, val_rows = _split_rows(cfg, seed)
    train, train_stats = encode_rows(train_rows, cfg, tokenizer, labels)
    if not train:
        raise UserInputError(
            cfg.train.path, "no usable training examples: " + train_stats.summary("train")
        )
    stats = {"train": train_stats}
    validation = None
    if val_rows or cfg.validation is not None:
        val, val_stats = encode_rows(val_rows, cfg, tokenizer, labels)
        where = cfg.validation.path if cfg.validation else "data.val_fraction"
        if not val:
            raise UserInputError(where, "no usable validation examples: " + val_stats.summary("validation"))
        stats["validation"] = val_stats
        validation = TokenizedSplit.from_examples(val)
    return PreparedData(TokenizedSplit.from_examples(train), validation, stats)
