"""The launch's Ray connection, held by a thread of its own from ``ray.init`` to
``ray.shutdown``, so that Ray starts while the driver validates the recipe.

Why a thread: ``ray.init`` takes seconds (an embedded Ray starts its GCS, raylet and
dashboard), nearly all of it waiting on those processes, while the driver's validation is
seconds of importing transformers; run side by side they overlap. The thread must outlive the
run: an embedded Ray's node processes are started with ``PR_SET_PDEATHSIG``, which Linux ties
to the *thread* that forked them. Holding the connection there also lets ``close`` return at
once: ``ray.shutdown`` spends ~1 s waiting for those processes to exit, which then overlaps the
export of ``final/``.

A launch that fails while Ray is still starting (a recipe error found by the validation, a
Ctrl-C) does not wait for it: the error is reported at once, the thread shuts Ray down as
soon as it is up, and the command waits for that (:func:`settle`) before it returns.

Off the main thread ``ray.init`` does not put its exit-15 SIGTERM handler over the driver's;
the connected core worker still installs a C++ failure handler on SIGTERM, which this thread
takes off again as soon as ``ray.init`` returns (:func:`kept_sigterm`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from launcher.driver import orchestrate
from launcher.recipe.run_sections import ResourcesSection

_unsettled: list[threading.Thread] = []  # sessions left while Ray was still starting


def settle() -> None:
    """Wait until every session left unfinished by a failed launch has shut its Ray down
    (a second Ctrl-C gives up waiting: the node processes die with this process)."""
    try:
        while _unsettled:
            _unsettled[0].join()
            _unsettled.pop(0)
    except KeyboardInterrupt:
        pass


class RaySession:
    """``open`` starts connecting (to ``address`` / RAY_ADDRESS, or an embedded local Ray),
    ``wait`` returns once connected, ``close`` asks for ``ray.shutdown`` and returns at once;
    leaving the ``with`` block waits for that shutdown, unless the block raised: then the
    shutdown is left to the thread and :func:`settle`."""

    def __init__(self, address: str | None, res: ResourcesSection):
        self._address, self._res = address, res
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.here = False  # connected here, so this session shuts Ray down

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> None:
        self.close()
        if self._thread is None:
            return
        if error is not None:
            _unsettled.append(self._thread)
            return
        self._thread.join()

    def open(self) -> None:
        settle()  # an earlier launch in this process may still be shutting its Ray down
        import ray

        if self._thread is not None or ray.is_initialized():
            return  # already connected, by this session or by the caller
        self._thread = threading.Thread(target=self._hold, name="ftlaunch-ray", daemon=True)
        self._thread.start()

    def wait(self) -> bool:
        """Block until connected; True if connected here. Re-raises what ``ray.init`` raised."""
        self.open()
        if self._thread is None:
            return False
        self._connected.wait()
        if self._error is not None:
            raise self._error
        return self.here

    def describe(self) -> str:
        """The Ray this session is connected to, in a line for driver.log (Ray's own
        start-up lines are muted)."""
        import ray

        gcs = ray.get_runtime_context().gcs_address
        if not self.here:
            return f"Ray connected before the launch: GCS at {gcs}"
        where = self._address or os.environ.get("RAY_ADDRESS")
        return f"Ray {f'joined at {where}' if where else 'started on this machine'}: GCS at {gcs}"

    def close(self) -> None:
        with self._lock:
            self._closing.set()

    def _hold(self) -> None:
        ray_logger = logging.getLogger("ray")
        level = ray_logger.level
        try:
            with kept_sigterm():
                # ERROR while Ray starts: its start-up lines would reach the terminal after
                # the error of a launch that failed meanwhile, or be printed with it
                self.here = orchestrate.connect(self._address, self._res, logging.ERROR)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by wait()
            self._error = e
            ray_logger.setLevel(level)
            return
        finally:
            self._connected.set()
        with self._lock:
            if self.here and not self._closing.is_set():
                ray_logger.setLevel(level)  # Ray's messages from now on go to the run log
        self._closing.wait()
        if self.here:
            import ray

            ray.shutdown()
            ray_logger.setLevel(level)


@contextmanager
def kept_sigterm() -> Iterator[None]:
    """SIGTERM's action after the body is the one Python's ``signal`` module believes in.

    ``signal.signal`` works on the main thread only, and the main thread is busy validating
    while this one connects; ``sigaction`` is process-wide and callable from any thread. When
    Python holds a handler of its own, the action read before the body (Python's C-level
    trampoline, copied as an opaque buffer, no struct layout assumed) is written back; when
    Python's handler became the default or ignore meanwhile, that is set. Linux only: elsewhere
    the launch takes SIGTERM back on the main thread after ``wait`` (``Signals.reclaim``)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sigaction.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.signal.restype = ctypes.c_void_p
    before = signal.getsignal(signal.SIGTERM)
    saved = ctypes.create_string_buffer(SIGACTION_BYTES)
    if libc.sigaction(signal.SIGTERM, None, saved) != 0:
        raise OSError(ctypes.get_errno(), "sigaction(SIGTERM) could not be read")
    try:
        yield
    finally:
        now = signal.getsignal(signal.SIGTERM)
        if now in (signal.SIG_DFL, signal.SIG_IGN):
            libc.signal(signal.SIGTERM, int(now))
        elif callable(now) and callable(before):
            libc.sigaction(signal.SIGTERM, saved, None)


SIGACTION_BYTES = 1024  # more than any libc's struct sigaction (glibc x86-64: 152)
