"""Learning-rate schedule: linear warmup, then cosine, linear or constant to a floor."""

from __future__ import annotations

import math
from collections.abc import Callable

from launcher.recipe.run_sections import TrainSection


def warmup_steps(train: TrainSection, total: int) -> int:
    if train.warmup_steps is not None:
        return min(train.warmup_steps, total)
    return int(train.warmup_ratio * total)


def lr_lambda(train: TrainSection, total: int) -> Callable[[int], float]:
    """Multiplier of train.lr at optimizer step ``step`` (0-based, as LambdaLR counts)."""
    warm = warmup_steps(train, total)
    floor = train.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if train.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if train.lr_schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
