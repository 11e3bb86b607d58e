"""A loss that is NaN or infinite: such a step is never checkpointed, and the run fails as
diverged once the loss stays so for ``train.nonfinite_loss_steps`` steps (or at the last step,
which the export would take).

DeepSpeed skips the update of a step whose gradients overflow in fp16, and in fp32 when the
gradient norm is not finite; in bf16 it applies it (``check_grad_overflow`` is off by
default) and the weights become NaN. The loss tells both apart: after one bad batch it is
finite again, a diverged model's stays NaN. Without this a diverged run would go on
committing NaN checkpoints until ``checkpoint.keep_last`` had removed every good one. The
loss is all-reduced, so every rank decides the same."""

from __future__ import annotations

import math


class NonFiniteLossError(RuntimeError):
    """The run diverged: its loss stayed NaN or infinite."""


class NonFiniteLoss:
    """The current stretch of steps whose loss is not finite."""

    def __init__(self, patience: int, total_steps: int):
        self.patience, self.total_steps = patience, total_steps
        self.first: int | None = None
        self.done = 0
        self.loss = 0.0

    def observe(self, done: int, loss: float) -> bool:
        """Step ``done`` ended with ``loss``; True if it is finite (so it may be saved)."""
        self.done, self.loss = done, loss
        if math.isfinite(loss):
            self.first = None
            return True
        if self.first is None:
            self.first = done
        return False

    def check(self, newest_checkpoint: int, ending: bool = False) -> None:
        """Raise NonFiniteLossError when the stretch is ``patience`` steps long, or reaches
        the last step, or the run ends here anyway (``ending``: early stopping)."""
        if self.first is None:
            return
        count = self.done - self.first + 1
        if count < self.patience and self.done < self.total_steps and not ending:
            return
        steps = f"step {self.first}" if count == 1 else f"steps {self.first}-{self.done}"
        newest = f"step {newest_checkpoint}" if newest_checkpoint else "none yet"
        raise NonFiniteLossError(
            f"the loss was {self.loss} at {steps} (train.nonfinite_loss_steps="
            f"{self.patience}): the run diverged. None of those steps was checkpointed; the "
            f"newest committed checkpoint is {newest}. Lower train.lr, keep "
            "train.max_grad_norm set, or look at the data of those steps"
        )
