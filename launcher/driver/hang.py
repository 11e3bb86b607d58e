"""The driver's side of hang diagnosis: gather the ranks' stack dumps of one event.

Every rank's faulthandler writes to ``RUN_DIR/hang/.rank<r>.live`` when it went
``resources.hang_dump_s`` seconds without a step (launcher.train.hang). This thread notices a
fresh dump, waits until every rank's has come (or ``GATHER_S`` passed), copies them into a new
``RUN_DIR/hang/<UTC time>/rank<r>.txt`` and prints where. On several nodes it sees the dumps
of the ranks whose run directory it shares (all of them on shared storage).
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from launcher.recipe import ResourcesSection
from launcher.run.rundir import RunDir

GATHER_S = 10.0
LIVE = re.compile(r"\.rank(\d+)\.live")


class HangWatcher:
    """Context manager: a daemon thread polling the ranks' dump files every ``interval`` s."""

    def __init__(
        self, run_dir: Path, resources: ResourcesSection, stream: TextIO | None = None,
        interval: float = 1.0,
    ):
        self.dir = RunDir(run_dir).hang
        self.world, self.seconds = resources.num_workers, resources.hang_dump_s or 0.0
        self.stream, self.interval = stream, interval
        self._seen: dict[int, tuple[int, int]] = {}  # rank -> (mtime_ns, size) already handled
        self._first: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ftlaunch-hang", daemon=True)

    def __enter__(self) -> HangWatcher:
        if self.seconds > 0:
            self._seen = {r: sig for r, (_, sig) in self._fresh().items()}  # an earlier run's
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def _fresh(self) -> dict[int, tuple[Path, tuple[int, int]]]:
        """Rank -> (file, signature) of every non-empty dump not handled yet."""
        found = {}
        for path in self.dir.glob(".rank*.live") if self.dir.is_dir() else ():
            match = LIVE.fullmatch(path.name)
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            sig = (stat.st_mtime_ns, stat.st_size)
            if match and stat.st_size > 0 and self._seen.get(int(match.group(1))) != sig:
                found[int(match.group(1))] = (path, sig)
        return found

    def poll(self) -> Path | None:
        """Write the event's directory once every rank's dump came or GATHER_S passed."""
        fresh = self._fresh()
        if not fresh:
            return None
        now = time.monotonic()
        self._first = self._first or now
        if len(fresh) < self.world and now - self._first < GATHER_S:
            return None
        time.sleep(min(self.interval, 0.5))  # let a dump being written finish
        out = self._event_dir()
        for rank, (path, sig) in sorted(self._fresh().items()):
            (out / f"rank{rank}.txt").write_bytes(path.read_bytes())
            self._seen[rank] = sig
        self._first = None
        missing = sorted(set(range(self.world)) - {int(p.stem[4:]) for p in out.glob("rank*.txt")})
        note = f" (none from rank(s) {', '.join(map(str, missing))})" if missing else ""
        stream = self.stream or sys.stderr
        stream.write(f"[ftlaunch] no step for {self.seconds:g} s: stacks of every rank in {out}/{note}\n")
        stream.flush()
        return out

    def _event_dir(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        out, n = self.dir / stamp, 1
        while out.exists():  # two events in one second: never reuse a directory
            n += 1
            out = self.dir / f"{stamp}-{n}"
        out.mkdir(parents=True)
        return out
