"""The rule of launcher/train/divergence.py: how long a stretch of non-finite losses may run,
and that a finite loss ends it."""

from __future__ import annotations

import math

import pytest

from launcher.train.divergence import NonFiniteLoss, NonFiniteLossError


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
