"""The data's types: a row as read, an encoded example, tokenized splits stored flat."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np


IGNORE_INDEX = -100
# What the encoders ask of a tokenizer call: the ids alone (a fast tokenizer converts every list
# it returns from Rust, row by row: the attention mask too would cost a fifth of the encoding).
IDS_ONLY = {"return_attention_mask": False, "return_token_type_ids": False}

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
        return self._lengths

    @cached_property
    def _lengths(self) -> np.ndarray:
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

    def arrays(self) -> dict[str, np.ndarray]:
        optional = (("targets", self.targets), ("token_type_ids", self.token_type_ids))
        return {"input_ids": self.input_ids, "labels": self.labels, "offsets": self.offsets,
                **{k: v for k, v in optional if v is not None}}

    def save(self, directory: Path, name: str) -> list[str]:
        """One ``.npy`` file per array, ``NAME.ARRAY.npy``; returns the file names."""
        files = []
        for array, value in self.arrays().items():
            files.append(f"{name}.{array}.npy")
            np.save(directory / files[-1], value, allow_pickle=False)
        return files

    @staticmethod
    def load(directory: Path, name: str) -> TokenizedSplit:
        """Memory-mapped, read-only: every process that loads one file shares its pages."""

        def array(kind: str) -> np.ndarray | None:
            path = directory / f"{name}.{kind}.npy"
            if kind in OPTIONAL_ARRAYS and not path.exists():
                return None
            return np.load(path, mmap_mode="r", allow_pickle=False)

        return TokenizedSplit(
            array("input_ids"), array("labels"), array("offsets"), array("targets"),
            array("token_type_ids"),
        )


OPTIONAL_ARRAYS = ("targets", "token_type_ids")


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
