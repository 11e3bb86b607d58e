"""This process's place in the job, and the few collectives the launcher itself issues."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[ftlaunch] {message}", flush=True)


def current_rank(use_gpu: bool) -> Rank:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_gpu:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return Rank(dist.get_rank(), dist.get_world_size(), local, device)


def all_reduce(value: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    dist.all_reduce(value, op=op)
    return value


def gather(value: Any, rank: Rank) -> list[Any]:
    """Every rank's ``value`` (small picklable objects only), in rank order, on every rank."""
    out: list[Any] = [None] * rank.world
    dist.all_gather_object(out, value)
    return out


def gather_rows(row: torch.Tensor, rank: Rank) -> list[list[float]]:
    """Every rank's 1-D tensor ``row`` as a list, in rank order, on every rank: one
    collective and one device-to-host copy, without pickling."""
    rows = [torch.empty_like(row) for _ in range(rank.world)]
    dist.all_gather(rows, row)
    return torch.stack(rows).tolist()


def any_rank(flag: bool, rank: Rank) -> bool:
    value = torch.tensor(int(flag), device=rank.device)
    return bool(all_reduce(value, dist.ReduceOp.MAX).item())
