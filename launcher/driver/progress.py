"""The driver's side of metrics.jsonl: a follower that hands each new record to consumers
(the live progress line, the trackers)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TextIO

from launcher.run.rundir import RunDir
from launcher.train.metrics import _step


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
        self.path = RunDir(run_dir).metrics
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
        return json.loads(RunDir(run_dir).run_info.read_text())["total_steps"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None
