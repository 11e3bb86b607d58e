"""Which fused kernels and which loss implementation a run uses, decided once from the recipe
and this machine; and applying Liger's kernels to a model through Liger's public API."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch

from launcher.errors import UserInputError
from launcher.model.losses import LossConfig
from launcher.recipe.sections import LoraSection, ModelSection

KernelChoice = Literal["liger", "none"]
# Everything but the loss: the loss is computed by launcher.model.losses on the model's hidden
# states, which keeps the model's own forward (and ZeRO-3's hooks) untouched.
LIGER_OPTIONS = {
    "rope": True,
    "rms_norm": True,
    "swiglu": True,
    "cross_entropy": False,
    "fused_linear_cross_entropy": False,
}


@dataclass(frozen=True)
class KernelPlan:
    kernels: KernelChoice
    loss: LossConfig


def liger_families() -> frozenset[str]:
    """Model types liger-kernel has kernels for; empty when it is not installed."""
    if importlib.util.find_spec("liger_kernel") is None:
        return frozenset()
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def liger_obstacle(model_type: str, on_gpu: bool) -> str | None:
    """Why Liger kernels cannot run here, or None when they can."""
    if not on_gpu or not torch.cuda.is_available():
        return "Liger kernels are Triton GPU kernels; this run has no GPU"
    families = liger_families()
    if not families:
        return "liger-kernel is not installed (pip install 'ftlaunch[gpu]')"
    if model_type not in families:
        return f"liger-kernel has no kernels for model type '{model_type}'"
    return None


def resolve_kernels(requested: str, model_type: str, on_gpu: bool) -> KernelChoice:
    if requested == "none":
        return "none"
    obstacle = liger_obstacle(model_type, on_gpu)
    if requested == "auto":
        return "none" if obstacle else "liger"
    if obstacle:
        raise UserInputError("model.kernels", f"{obstacle}; use auto or none")
    return "liger"


def fused_obstacle(
    kernels: KernelChoice, lora: LoraSection | None, zero_stage: int
) -> str | None:
    """Why Liger's fused linear cross-entropy cannot be used, or None when it can. It reads the
    output projection's weight directly, so that weight must be whole and un-adapted."""
    if kernels != "liger":
        return "the fused loss comes with Liger kernels (model.kernels), which this run does not use"
    if zero_stage == 3:
        return "ZeRO-3 partitions the output projection's weight, which the fused loss reads whole"
    if lora is not None:
        targets = lora.target_modules if isinstance(lora.target_modules, list) else []
        if "lm_head" in {*targets, *lora.modules_to_save}:
            return "lm_head is adapted by LoRA; the fused loss needs the plain output projection"
    return None


def plan_kernels(
    model: ModelSection, lora: LoraSection | None, model_type: str, on_gpu: bool, zero_stage: int
) -> KernelPlan:
    kernels = resolve_kernels(model.kernels, model_type, on_gpu)
    obstacle = fused_obstacle(kernels, lora, zero_stage)
    loss = model.loss
    if loss == "auto":
        loss = "chunked" if obstacle else "fused"
    elif loss == "fused" and obstacle:
        raise UserInputError("model.loss", f"{obstacle}; use auto or chunked")
    return KernelPlan(kernels, LossConfig(loss, model.loss_chunk_size))


def apply_kernels(model: torch.nn.Module, plan: KernelPlan) -> None:
    """Swap in Liger's kernels for this model instance (before peft and DeepSpeed wrap it)."""
    if plan.kernels == "liger":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, **LIGER_OPTIONS)
