"""The launch's Ray connection, held by a thread of its own from ``ray.init`` to
``ray.shutdown``.

Why a thread: an embedded Ray's node processes (GCS, raylet, dashboard) are started with
``PR_SET_PDEATHSIG``, which Linux ties to the *thread* that forked them, so the thread that
runs ``ray.init`` must outlive the run. Holding the connection there lets ``close`` return
at once: ``ray.shutdown`` spends ~1 s waiting for those processes to exit, which then
overlaps the export of ``final/`` instead of preceding it. Started off the main thread,
``ray.init`` does not put its exit-15 SIGTERM handler over the driver's for the start-up;
the connected core worker still installs a C++ one that aborts, so the caller reclaims
SIGTERM after ``wait`` (``stop.Signals.reclaim``).
"""

from __future__ import annotations

import threading
from typing import Any

from launcher.driver import orchestrate
from launcher.recipe.run_sections import ResourcesSection


class RaySession:
    """``open`` starts connecting (to ``address`` / RAY_ADDRESS, or an embedded local Ray),
    ``wait`` returns once connected, ``close`` asks for ``ray.shutdown`` and returns at once;
    leaving the ``with`` block waits for that shutdown."""

    def __init__(self, address: str | None, res: ResourcesSection):
        self._address, self._res = address, res
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.here = False  # connected here, so this session shuts Ray down

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
        if self._thread is not None:
            self._thread.join()

    def open(self) -> None:
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

    def close(self) -> None:
        self._closing.set()

    def _hold(self) -> None:
        try:
            self.here = orchestrate.connect(self._address, self._res)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by wait()
            self._error = e
            return
        finally:
            self._connected.set()
        self._closing.wait()
        if self.here:
            import ray

            ray.shutdown()
