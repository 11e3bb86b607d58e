"""The data's types: a row as read, an encoded example, tokenized splits stored flat."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


IGNORE_INDEX = -100

class RowError(ValueError):
    """A row that cannot be encoded; the caller adds where it came from."""


@dataclass(frozen=True)
class Row:
    data: dict[str, Any]
    where: str


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    target: int | float | tuple[float, ...] | None = None  # sequence classification only
    token_type_ids: list[int] | None = None  # text pairs, for models with segment embeddings


@dataclass(frozen=True)
class TokenizedSplit:
    """Variable-length examples stored flat: example i is ``tokens[offsets[i]:offsets[i+1]]``.

    Sequence classification adds one target per example in ``targets``: int64 class indices
    (single_label), float32 rows of multi-hot classes (multi_label) or float32 numbers
    (regression); the dtype and shape carry the meaning into the batch unchanged.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    targets: np.ndarray | None = None
    token_type_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[lo:hi], self.labels[lo:hi]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @staticmethod
    def from_examples(examples: Sequence[Encoded]) -> TokenizedSplit:
        lengths = [len(e.input_ids) for e in examples]
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat_ids = [t for e in examples for t in e.input_ids]
        flat_labels = [t for e in examples for t in e.labels]
        targets = types = None
        first = examples[0] if examples else None
        if getattr(first, "target", None) is not None:
            integer = isinstance(first.target, int)
            targets = np.asarray(
                [e.target for e in examples], dtype=np.int64 if integer else np.float32
            )
        if getattr(first, "token_type_ids", None) is not None:
            types = np.asarray([t for e in examples for t in e.token_type_ids], dtype=np.int8)
        return TokenizedSplit(
            np.asarray(flat_ids, dtype=np.int32), np.asarray(flat_labels, dtype=np.int32), offsets,
            targets, types,
        )

    def save(self, path: Path) -> None:
        optional = {
            k: v for k, v in (("targets", self.targets), ("token_type_ids", self.token_type_ids))
            if v is not None
        }
        np.savez(path, input_ids=self.input_ids, labels=self.labels, offsets=self.offsets, **optional)

    @staticmethod
    def load(path: Path) -> TokenizedSplit:
        with np.load(path, allow_pickle=False) as f:
            return TokenizedSplit(
                f["input_ids"], f["labels"], f["offsets"],
                f["targets"] if "targets" in f else None,
                f["token_type_ids"] if "token_type_ids" in f else None,
            )


@dataclass(frozen=True)
class SplitStats:
    read: int
    kept: int
    truncated: int
    dropped_too_long: int
    dropped_no_target: int

    def summary(self, name: str) -> str:
        return (
            f"{name}: {self.kept} examples kept of {self.read} read "
            f"({self.truncated} truncated, {self.dropped_too_long} dropped as too long, "
            f"{self.dropped_no_target} dropped with no target tokens)"
        )


@dataclass(frozen=True)
class PreparedData:
    train: TokenizedSplit
    validation: TokenizedSplit | None
    stats: dict[str, SplitStats] = field(default_factory=dict)
