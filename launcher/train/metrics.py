"""Training metrics: step timing and memory on each rank, and the JSONL sink rank 0 writes
(the driver's progress line is launcher.driver.progress)."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

PHASES = ("data", "fwd_bwd", "optim")


class PhaseTimer:
    """Splits one step's time into phases (``lap(phase)`` closes the phase that just ran).

    On GPU the marks are CUDA events on the current stream, read once in ``seconds()``, so
    timing adds no host synchronisation inside the step.
    """

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._laps: list[tuple[str, Any, Any]] = []
        self._last = self._mark()

    def _mark(self) -> Any:
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def lap(self, phase: str) -> None:
        now = self._mark()
        self._laps.append((phase, self._last, now))
        self._last = now

    def seconds(self) -> dict[str, float]:
        """``time_<phase>_s`` for every phase in PHASES."""
        if self._cuda:
            self._last.synchronize()
        totals = dict.fromkeys(PHASES, 0.0)
        for phase, start, end in self._laps:
            totals[phase] += start.elapsed_time(end) / 1000 if self._cuda else end - start
        return {f"time_{phase}_s": value for phase, value in totals.items()}


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far (10^9 bytes): allocated GPU memory on a GPU, the
    resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


class JsonlSink:
    """Appends one JSON object per logged step. On resume, records past the resumed step are
    dropped first, so the file reads as one uninterrupted run; a start from step 0 (no
    checkpoint yet) keeps nothing, since it logs every step again, step 0's evaluation too."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            kept = [
                line for line in path.read_text().splitlines()
                if resume_step > 0 and _step(line) <= resume_step
            ]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
        self._file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # unreadable tail of a crashed write: drop it


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
