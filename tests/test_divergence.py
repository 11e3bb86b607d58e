"""The rule of launcher/train/divergence.py: how long a stretch of non-finite losses may run,
that a finite loss ends it, and that a stop request after a non-finite step saves nothing."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from launcher.train.divergence import NonFiniteLoss, NonFiniteLossError
from tests.conftest import ROOT


def run(losses: list[float], patience: int) -> tuple[list[bool], str | None]:
    rule = NonFiniteLoss(patience, total_steps=len(losses))
    saveable = []
    for done, loss in enumerate(losses, start=1):
        saveable.append(rule.observe(done, loss))
        try:
            rule.check(newest_checkpoint=2)
        except NonFiniteLossError as e:
            return saveable, str(e)
    return saveable, None


NAN, INF = math.nan, math.inf


def test_stretches_shorter_than_the_patience_pass():
    saveable, error = run([1.0, NAN, 1.0, INF, -INF, 1.0, 1.0], patience=3)
    assert saveable == [True, False, True, False, False, True, True] and error is None


def test_the_stretch_that_reaches_the_patience_fails_naming_its_steps():
    saveable, error = run([1.0, 1.0, NAN, INF, NAN, 1.0], patience=3)
    assert saveable == [True, True, False, False, False]
    assert error.startswith("the loss was nan at steps 3-5 (train.nonfinite_loss_steps=3)")
    assert "newest committed checkpoint is step 2" in error


@pytest.mark.parametrize("patience", [1, 3])
def test_a_non_finite_last_step_fails_at_once(patience):
    """The export takes the last step: it must not be NaN, however short the stretch."""
    _, error = run([1.0, 1.0, 1.0, INF], patience=patience)
    assert error is not None and "at step 4 " in error and "the loss was inf" in error


STOP_SCRIPT = """
import sys, time
from pathlib import Path
import torch, torch.distributed as dist
from launcher.ranks import Rank
from launcher.run import stop_file
from launcher.train.preempt import PreemptState

run_dir = Path(sys.argv[1])
dist.init_process_group("gloo", init_method=f"file://{run_dir / 'pg'}", rank=0, world_size=1)
rank = Rank(0, 1, 0, torch.device("cpu"))
saved = []
for saveable in (False, True):
    stop_file.request(run_dir, stop_file.StopRequest("SIGTERM", True, time.time() + 600))
    state = PreemptState(2, saved.append)
    state.saveable = saveable
    assert state.stop_here(run_dir, 5, rank)
print("SAVED", saved)
dist.destroy_process_group()
"""


def test_a_stop_request_after_a_non_finite_step_saves_nothing(tmp_path):
    done = subprocess.run([sys.executable, "-c", STOP_SCRIPT, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SIGTERM: no checkpoint at step 5: its loss is not finite" in done.stdout
    assert "SIGTERM: committing a checkpoint at step 5 before stopping" in done.stdout
    assert "SAVED [5]" in done.stdout  # only the stop after a finite step saved


def test_a_run_that_stops_early_on_a_non_finite_step_fails():
    """Early stopping would end the run at a step it may not save, and export its NaN model."""
    rule = NonFiniteLoss(3, total_steps=10)
    rule.observe(4, math.nan)
    rule.check(newest_checkpoint=2)  # one step of three: the run goes on
    with pytest.raises(NonFiniteLossError, match="at step 4 "):
        rule.check(newest_checkpoint=2, ending=True)
