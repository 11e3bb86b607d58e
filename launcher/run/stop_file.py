"""The stop request: the file the driver writes on SIGINT or SIGTERM and every rank reads at
each step boundary (see launcher.driver.stop for the driver's side, launcher.train.preempt for
the workers')."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.durable import write_atomic
from launcher.run.rundir import RunDir


@dataclass(frozen=True)
class StopRequest:
    signal: str
    save: bool
    deadline: float  # time.time() after which the driver kills the workers

    def seconds_left(self) -> float:
        return self.deadline - time.time()


def request(run_dir: Path, req: StopRequest) -> None:
    write_atomic(RunDir(run_dir).stop_request, json.dumps(req.__dict__))


def clear(run_dir: Path) -> None:
    """Forget a request left by an earlier, stopped launch (called before workers start)."""
    RunDir(run_dir).stop_request.unlink(missing_ok=True)


def read(run_dir: Path) -> StopRequest | None:
    try:
        data = json.loads(RunDir(run_dir).stop_request.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return StopRequest(str(data["signal"]), bool(data["save"]), float(data["deadline"]))


def save_fits(req: StopRequest, last_save_s: float | None) -> bool:
    """Worth starting a save: asked for, and (when a save was timed) it should end in time."""
    return req.save and (last_save_s is None or last_save_s < req.seconds_left())
