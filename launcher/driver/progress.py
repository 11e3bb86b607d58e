"""The driver's live progress line, from the run's metrics.jsonl as the workers write it."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from launcher.run.rundir import RunDir


def format_progress(record: dict[str, Any], total: int | None, started: float) -> str:
    step = record["step"]
    parts = [f"step {step}/{total or '?'}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "eval_loss" in record:
        parts.append(f"eval_loss {record['eval_loss']:.4f}")
    if "eval_exact_match" in record:
        parts.append(f"exact_match {record['eval_exact_match']:.3f}")
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


class ProgressFollower:
    """Driver-side thread that tails metrics.jsonl and prints a live progress line."""

    def __init__(self, run_dir: Path, stream: TextIO = sys.stderr, interval: float = 1.0):
        self.run_dir = run_dir
        self.stream = stream
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._offset = 0
        self._started = time.time()

    def __enter__(self) -> ProgressFollower:
        path = RunDir(self.run_dir).metrics
        self._offset = path.stat().st_size if path.exists() else 0
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        path = RunDir(self.run_dir).metrics
        if not path.exists():
            return
        self._offset = min(self._offset, path.stat().st_size)
        with path.open() as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self._offset += len(complete.encode())
        total = _total_steps(self.run_dir)
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.stream.write(format_progress(record, total, self._started) + "\n")
        self.stream.flush()


def _total_steps(run_dir: Path) -> int | None:
    try:
        return json.loads(RunDir(run_dir).run_info.read_text())["total_steps"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None
