"""Training metrics: step timing and memory on each rank, the JSONL sink rank 0 writes, and
the driver's live progress line."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TextIO

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


def format_progress(record: dict[str, Any], total: int | None, started: float) -> str:
    step = record["step"]
    parts = [f"step {step}/{total or '?'}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "eval_loss" in record:
        parts.append(f"eval_loss {record['eval_loss']:.4f}")
    for key, value in record.items():  # every other eval metric: accuracy, F1, exact match...
        if key.startswith("eval_") and key != "eval_loss" and isinstance(value, (int, float)):
            parts.append(f"{key[5:]} {value:.4g}" if abs(value) >= 10 else f"{key[5:]} {value:.3f}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if "peak_memory_gb" in record:
        parts.append(f"mem {record['peak_memory_gb']:.1f} GB")
    if total and step:
        elapsed = time.time() - started
        parts.append(f"ETA {_duration(elapsed / step * (total - step))}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLine:
    """Metrics consumer that prints one progress line per record."""

    def __init__(self, run_dir: Path, stream: TextIO = sys.stderr):
        self.run_dir, self.stream = run_dir, stream
        self._started = time.time()

    def __call__(self, record: dict[str, Any]) -> None:
        total = _total_steps(self.run_dir)
        self.stream.write(format_progress(record, total, self._started) + "\n")
        self.stream.flush()


Consumer = Callable[[dict[str, Any]], None]


class MetricsFollower:
    """Driver-side thread that tails metrics.jsonl and hands every new record to each consumer.

    Records already in the file on entry are not handed out again. A resumed worker rewrites
    the file (cut back to its resume step, a new inode): the follower then reads it from the
    start and hands out the lines that differ from those it has seen at their step, so the
    steps trained again reach the consumers and the lines kept do not."""

    def __init__(self, run_dir: Path, consumers: list[Consumer], interval: float = 1.0):
        self.path = run_dir / "metrics.jsonl"
        self.consumers = consumers
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._offset = 0
        self._inode: int | None = None
        self._seen: dict[Any, str] = {}

    def __enter__(self) -> MetricsFollower:
        if self.path.exists():
            with self.path.open("rb") as f:
                self._inode = os.fstat(f.fileno()).st_ino
                data = f.read()
            complete = data[: data.rfind(b"\n") + 1]
            self._offset = len(complete)
            for line in complete.decode().splitlines():
                self._seen[_step(line)] = line
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()
        for consumer in self.consumers:  # the live view gives the terminal back
            getattr(consumer, "finish_view", lambda: None)()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            return
        with f:
            stat = os.fstat(f.fileno())
            if stat.st_ino != self._inode:
                self._inode, self._offset = stat.st_ino, 0
            self._offset = min(self._offset, stat.st_size)
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = _step(line)
            if self._seen.get(step) == line:
                continue
            self._seen[step] = line
            for consumer in self.consumers:
                consumer(record)


class ProgressFollower(MetricsFollower):
    """Follows metrics.jsonl and prints a live progress line."""

    def __init__(self, run_dir: Path, stream: TextIO = sys.stderr, interval: float = 1.0):
        super().__init__(run_dir, [ProgressLine(run_dir, stream)], interval)


def follow(run_dir: Path, progress: bool, consumers: Sequence[Consumer] = ()) -> Any:
    """A follower feeding the progress line (when ``progress``) and ``consumers``, or a
    context that does nothing when there is no one to feed."""
    fed = [c for c in consumers if c is not None]
    if progress:
        from launcher.driver.live import progress_view

        fed.insert(0, progress_view(run_dir))
    return MetricsFollower(run_dir, fed) if fed else nullcontext()


def _total_steps(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / "run_info.json").read_text())["total_steps"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None
