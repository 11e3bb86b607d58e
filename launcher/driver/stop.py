"""Stopping a run on request, the driver's side: signals become a stop request file
(launcher.run.stop_file) that the workers obey (launcher.train.preempt).

On SIGINT or SIGTERM the driver writes ``STOP.json`` into the run directory. Every rank
checks it at each step boundary (rank 0 reads it, one all-reduce tells the others), so all
ranks leave the loop at the same step; asked to (``checkpoint.on_preempt``), they first commit
a checkpoint of that step when the last save suggests one fits in the time left. The driver
waits for the workers until the request's deadline, then kills what is still running. A second
signal means "stop now": the driver kills the workers at once, without waiting for a save in
progress (which is then never committed, so resume skips it), and exits 128 + that signal.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from launcher.run.stop_file import StopRequest, clear, request  # noqa: F401  (clear: the CLI's)

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same arguments, from the same directory."""
    import os
    import shlex

    return f"cd {shlex.quote(os.getcwd())} && ftlaunch {shlex.join(argv)}"


class Signals:
    """The driver's SIGINT/SIGTERM handling while workers run. The first signal writes the
    stop request; a second one (or the deadline) means: kill now."""

    def __init__(self, run_dir: Path, save_on_stop: bool, grace_s: float):
        self.run_dir = run_dir
        self.save_on_stop = save_on_stop
        self.grace_s = grace_s
        self.first: signal.Signals | None = None
        self.second: signal.Signals | None = None
        self.deadline = float("inf")
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        for sig in EXIT_CODES:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def reclaim(self) -> None:
        """Install the handlers again: Ray's core worker, once connected, puts a C++ failure
        handler on SIGTERM. On Linux the Ray session's thread has already taken it off
        (``ray_session.kept_sigterm``); elsewhere this is what does."""
        for sig in EXIT_CODES:
            signal.signal(sig, self._handle)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        if self.first is not None:
            if self.second is None:
                self.second = sig
                self.deadline = 0.0
                print(f"[ftlaunch] {sig.name} again: stopping the workers now, without "
                      "waiting for a save", file=sys.stderr)
            return
        self.first = sig
        save = self.save_on_stop
        self.deadline = time.time() + self.grace_s
        if self.run_dir.is_dir():  # else no worker runs yet; the launch checks ``stopping``
            request(self.run_dir, StopRequest(sig.name, save, self.deadline))
        what = "committing a checkpoint and stopping" if save else "stopping"
        print(
            f"[ftlaunch] {sig.name}: {what} at the next step boundary (at most "
            f"{self.grace_s:g} s; send it again to stop at once)", file=sys.stderr,
        )

    @property
    def stopping(self) -> bool:
        return self.first is not None

    def expired(self) -> bool:
        return time.time() >= self.deadline

    def how(self) -> str:
        """How the stop went, for the driver's last message."""
        assert self.first is not None
        if self.second is not None:
            return (f"stopped at once by a second signal ({self.first.name}, then "
                    f"{self.second.name}); a save in progress was dropped")
        if self.expired():
            return (f"stopped by {self.first.name}; the grace period ran out "
                    f"(checkpoint.preempt_grace_s={self.grace_s:g} s)")
        return f"stopped by {self.first.name}"

    def exit_code(self) -> int:
        """128 + the number of the signal that ended the run: the second one, if any."""
        last = self.second or self.first
        return EXIT_CODES[last] if last is not None else 0


class Terminated(BaseException):
    """SIGTERM outside the training phase (like KeyboardInterrupt for SIGINT)."""


STOP_EXCEPTIONS: dict[signal.Signals, type[BaseException]] = {
    signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated,
}
_received: list[signal.Signals] = []


def signal_received() -> signal.Signals | None:
    """The first SIGINT or SIGTERM that arrived while :func:`signals_raise` was active."""
    return _received[0] if _received else None


def raise_if_received() -> None:
    """Raise the stop again if a signal arrived under :func:`signals_raise` and the command
    went on: code that catches ``BaseException`` without re-raising (a library's, or a
    model's remote code run by the validation) swallows the exception, never the stop."""
    if _received:
        raise STOP_EXCEPTIONS[_received[0]]()


@contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into KeyboardInterrupt and :class:`Terminated` while the body
    runs (main thread only), so ``finally`` blocks run and the CLI can exit 130/143 with a
    message instead of dying silently. The signal is remembered (:func:`signal_received`):
    a library whose clean-up raises something else on the way out (a ``multiprocessing``
    pool's result wait raising a timeout) must not turn a stop into a crash. The tokenizer's
    processes set their own handlers (``data/forked.py``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()  # a stop belongs to one command: a later one in this process starts clean

    def handler(signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        _received.append(sig)
        raise STOP_EXCEPTIONS[sig]()

    previous = {sig: signal.signal(sig, handler) for sig in STOP_EXCEPTIONS}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)
