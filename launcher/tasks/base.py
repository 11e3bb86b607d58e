"""The task seam: everything that differs between what is trained, behind one object.

``task_for(recipe)`` is built once (on the driver by prepare, on every rank by the worker);
nothing outside launcher/tasks/ asks which task a recipe trains. What each task is called by
transformers and peft, and which data formats it reads, is its entry in
``launcher.recipe.schema.TASKS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from launcher.data.batch import Batches
from launcher.data.tokenized import TokenizedSplit
from launcher.model.build import load_model_config
from launcher.model.losses import LossConfig
from launcher.ranks import Rank
from launcher.recipe.sections import DistillSection
from launcher.recipe.run_sections import EvalSection
from launcher.recipe import Recipe


@dataclass(frozen=True)
class Objective:
    """What a micro batch contributes: its summed loss, and the targets it is normalised by."""

    loss_sum: Callable[[Any, dict[str, Any]], torch.Tensor]
    targets: Callable[[dict[str, torch.Tensor]], int]


@dataclass(frozen=True)
class EvalContext:
    """What an evaluation reads besides the model: the validation batches and split, this
    rank, the micro batch size, and whether ZeRO-3 partitions the weights (generation must
    then keep every rank in step)."""

    batches: Batches
    split: TokenizedSplit
    rank: Rank
    micro: int
    pad_id: int
    stage3: bool


class Task(Protocol):
    name: str

    def configure(self, config: Any, pad_token_id: int) -> Any:
        """The model config with the task's head settings applied."""

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """Modules of a new head, trained in full beside any adapter (none for causal_lm)."""

    def pads_left(self, method: str, model_type: str) -> bool:
        """Whether batches pad on the left for this method and architecture."""

    def objective(self, loss: LossConfig) -> Objective:
        """The training loss of a micro batch and the targets it is normalised by."""

    def distill_objective(self, teacher: torch.nn.Module, cfg: DistillSection) -> Objective:
        """The loss of method: distill against a frozen ``teacher``."""

    def evaluate(self, engine: Any, ctx: EvalContext, cfg: EvalSection) -> dict[str, float]:
        """The eval_* metrics over the whole validation split (a collective)."""

    def reported_metrics(self, cfg: EvalSection) -> set[str]:
        """The eval_* metrics :meth:`evaluate` reports (to check early stopping early)."""

    def check_teacher(self, teacher_config: Any) -> None:
        """Refuse a distillation teacher whose head does not match this task's."""


def task_for(recipe: Recipe) -> Task:
    """The recipe's task."""
    from launcher.tasks import causal_lm, classification

    if recipe.task == "causal_lm":
        return causal_lm.CausalLM(recipe.method)
    return classification.Classification(recipe.task, recipe.method, recipe.labels)


def load_task_config(recipe: Recipe, pad_token_id: int) -> Any:
    """The model config with the task's head settings (labels, problem type) applied."""
    return task_for(recipe).configure(load_model_config(recipe.model), pad_token_id)
