"""The training loop's side of a stop request (launcher.run.stop_file): agree on it across
ranks, and commit a checkpoint first when the last save suggests one fits in the time left."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from launcher.ranks import Rank, any_rank, gather
from launcher.run import stop_file
from launcher.run.stop_file import StopRequest


def agreed(run_dir: Path, rank: Rank) -> StopRequest | None:
    """The stop request, the same on every rank (a collective: every rank calls it)."""
    mine = stop_file.read(run_dir) if rank.rank == 0 else None
    if not any_rank(mine is not None, rank):
        return None
    return gather(mine, rank)[0]


class PreemptState:
    """The newest saved step and how long the last save took, to decide at a step boundary
    whether a checkpoint still fits. ``save(step)`` commits a checkpoint of ``step``."""

    def __init__(self, start: int, save: Callable[[int], None]):
        self.saved = start
        self.save_seconds: float | None = None
        self.stopped = False
        self.saveable = True  # False after a step whose loss is not finite (train.divergence)
        self._save = save

    def timed_save(self, step: int) -> None:
        began = time.monotonic()
        self._save(step)
        self.saved, self.save_seconds = step, time.monotonic() - began

    def stop_here(self, run_dir: Path, step: int, rank: Rank) -> bool:
        """True when the driver asked to stop; first commits step ``step`` if asked and it fits."""
        req = agreed(run_dir, rank)
        if req is None:
            return False
        self.stopped = True
        if step > self.saved and not self.saveable:
            rank.log(f"{req.signal}: no checkpoint at step {step}: its loss is not finite")
        elif step > self.saved and stop_file.save_fits(req, self.save_seconds):
            rank.log(f"{req.signal}: committing a checkpoint at step {step} before stopping")
            self.timed_save(step)
        elif step > self.saved and req.save:
            rank.log(f"{req.signal}: no checkpoint at step {step}: the last save took "
                     f"{self.save_seconds:.1f} s, {max(req.seconds_left(), 0):.1f} s are left")
        newest = f"step {self.saved}" if self.saved else "none"
        rank.log(f"{req.signal}: stopping at step {step}; newest checkpoint: {newest}")
        return True
