"""Positive evidence that a driver owns a run directory, and the outcome it recorded.

While ``ftlaunch train`` runs, its driver holds an exclusive ``flock`` on ``RUN_DIR/driver.lock``
(which names its pid, host and start time). The kernel drops the lock when the process dies,
however it dies (``kill -9`` included), so "a lock file nobody holds" means the last driver is
gone. A driver that ends in a training or export failure writes ``driver_failed.json`` first;
a new driver on the same directory removes it when it takes the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.durable import write_atomic
from launcher.errors import UserInputError

LOCK = "driver.lock"
FAILED = "driver_failed.json"
CLAIM_WAIT_S = 2.0  # a reader (``ftlaunch runs``) holds the lock for microseconds


class Driver:
    """The driver's side: ``claim()`` once the run directory exists; on leaving the block the
    lock is released, after recording a failure when the block raised one."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._fd: int | None = None

    def __enter__(self) -> Driver:
        return self

    def claim(self) -> None:
        fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + CLAIM_WAIT_S
        while not _try_lock(fd, fcntl.LOCK_EX):
            if time.monotonic() > deadline:
                holder = _read_json(self.run_dir / LOCK) or {}
                os.close(fd)
                raise UserInputError(
                    str(self.run_dir / LOCK),
                    f"another ftlaunch driver runs this directory (pid {holder.get('pid')} on "
                    f"{holder.get('host')}); wait for it or stop it first",
                )
            time.sleep(0.05)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        (self.run_dir / FAILED).unlink(missing_ok=True)
        self._fd = fd

    def fail(self, reason: str) -> None:
        """Record that this launch ended in a failure (only once the directory is claimed)."""
        if self._fd is None:
            return
        try:
            write_atomic(self.run_dir / FAILED, json.dumps({"reason": reason, "time": time.time()}))
        except OSError as e:  # e.g. the disk that failed the run is full: say so, go on failing
            print(f"ftlaunch: could not record the failure in {self.run_dir}: {e}",
                  file=sys.stderr)

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> None:
        if error is not None and isinstance(error, Exception):
            self.fail(f"{type(error).__name__}: {error}")
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


@dataclass(frozen=True)
class Liveness:
    held: bool  # a live driver holds the lock now
    driver: dict[str, Any] | None  # what the newest driver wrote: pid, host, started
    failure: dict[str, Any] | None  # what a failed driver recorded


def probe(run_dir: Path) -> Liveness:
    """Whether a driver holds ``run_dir`` now, without disturbing it."""
    path = run_dir / LOCK
    held = False
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        fd = None
    if fd is not None:
        try:
            held = not _try_lock(fd, fcntl.LOCK_SH)
        finally:
            os.close(fd)  # also drops the shared lock taken just now
    return Liveness(held, _read_json(path), _read_json(run_dir / FAILED))


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
