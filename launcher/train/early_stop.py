"""Early stopping and the best checkpoint, as pure functions of the evaluation history.

The history is the run's own ``metrics.jsonl`` (cut back to the resumed step on a resume), so
a restarted run makes the same decisions as an uninterrupted one without extra state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from launcher.recipe.run_sections import EarlyStoppingSection


@dataclass(frozen=True)
class Verdict:
    best_step: int | None
    best_value: float | None
    stale: int  # evaluations since the best one
    improved: bool  # the newest evaluation is the best so far
    stop: bool


def better(value: float, best: float | None, cfg: EarlyStoppingSection) -> bool:
    if best is None:
        return not math.isnan(value)
    if cfg.mode == "max":
        return value > best + cfg.min_delta
    return value < best - cfg.min_delta


def judge(history: Sequence[tuple[int, float]], cfg: EarlyStoppingSection) -> Verdict:
    """Stop once ``patience`` evaluations in a row have not improved on the best one."""
    best_step, best_value, stale, improved = None, None, 0, False
    for step, value in history:
        improved = better(value, best_value, cfg)
        if improved:
            best_step, best_value, stale = step, value, 0
        else:
            stale += 1
    return Verdict(best_step, best_value, stale, improved, stale >= cfg.patience)


def history_from(records: Sequence[dict], metric: str, upto: int) -> list[tuple[int, float]]:
    """(step, value) of every evaluation after training began (step 0 has no checkpoint to
    keep), up to and including step ``upto``."""
    return [
        (r["step"], float(r[metric])) for r in records if metric in r and 0 < r["step"] <= upto
    ]


def observe(
    history: Sequence[tuple[int, float]], cfg: EarlyStoppingSection, step: int, record: dict
) -> tuple[list[tuple[int, float]], Verdict]:
    """The history with this evaluation added, and the verdict on it."""
    extended = [*history, (step, float(record[cfg.metric]))]
    return extended, judge(extended, cfg)


def stop_message(step: int, cfg: EarlyStoppingSection, verdict: Verdict) -> str:
    return (
        f"early stopping at step {step}: {cfg.metric} has not improved for {verdict.stale} "
        f"evaluations (best {verdict.best_value:.4g} at step {verdict.best_step})"
    )
