"""Sampling and collation: which units every rank uses at every step, and device batches."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from launcher.data.pack import (
    PackedSplit,
    block_diagonal_mask,
    collate_packed,
    flatten_packed,
    group_by_length,
    pack_examples,
)
from launcher.data.tokenized import IGNORE_INDEX, TokenizedSplit


@dataclass(frozen=True)
class StepPlan:
    """Which units (examples or packed rows) every rank uses at every optimizer step.

    Deterministic in (seed, epoch), so a resumed run continues exactly from a step number.
    """

    num_units: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int
    shuffle: bool

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_units // self.global_batch

    def micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.num_units, self.seed, epoch, self.shuffle)
        batch = order[k * self.global_batch : (k + 1) * self.global_batch]
        per_rank = self.micro_batch_size * self.grad_accum
        mine = batch[rank * per_rank : (rank + 1) * per_rank]
        return [
            mine[m * self.micro_batch_size : (m + 1) * self.micro_batch_size]
            for m in range(self.grad_accum)
        ]


@functools.lru_cache(maxsize=2)
def epoch_order(num_units: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The units in the order epoch ``epoch`` visits them: drawn once per epoch, not per step."""
    order = np.random.default_rng([seed, epoch]).permutation(num_units) if shuffle else np.arange(num_units)
    order.setflags(write=False)
    return order


def total_steps(plan: StepPlan, max_steps: int | None, epochs: float) -> int:
    return max_steps if max_steps is not None else max(1, math.ceil(epochs * plan.steps_per_epoch))


def collate_padded(
    split: TokenizedSplit, indices: Sequence[int], pad_id: int, pad_left: bool = False
) -> dict[str, torch.Tensor]:
    """Pad to the longest example (on the right unless ``pad_left``); padding is masked out of
    attention and loss.

    With per-example targets (sequence classification) those are the batch's labels."""
    examples = [split.example(int(i)) for i in indices]
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    types = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        at = slice(width - len(ids), width) if pad_left else slice(0, len(ids))
        input_ids[row, at] = torch.from_numpy(ids.astype(np.int64))
        labels[row, at] = torch.from_numpy(labs.astype(np.int64))
        attention[row, at] = 1
        if split.token_type_ids is not None:
            lo, hi = split.offsets[int(indices[row])], split.offsets[int(indices[row]) + 1]
            types[row, at] = torch.from_numpy(split.token_type_ids[lo:hi].astype(np.int64))
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
    if split.targets is not None:
        batch["labels"] = torch.from_numpy(split.targets[np.asarray(indices, dtype=np.int64)])
    if split.token_type_ids is not None:
        batch["token_type_ids"] = types
    return batch


def packing_layout(requested: str, attention: str | None) -> str:
    """What ``data.packing`` builds: concatenated ``rows`` (flash-attn's padding-free varlen
    layout) or ``length_groups`` (any other kernel: a block-diagonal mask would cost it more
    than the little padding length groups leave). ``attention`` None: not known here."""
    if requested != "auto":
        return requested
    return "rows" if attention in (None, "flash_attention_2") else "length_groups"


def training_units(
    lengths: np.ndarray, max_length: int, micro_batch_size: int, layout: str
) -> tuple[PackedSplit, int]:
    """The packed units and how many of them make a micro batch: ``micro_batch_size`` rows,
    or one length group of up to ``micro_batch_size`` x ``max_length`` tokens."""
    if layout == "rows":
        return pack_examples(lengths, max_length), micro_batch_size
    return group_by_length(lengths, micro_batch_size * max_length), 1


@dataclass(frozen=True)
class Batches:
    split: TokenizedSplit
    packed: PackedSplit | None
    pad_id: int
    dtype: torch.dtype
    attention: str
    pad_left: bool = False
    grouped: bool = False  # packed units are length groups, not concatenated rows

    def units(self) -> int:
        return len(self.packed) if self.packed else len(self.split)

    def make(self, indices: np.ndarray, device: torch.device) -> dict[str, Any]:
        """Packed rows keep attention inside each example: flash-attn gets one padding-free row
        with varlen boundaries; other kernels a block-diagonal mask, needed only when some row
        holds two or more examples. Otherwise padding only trails each row's one example, and
        plain causal attention (the fast path) is exact for every real token. Length groups are
        padded on the right and need no mask either, for the same reason."""
        if self.packed is None:
            batch = collate_padded(self.split, indices, self.pad_id, self.pad_left)
        elif self.grouped:
            examples = [i for r in indices for i in self.packed.row(int(r)).tolist()]
            batch = collate_padded(self.split, examples, self.pad_id, self.pad_left)
            if not self.pad_left:
                del batch["attention_mask"]
        else:
            batch = collate_packed(self.split, self.packed, indices, self.pad_id)
            segments = batch.pop("segment_ids")
            if self.attention == "flash_attention_2":
                batch = flatten_packed(batch, segments)
            elif int(segments.max()) > 1:
                batch["attention_mask"] = block_diagonal_mask(segments, self.dtype)
            else:
                del batch["position_ids"]
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def tokens(self, indices: np.ndarray) -> int:
        """Real (non-padding) tokens in these units."""
        lengths = self.split.lengths()
        if self.packed is None:
            return int(lengths[indices].sum())
        return int(sum(lengths[self.packed.row(int(r))].sum() for r in indices))
