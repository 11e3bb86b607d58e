"""Knowledge distillation: a frozen teacher's softened predictions guide the student.

Per target (a next token, a labelled token, or an example), with temperature T:

    loss = alpha * CE(student, label) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

summed over the batch's targets and normalised by the caller like every other loss. The T^2
keeps the soft term's gradient on the scale of the hard one (Hinton et al., 2015). Teacher and
student read the same token ids, so they must share a vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from launcher.data.tokenized import IGNORE_INDEX
from launcher.recipe.ds_config import zero_stage
from launcher.errors import UserInputError
from launcher.recipe.sections import DistillSection
from launcher.recipe import Recipe


def target_logits(
    logits: torch.Tensor, labels: torch.Tensor, task: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The [targets, classes] logits that predict a real label, and those labels."""
    if task == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    if logits.dim() == 3:
        logits, labels = logits.flatten(0, 1), labels.flatten()
    keep = labels != IGNORE_INDEX
    return logits[keep], labels[keep]


def distill_loss_sum(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """Summed distillation loss over targets: ``student``/``teacher`` are [targets, classes]."""
    student, teacher = student.float(), teacher.float()
    hard = F.cross_entropy(student, labels, reduction="sum")
    soft = F.kl_div(
        F.log_softmax(student / temperature, -1),
        F.log_softmax(teacher / temperature, -1),
        log_target=True,
        reduction="sum",
    )
    return alpha * hard + (1 - alpha) * temperature**2 * soft


def batch_distill_loss(
    student: Any, teacher: torch.nn.Module, batch: dict[str, Any], task: str, cfg: DistillSection
) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    student_logits = student(**inputs).logits
    s, labels = target_logits(student_logits, batch["labels"], task)
    t, _ = target_logits(teacher_logits, batch["labels"], task)
    return distill_loss_sum(s, t, labels, cfg.alpha, cfg.temperature)


def load_teacher(
    recipe: Recipe, ds_config: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> Any:
    """The frozen teacher. Under ZeRO-3 it is partitioned across ranks like the student (built
    under zero.Init, wrapped in a DeepSpeed engine without an optimizer, whose forward gathers
    each layer's weights in turn). ZeRO-1/2 shard only optimizer state and gradients, which a
    teacher has none of, so there each rank holds it whole."""
    from launcher.model.build import auto_model_class, zero3_init_context

    stage3 = zero_stage(ds_config) == 3
    config = teacher_ds_config(ds_config) if stage3 else {}
    with zero3_init_context(config):
        teacher = auto_model_class(recipe.task).from_pretrained(recipe.distill.teacher, dtype=dtype)
        teacher.requires_grad_(False)
        if not stage3:
            return teacher.to(device).eval()
        import deepspeed

        engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


def teacher_ds_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The student's ZeRO-3 settings minus everything about optimisation."""
    config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
    zero = dict(config["zero_optimization"])
    zero.pop("offload_optimizer", None)
    return config | {"zero_optimization": zero}


def held_parameters(teacher: torch.nn.Module) -> dict[str, int]:
    """How many of the teacher's parameters this rank keeps in memory, of how many. Under
    ZeRO-3 that is its partition plus any small parameter DeepSpeed keeps whole everywhere
    (stage3_param_persistence_threshold)."""
    held = total = 0
    for p in teacher.parameters():
        partition = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0
        held += partition + p.data.numel()
        total += getattr(p, "ds_numel", p.numel())
    return {"held_by_rank0": held, "total": total}


def check_teacher(recipe: Recipe, student_config: Any) -> None:
    """Before launch: the teacher loads, shares the student's vocabulary and, for
    classification, its label set."""
    from transformers import AutoConfig

    try:
        teacher = AutoConfig.from_pretrained(recipe.distill.teacher)
    except (OSError, ValueError) as e:
        raise UserInputError("distill.teacher", f"cannot load '{recipe.distill.teacher}': {e}") from None
    ours, theirs = student_config.get_text_config(), teacher.get_text_config()
    if ours.vocab_size != theirs.vocab_size:
        raise UserInputError(
            "distill.teacher",
            f"the teacher's vocabulary has {theirs.vocab_size} tokens, the student's "
            f"{ours.vocab_size}; distillation compares predictions token by token, so both must "
            "use the same tokenizer",
        )
    from launcher.tasks.base import task_for

    task_for(recipe).check_teacher(teacher)
