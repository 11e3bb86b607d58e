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
    """Rows of whole examples, each row at most ``max_length`` tokens (first-fit decreasing)."""

    rows: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.rows)


def pack_examples(lengths: np.ndarray, max_length: int) -> PackedSplit:
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order.tolist():
        n = int(lengths[i])
        for b, free in enumerate(space):
            if n <= free:
                bins[b].append(i)
                space[b] -= n
                break
        else:
            bins.append([i])
            space.append(max_length - n)
    return PackedSplit(tuple(tuple(sorted(b)) for b in bins))


def group_by_length(lengths: np.ndarray, budget: int) -> PackedSplit:
    """Examples of similar length side by side: longest first, each group as many examples as
    fit ``budget`` tokens when padded to the group's longest (its first). A group is one micro
    batch, right-padded: causal attention needs no mask for its real tokens."""
    order = np.argsort(-lengths, kind="stable").tolist()
    groups: list[tuple[int, ...]] = []
    at = 0
    while at < len(order):
        fit = max(1, budget // max(int(lengths[order[at]]), 1))
        groups.append(tuple(order[at : at + fit]))
        at += fit
    return PackedSplit(tuple(groups))

def collate_packed(
    split: TokenizedSplit, packed: PackedSplit, row_indices: Sequence[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples; positions restart per example and ``segment_ids``
    (0 = padding, k = k-th example) let the model keep attention inside each example."""
    rows = [packed.rows[int(r)] for r in row_indices]
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
