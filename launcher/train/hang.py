"""A rank's side of hang diagnosis: a stack dump armed at every step.

At each step boundary the rank re-arms ``faulthandler.dump_traceback_later``: when the next
boundary does not come within ``resources.hang_dump_s`` seconds, faulthandler's own C thread
(it needs neither the GIL nor ptrace, so it also fires while the main thread is stuck inside a
collective) writes the Python stack of every thread of this process to
``RUN_DIR/hang/.rank<r>.live``. The driver (launcher.driver.hang) copies the ranks' dumps of
one event into ``RUN_DIR/hang/<UTC time>/rank<r>.txt`` and says where. The dump fires once
per stalled step; the run goes on.
"""

from __future__ import annotations

import faulthandler
from pathlib import Path
from typing import IO

from launcher.run.rundir import RunDir

def live_path(run_dir: Path, rank: int) -> Path:
    return RunDir(run_dir).hang / f".rank{rank}.live"


class StepWatch:
    """``arm()`` at every step boundary, ``close()`` after the loop; inert when ``seconds``
    is 0 or None."""

    def __init__(self, run_dir: Path, rank: int, seconds: float | None):
        self.seconds = seconds or 0.0
        self._file: IO[str] | None = None
        self._path = live_path(run_dir, rank)
        if self.seconds > 0:
            self._path.parent.mkdir(exist_ok=True)
            self._file = self._path.open("w")

    def arm(self) -> None:
        """Start the countdown afresh, over an empty dump file."""
        if self._file is None:
            return
        faulthandler.cancel_dump_traceback_later()
        self._file.seek(0)
        self._file.truncate()
        faulthandler.dump_traceback_later(self.seconds, repeat=False, file=self._file)

    def close(self) -> None:
        if self._file is None:
            return
        faulthandler.cancel_dump_traceback_later()
        self._file.close()
        self._file = None
        self._path.unlink(missing_ok=True)
