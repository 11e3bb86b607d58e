"""Fault injection for the resilience tests, driven by one environment variable.

``FTLAUNCH_TEST_FAULT=KIND:STEP[:always]`` where KIND is
``crash`` (rank 0 exits when step STEP starts), ``save`` (rank 0 exits while saving the
checkpoint of step STEP, after its shards are written and before the commit marker),
``slow_save`` (rank 0 sleeps at that same point for ``FTLAUNCH_TEST_SLOW_SAVE_S`` seconds,
600 unless set, then the save goes on and commits) or ``hang`` (the last rank stops taking
part in collectives at step STEP) or ``sleep_step`` (the last rank sleeps inside step STEP for
``FTLAUNCH_TEST_SLEEP_S`` seconds, 60 unless set, then the step goes on). STEP is a step
number, or ``N+``: the first step from N on that reaches the point. Each fires once per run directory unless ``always`` is given; when it
fires it writes ``.fault_KIND_STEP`` (STEP as given) into the run directory, holding the step.
``nan_loss:STEP`` makes rank 0's loss NaN in each step that starts at a matching STEP (as
``crash`` counts: ``nan_loss:2`` poisons the third step; ``N+``: every step from there on, a
run that diverges; a single STEP: one bad batch); it writes no marker.
``slow_step:STEP`` (STEP usually ``N+``) makes rank ``FTLAUNCH_TEST_SLOW_RANK`` (the last rank
unless set) sleep ``FTLAUNCH_TEST_SLOW_STEP_S`` seconds (0.3 unless set) at the start of every
matching step, inside its own share of the step: a straggler. It writes no marker.
Unset, this module does nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from launcher.ranks import Rank
from launcher.run.rundir import RunDir

FAULT_ENV = "FTLAUNCH_TEST_FAULT"
SLOW_SAVE_ENV = "FTLAUNCH_TEST_SLOW_SAVE_S"
SLOW_RANK_ENV = "FTLAUNCH_TEST_SLOW_RANK"
SLOW_STEP_ENV = "FTLAUNCH_TEST_SLOW_STEP_S"
SLEEP_ENV = "FTLAUNCH_TEST_SLEEP_S"


def _matches(spec_step: str, step: int) -> bool:
    if spec_step.endswith("+"):
        return step >= int(spec_step[:-1])
    return int(spec_step) == step


def fault_point(kind: str, step: int, run_dir: Path, rank: Rank) -> None:
    spec = os.environ.get(FAULT_ENV, "").split(":")
    if len(spec) < 2 or spec[0] != kind or not _matches(spec[1], step):
        return
    victim = rank.world - 1 if kind in ("hang", "sleep_step") else 0
    if rank.rank != victim:
        return
    marker = RunDir(run_dir).fault_marker(kind, spec[1])
    if marker.exists() and spec[2:] != ["always"]:
        return
    marker.write_text(str(step))
    print(f"[ftlaunch] injected fault '{kind}' at step {step} on rank {rank.rank}", flush=True)
    if kind == "slow_save":
        time.sleep(float(os.environ.get(SLOW_SAVE_ENV, "600")))
        return
    if kind == "sleep_step":
        sleep_in_step(float(os.environ.get(SLEEP_ENV, "60")))
        return
    if kind == "hang":
        time.sleep(10**6)
    os._exit(17)


def slow_step(step: int, rank: Rank) -> None:
    spec = os.environ.get(FAULT_ENV, "").split(":")
    if len(spec) < 2 or spec[0] != "slow_step" or not _matches(spec[1], step):
        return
    if rank.rank == int(os.environ.get(SLOW_RANK_ENV, str(rank.world - 1))):
        time.sleep(float(os.environ.get(SLOW_STEP_ENV, "0.3")))


def nan_loss(loss: torch.Tensor, step: int, rank: Rank) -> torch.Tensor:
    spec = os.environ.get(FAULT_ENV, "").split(":")
    if len(spec) < 2 or spec[0] != "nan_loss" or not _matches(spec[1], step) or rank.rank != 0:
        return loss
    return loss * float("nan")


def sleep_in_step(seconds: float) -> None:
    """The frame a hang dump of the ``sleep_step`` fault names."""
    time.sleep(seconds)
