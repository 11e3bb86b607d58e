"""Packing: whole examples into rows of at most max_length tokens, and the masks that keep
attention inside each example."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from launcher.data.tokenized import IGNORE_INDEX, TokenizedSplit


@dataclass(frozen=True)
class PackedSplit:
    """Rows of whole examples, each row at most ``max_length`` tokens: row r holds examples
    ``members[starts[r]:starts[r + 1]]`` (ascending). Two flat arrays, not a Python object
    per example."""

    members: np.ndarray
    starts: np.ndarray

    def __len__(self) -> int:
        return len(self.starts) - 1

    def row(self, r: int) -> np.ndarray:
        return self.members[self.starts[r] : self.starts[r + 1]]

    @property
    def rows(self) -> tuple[tuple[int, ...], ...]:
        """Every row as a tuple of example indices (for inspection; build it only for small
        splits)."""
        return tuple(tuple(self.row(r).tolist()) for r in range(len(self)))

    @staticmethod
    def from_rows(rows: Sequence[Sequence[int]]) -> PackedSplit:
        starts = np.zeros(len(rows) + 1, np.int64)
        np.cumsum([len(r) for r in rows], out=starts[1:])
        members = np.asarray([i for r in rows for i in r], dtype=np.int64)
        return PackedSplit(members, starts)


def pack_examples(lengths: np.ndarray, max_length: int) -> PackedSplit:
    """First-fit decreasing from the length array alone: the longest example first, each into
    the first row with room (a max-tree over the rows' free space finds it in log time)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    row_of = _first_fit(lengths[order].tolist(), max_length)
    by_row = np.empty(len(lengths), np.int64)
    by_row[order] = row_of
    members = np.lexsort((np.arange(len(lengths)), by_row))
    counts = np.bincount(by_row, minlength=int(by_row.max()) + 1 if len(by_row) else 0)
    starts = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=starts[1:])
    return PackedSplit(members.astype(np.int64), starts)


def _first_fit(sizes: list[int], capacity: int) -> np.ndarray:
    """The row each size goes into, first fit in the given order. Leaves of the tree are rows
    (one per size at most; a row not yet used is empty), inner nodes the most free space
    below them, so the first row with room is found by one walk down."""
    leaves = 1 << max(0, (len(sizes) - 1).bit_length())
    tree = [capacity] * (2 * leaves)
    out = np.empty(len(sizes), np.int64)
    used = 0
    for k, need in enumerate(sizes):
        if tree[1] >= need:
            node = 1
            while node < leaves:
                node = 2 * node if tree[2 * node] >= need else 2 * node + 1
            tree[node] -= need
        else:  # longer than a row: a row of its own that nothing else joins
            node = leaves + used
            tree[node] = -1
        used = max(used, node - leaves + 1)
        out[k] = node - leaves
        node //= 2
        while node:
            best = max(tree[2 * node], tree[2 * node + 1])
            if tree[node] == best:
                break
            tree[node] = best
            node //= 2
    return out



def group_by_length(lengths: np.ndarray, budget: int) -> PackedSplit:
    """Examples of similar length side by side: longest first, each group as many examples as
    fit ``budget`` tokens when padded to the group's longest (its first). A group is one micro
    batch, right-padded: causal attention needs no mask for its real tokens."""
    order = np.argsort(-lengths, kind="stable").astype(np.int64)
    starts, at = [0], 0
    while at < len(order):
        at += max(1, budget // max(int(lengths[order[at]]), 1))
        starts.append(min(at, len(order)))
    return PackedSplit(order, np.asarray(starts, dtype=np.int64))


def collate_packed(
    split: TokenizedSplit, packed: PackedSplit, row_indices: Sequence[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples; positions restart per example and ``segment_ids``
    (0 = padding, k = k-th example) let the model keep attention inside each example."""
    rows = [packed.row(int(r)).tolist() for r in row_indices]
    lengths = split.lengths()
    width = max(sum(int(lengths[i]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row, start=1):
            ids, labs = split.example(i)
            n = len(ids)
            input_ids[r, at : at + n] = torch.from_numpy(ids.astype(np.int64))
            labels[r, at : at + n] = torch.from_numpy(labs.astype(np.int64))
            labels[r, at] = IGNORE_INDEX
            positions[r, at : at + n] = torch.arange(n)
            segments[r, at : at + n] = seg
            at += n
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": positions,
        "segment_ids": segments,
    }


def block_diagonal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D causal mask that lets a token see only earlier tokens of its own example."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(same.shape[-2:], dtype=torch.bool, device=same.device).tril()
    allowed = same & causal & (segment_ids[:, :, None] > 0)
    allowed |= torch.eye(same.shape[-1], dtype=torch.bool, device=same.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=same.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def flatten_packed(batch: dict[str, torch.Tensor], segment_ids: torch.Tensor) -> dict[str, Any]:
    """Padding-free layout for flash-attn varlen: the real tokens of all packed rows in one row,
    positions restarting per example, and the examples' cumulative lengths.

    transformers derives varlen boundaries from ``position_ids`` only when the batch is a single
    row, so the boundaries are passed explicitly (``cu_seq_lens_*``, ``max_length_*``); that also
    spares it a device sync per layer to find them.
    """
    real = segment_ids > 0
    flat: dict[str, Any] = {k: v[real][None] for k, v in batch.items()}
    starts = torch.nonzero(flat["position_ids"][0] == 0).flatten()
    bounds = torch.cat([starts, torch.tensor([int(real.sum())])]).to(torch.int32)
    longest = int(bounds.diff().max())
    return flat | {
        "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
        "max_length_q": longest, "max_length_k": longest,
    }
