"""Straggler detection from the per-rank step times in metrics.jsonl.

Rank 0 writes, on every logged step, ``rank_step_s``: each rank's own work in that step (see
``launcher.train.loop.train_step``), in rank order. A rank is a *straggler* when, on each of the
last ``window`` logged steps, its time exceeds ``factor`` times the median of the other ranks'
times and exceeds that median by at least ``min_gap_s`` (so millisecond jitter on a tiny model
is not news). Its reported slowdown is the median, over the window, of its time divided by the
others' median. One slow step, or a rank slow on most but not all of the window, is not a
straggler: only a persistent slowdown is.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

WINDOW = 5
FACTOR = 1.2
MIN_GAP_S = 0.01


@dataclass(frozen=True)
class Straggler:
    rank: int
    node: str | None
    slowdown: float
    steps: int

    def message(self) -> str:
        where = f" on {self.node}" if self.node else ""
        return (
            f"straggler: rank {self.rank}{where} is {self.slowdown:.1f}x slower than the "
            f"median over the last {self.steps} steps"
        )


def ratios(times: Sequence[float], min_gap_s: float = MIN_GAP_S) -> list[float | None]:
    """Each rank's time over the median of the others' (None where the gap is under
    ``min_gap_s`` or the others took no time)."""
    out: list[float | None] = []
    for r, t in enumerate(times):
        others = statistics.median([x for i, x in enumerate(times) if i != r])
        out.append(t / others if others > 0 and t - others >= min_gap_s else None)
    return out


def stragglers(
    window: Sequence[Sequence[float]], nodes: Sequence[str] | None = None,
    factor: float = FACTOR, min_gap_s: float = MIN_GAP_S,
) -> list[Straggler]:
    """The ranks slow on every step of ``window`` (a list of per-step ``rank_step_s``)."""
    if not window or len({len(times) for times in window}) != 1 or len(window[0]) < 2:
        return []
    per_step = [ratios(times, min_gap_s) for times in window]
    found = []
    for r in range(len(window[0])):
        seen = [step[r] for step in per_step]
        if all(x is not None and x > factor for x in seen):
            node = nodes[r] if nodes and r < len(nodes) else None
            found.append(Straggler(r, node, statistics.median(seen), len(window)))
    return found


class Detector:
    """Feeds on metrics records; ``observe`` returns the stragglers, ``new`` those not yet
    reported (each rank is reported once)."""

    def __init__(self, window: int = WINDOW, factor: float = FACTOR, min_gap_s: float = MIN_GAP_S):
        self.factor, self.min_gap_s = factor, min_gap_s
        self._times: deque[list[float]] = deque(maxlen=window)
        self._nodes: list[str] | None = None
        self._reported: set[int] = set()
        self.current: list[Straggler] = []

    def observe(self, record: dict[str, Any], nodes: Sequence[str] | None = None) -> list[Straggler]:
        """Returns the stragglers first seen on this record (``nodes``: each rank's host)."""
        times = record.get("rank_step_s")
        if not isinstance(times, list):
            return []
        self._nodes = list(nodes) if nodes else None
        self._times.append([float(t) for t in times])
        if len(self._times) < (self._times.maxlen or 0):
            self.current = []
            return []
        self.current = stragglers(list(self._times), self._nodes, self.factor, self.min_gap_s)
        new = [s for s in self.current if s.rank not in self._reported]
        self._reported |= {s.rank for s in new}
        return new
