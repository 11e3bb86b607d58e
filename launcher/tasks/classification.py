"""Sequence and token classification: the model head's config, the loss, padding, and the
task object (evaluation in classification_eval.py, the data formats in launcher/data/labels.py)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from launcher.data.tokenized import IGNORE_INDEX
from launcher.model.build import head_module_names
from launcher.recipe.sections import LabelsSection

HF_PROBLEM_TYPES = {
    "single_label": "single_label_classification",
    "multi_label": "multi_label_classification",
    "regression": "regression",
}


# ---------------------------------------------------------------- model config and loss


def configure_labels(config: Any, task: str, labels: LabelsSection, pad_token_id: int) -> Any:
    """Give a model config its head: label count, id2label/label2id and problem type."""
    names = labels.names or ["score"]
    config.num_labels = labels.num_labels if labels.problem_type != "regression" else 1
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}
    if task == "sequence_classification":
        config.problem_type = HF_PROBLEM_TYPES[labels.problem_type]
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = pad_token_id  # sequence classification finds the last real token
    return config


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    """Summed loss over a batch's targets (the caller normalises by :func:`target_count`)."""
    logits = logits.float()
    if problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum")
    if problem_type == "multi_label":
        return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum")
    return F.cross_entropy(
        logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def target_count(labels: torch.Tensor, problem_type: str) -> int:
    """Targets a batch's loss is summed over: labelled examples or tokens, or, for multi_label,
    every (example, class) pair, so the mean is per binary decision as in BCE."""
    if problem_type == "single_label":
        return int((labels != IGNORE_INDEX).sum())
    return labels.numel()


def model_logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The model's logits; token-level ones only at the input's positions (prompt tuning
    prepends virtual tokens, whose outputs are no prediction)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return logits[:, -batch["input_ids"].shape[1] :] if logits.dim() == 3 else logits


def batch_loss_sum(model: Any, batch: dict[str, Any], problem_type: str) -> torch.Tensor:
    return loss_sum(model_logits(model, batch), batch["labels"], problem_type)


def pads_left(task: str, method: str, model_type: str) -> bool:
    """Whether batches pad on the left. A decoder classifier scores its last non-padding token,
    which it finds from input_ids; under prompt tuning peft gives it embeddings (the virtual
    tokens prepended) instead, so it scores the last position, which must then be a real token.
    Encoders (architectures with a masked-LM head) pool the first position and keep right
    padding, as their absolute position embeddings need."""
    if task != "sequence_classification" or method != "prompt_tuning":
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


class Classification:
    """sequence_classification (one label, several, or a number per example) and
    token_classification (one tag per word)."""

    def __init__(self, name: str, method: str, labels: LabelsSection):
        self.name, self.method, self.labels = name, method, labels
        self.problem = labels.problem_type

    def configure(self, config: Any, pad_token_id: int) -> Any:
        return configure_labels(config, self.name, self.labels, pad_token_id)

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        return head_module_names(model)

    def pads_left(self, method: str, model_type: str) -> bool:
        return pads_left(self.name, method, model_type)

    def objective(self, loss: Any) -> Any:
        from launcher.tasks.base import Objective

        return Objective(
            lambda engine, batch: batch_loss_sum(engine, batch, self.problem),
            lambda batch: target_count(batch["labels"], self.problem),
        )

    def distill_objective(self, teacher: torch.nn.Module, cfg: Any) -> Any:
        from launcher.tasks import distill
        from launcher.tasks.base import Objective

        return Objective(
            lambda engine, batch: distill.batch_distill_loss(engine, teacher, batch, self.name, cfg),
            lambda batch: target_count(batch["labels"], "single_label"),
        )

    def evaluate(self, engine: Any, ctx: Any, cfg: Any) -> dict[str, float]:
        from launcher.tasks import classification_eval

        return classification_eval.evaluate(
            engine, lambda ix: ctx.batches.make(ix, ctx.rank.device), ctx.split, ctx.rank,
            ctx.micro, cfg.max_batches, self.name, self.labels,
        )

    def reported_metrics(self, cfg: Any) -> set[str]:
        common = {"eval_loss", "eval_accuracy", "eval_precision", "eval_recall", "eval_f1"}
        if self.name == "token_classification":
            return common
        if self.problem == "regression":
            return {"eval_loss", "eval_mse", "eval_pearson", "eval_spearman"}
        if self.problem == "multi_label":
            return common | {"eval_f1_macro"}
        two = self.labels.num_labels == 2
        return common | {"eval_mcc"} | ({"eval_roc_auc"} if two else {"eval_f1_micro"})

    def check_teacher(self, teacher_config: Any) -> None:
        from launcher.errors import UserInputError

        names = [teacher_config.id2label[i] for i in sorted(teacher_config.id2label)]
        if names != self.labels.names:
            raise UserInputError(
                "distill.teacher",
                f"the teacher's labels {names} differ from labels.names {self.labels.names}",
            )
