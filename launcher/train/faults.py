"""Fault injection for the resilience tests, driven by one environment variable.

``FTLAUNCH_TEST_FAULT=KIND:STEP[:always]`` where KIND is
``crash`` (rank 0 exits when step STEP starts), ``save`` (rank 0 exits while saving the
checkpoint of step STEP, after its shards are written and before the commit marker) or
``hang`` (the last rank stops taking part in collectives at step STEP). Each fires once per
run directory unless ``always`` is given. Unset, this module does nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from launcher.ranks import Rank
from launcher.run.rundir import RunDir

FAULT_ENV = "FTLAUNCH_TEST_FAULT"


def fault_point(kind: str, step: int, run_dir: Path, rank: Rank) -> None:
    spec = os.environ.get(FAULT_ENV, "").split(":")
    if len(spec) < 2 or spec[0] != kind or int(spec[1]) != step:
        return
    victim = rank.world - 1 if kind == "hang" else 0
    if rank.rank != victim:
        return
    marker = RunDir(run_dir).fault_marker(kind, step)
    if marker.exists() and spec[2:] != ["always"]:
        return
    marker.write_text("fired")
    print(f"[ftlaunch] injected fault '{kind}' at step {step} on rank {rank.rank}", flush=True)
    if kind == "hang":
        time.sleep(10**6)
    os._exit(17)
