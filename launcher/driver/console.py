"""What reaches the terminal during a run, and what goes to RUN_DIR/driver.log instead.

The terminal is for people: ftlaunch's own ``[ftlaunch]`` lines (each once), its errors and
final messages, and the progress view. Everything else the run prints (Ray's start-up and
Train controller messages, the core worker's log lines, DeepSpeed's set-up, library warnings
raised in the driver or in a worker, the workers' full output) goes to ``driver.log`` in the
run directory, so nothing is lost:

* Python warnings and the ``ray``/``DeepSpeed`` loggers of the driver are handled by one
  handler that holds its records until the run directory is written (``attach``), then appends
  them to driver.log; a launch that stops before that (bad input) prints them on exit instead.
* On Ray, the workers' streamed output (``log_to_driver``) goes to driver.log, and only the
  ``[ftlaunch]`` lines to the terminal; the workers' print patch of Ray Train, which printed
  each line a second time, is switched off (``WORKER_ENV``).
* Under torchrun the workers write into driver.log and the driver relays their ``[ftlaunch]``
  lines (``Relay``).

Lines for the terminal go through ``say``, which the rich live view redirects above itself.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from launcher.run.rundir import RunDir

PREFIX = "[ftlaunch]"
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
ROUTED_LOGGERS = ("py.warnings", "ray", "DeepSpeed")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_printer: Callable[[str], None] | None = None
_lock = threading.Lock()


def say(line: str) -> None:
    """Print one line for people: above the live view when one is drawn, else on stderr."""
    with _lock:
        if _printer is not None:
            _printer(line)
            return
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def set_printer(printer: Callable[[str], None] | None) -> None:
    global _printer
    with _lock:
        _printer = printer


class RunLog(logging.Handler):
    """Holds records (and raw lines) until ``open``, then appends them to driver.log."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT))
        self._held: list[str] = []
        self._file: Any = None
        self.path: Path | None = None
        self.on_close: list[Callable[[], None]] = []
        self.saved: dict[str, tuple[list[logging.Handler], bool]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.write(self.format(record))

    def write(self, text: str) -> None:
        with _lock:
            if self._file is None:
                self._held.append(text)
                return
            self._file.write(text.rstrip("\n") + "\n")
            self._file.flush()

    def open(self, path: Path) -> None:
        with _lock:
            if self._file is not None:
                return
            self.path, self._file = path, path.open("a", buffering=1)
            for text in self._held:
                self._file.write(text.rstrip("\n") + "\n")
            self._held.clear()

    def print_held(self) -> None:
        """Print what is still held (the run directory was never written: nothing may be
        lost), before a launch's last words rather than after them."""
        with _lock:
            held, self._held = self._held, []
            for text in held:
                sys.stderr.write(text.rstrip("\n") + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        for callback in self.on_close:
            callback()
        self.on_close.clear()
        with _lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        self.print_held()
        super().close()


_current: RunLog | None = None


class _Divert(logging.Filter):
    """On a logger: its records go to the run log and to none of its handlers, even those a
    library adds later (DeepSpeed adds a stdout handler when it is first imported)."""

    def __init__(self, log: RunLog):
        super().__init__()
        self.log = log

    def filter(self, record: logging.LogRecord) -> bool:
        self.log.handle(record)
        return False


@contextmanager
def routed() -> Iterator[RunLog]:
    """For one launch: library warnings and Ray's and DeepSpeed's driver loggers go to the run
    log rather than the terminal; all is put back as it was on exit. Cheap to enter (it imports
    nothing), so the launch routes before it starts Ray; :func:`no_progress_bars` is the part
    that needs transformers."""
    global _current
    log = RunLog()
    divert = _Divert(log)
    logging.captureWarnings(True)
    _take(log)
    for name in ROUTED_LOGGERS:
        logging.getLogger(name).addFilter(divert)
    _current = log
    try:
        yield log
    finally:
        _current = None
        logging.captureWarnings(False)
        for name, (handlers, propagate) in log.saved.items():
            logger = logging.getLogger(name)
            logger.removeFilter(divert)
            logger.handlers, logger.propagate = handlers, propagate
        log.close()


def _take(log: RunLog) -> None:
    """The routed loggers' handlers become the run log alone (records of child loggers, such
    as ray._private.worker, reach the handlers, not the filter); the handlers found are kept
    for the restore, those added since the last call too."""
    for name in ROUTED_LOGGERS:
        logger = logging.getLogger(name)
        handlers, propagate = log.saved.setdefault(name, ([], logger.propagate))
        handlers += [h for h in logger.handlers if h is not log and h not in handlers]
        logger.handlers, logger.propagate = [log], False


def reroute() -> None:
    """Call after importing ray (which gives the ``ray`` logger a stderr handler) and before
    ``ray.init``, so that Ray's start-up messages go to the run log too."""
    if _current is not None:
        _take(_current)


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' tqdm bars (loading and writing shards at the export) off while the body
    runs, as they were afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def attach(run_dir: Path) -> Path:
    """Start writing driver.log (the run directory exists now); returns its path."""
    path = RunDir(run_dir).driver_log
    if _current is not None:
        _current.open(path)
    return path


def log_line(text: str) -> None:
    """One line into driver.log (or stderr when no launch is routed)."""
    if _current is not None:
        _current.write(text)
    else:
        say(text)


def is_ours(line: str) -> bool:
    return line.lstrip().startswith(PREFIX)


# ---------------------------------------------------------------- the workers' output

ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception)(: |$)")
# torchrun prefixes each line a worker writes to stderr with its rank: "[rank1]: ..."
RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s?")


def _ray_printer(data: dict[str, Any]) -> None:
    """Ray's ``log_to_driver`` handler, replaced: every line to driver.log, ours to people."""
    who = data.get("actor_name") or data.get("task_name") or ""
    tag = f"({who} pid={data.get('pid')}, ip={data.get('ip')})".replace("( ", "(")
    for line in data.get("lines", []):
        log_line(f"{tag} {line}")
        if is_ours(line):
            say(line.strip())


def route_ray_workers() -> None:
    """From now until the launch ends, the workers' streamed output goes through
    ``_ray_printer`` (nothing changes when Ray does not stream it: log_to_driver off)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    with dispatcher._lock:
        saved = dict(dispatcher.handlers)
        if "ray_print_logs" not in saved or saved["ray_print_logs"] is _ray_printer:
            return
        dispatcher.handlers = [
            (n, _ray_printer if n == "ray_print_logs" else h) for n, h in dispatcher.handlers
        ]
    original = saved["ray_print_logs"]

    def restore() -> None:
        with dispatcher._lock:
            dispatcher.handlers = [
                (n, original if h is _ray_printer else h) for n, h in dispatcher.handlers
            ]

    if _current is not None:
        _current.on_close.append(restore)
    else:
        restore()


class Relay:
    """Tails the file torchrun's workers write (driver.log) and says their ``[ftlaunch]``
    lines; keeps the last error lines for the failure message."""

    def __init__(self, path: Path, keep: int = 5):
        self.path = path
        self._offset = path.stat().st_size if path.exists() else 0
        self.keep = keep
        self.errors: list[str] = []

    def poll(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            line = RANK_PREFIX.sub("", line.strip())
            if is_ours(line):
                say(line)
            elif ERROR_LINE.match(line) and line not in self.errors:  # each rank raises it
                self.errors = [*self.errors, line][-self.keep:]
