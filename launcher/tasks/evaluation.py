"""The one ZeRO-3-safe way to evaluate on every rank.

Each rank takes a strided share of the items (no item twice, none lost), cut into chunks.
Under ZeRO-3 every forward pass gathers weights collectively, so all ranks must run the same
number of passes: the longest share decides (a MAX all-reduce), and a rank that has run out
runs a dummy chunk whose result it discards. Totals are summed over ranks at the end.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from launcher.ranks import Rank, all_reduce


def sharded(
    items: Sequence[int] | np.ndarray, rank: Rank, size: int, limit: int | None = None
) -> Iterator[tuple[np.ndarray, bool]]:
    """(chunk, real) pairs, the same number on every rank (at most ``limit``); ``real`` is
    False for a dummy chunk, run only to keep the collectives in step."""
    items = np.asarray(items, dtype=np.int64)
    mine = items[rank.rank :: rank.world]
    chunks = [mine[i : i + size] for i in range(0, len(mine), size)]
    steps = int(all_reduce(torch.tensor(len(chunks), device=rank.device), dist.ReduceOp.MAX))
    steps = min(steps, limit or steps)
    filler = mine[:1] if len(mine) else items[:1] if len(items) else np.zeros(1, dtype=np.int64)
    for i in range(steps):
        yield (chunks[i], True) if i < len(chunks) else (filler, False)


class Totals:
    """Float64 sums kept on this rank's device and added over all ranks by :meth:`reduced`."""

    def __init__(self, size: int, rank: Rank):
        self.values = torch.zeros(size, dtype=torch.float64, device=rank.device)

    def add(self, *values: Any) -> None:
        for i, value in enumerate(values):
            self.values[i] += value.double() if isinstance(value, torch.Tensor) else float(value)

    def reduced(self) -> list[float]:
        return all_reduce(self.values).tolist()


class evaluating:
    """Context manager: the model in eval mode without gradients, back in training after."""

    def __init__(self, model: Any):
        self.model = model
        self.grad = torch.no_grad()

    def __enter__(self) -> Any:
        self.model.eval()
        self.grad.__enter__()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.grad.__exit__(*exc)
        self.model.train()
