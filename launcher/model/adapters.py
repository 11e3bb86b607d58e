"""peft adapters on a frozen base: LoRA (DoRA, rsLoRA, QLoRA), IA3, prompt and prefix tuning.

Every switch on ``method`` lives here; the peft task type and whether a new head trains in
full beside the adapter come from the recipe's task entry (launcher.recipe.schema.TASKS).
"""

from __future__ import annotations

from typing import Any

import torch

from launcher.errors import UserInputError
from launcher.model.build import head_module_names
from launcher.recipe import TASKS, Recipe
from launcher.recipe.sections import IA3Section, LoraSection, PromptSection


def lora_target_misses(model: torch.nn.Module, targets: list[str]) -> list[str]:
    names = [n for n, _ in model.named_modules()]
    return [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]


def linear_module_suffixes(model: torch.nn.Module) -> list[str]:
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    )


def check_lora_targets(model: torch.nn.Module, lora: LoraSection) -> None:
    if lora.target_modules == "all-linear":
        return
    misses = lora_target_misses(model, lora.target_modules)
    if misses:
        raise UserInputError(
            "lora.target_modules",
            f"no module of the model matches {misses}; linear modules are "
            f"{linear_module_suffixes(model)}",
        )


def lora_config(
    lora: LoraSection, task: str = "causal_lm", head: list[str] | None = None
) -> Any:
    """peft's LoraConfig. A task ``head`` (new classification layers) is trained in full
    beside the adapter and never itself adapted."""
    from peft import LoraConfig, TaskType

    head = head or []
    return LoraConfig(
        task_type=TaskType[TASKS[task].peft_task_type],
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        exclude_modules=head or None,
        bias=lora.bias,
        modules_to_save=list(dict.fromkeys([*lora.modules_to_save, *head])) or None,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
    )


def ia3_config(ia3: IA3Section, task: str = "causal_lm", head: list[str] | None = None) -> Any:
    from peft import IA3Config, TaskType

    return IA3Config(
        task_type=TaskType[TASKS[task].peft_task_type],
        target_modules=ia3.target_modules,
        feedforward_modules=ia3.feedforward_modules,
        exclude_modules=head or None,
        modules_to_save=head or None,
    )


def prompt_config(method: str, prompt: PromptSection, task: str, head: list[str]) -> Any:
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType

    kind = PromptTuningConfig if method == "prompt_tuning" else PrefixTuningConfig
    return kind(
        task_type=TaskType[TASKS[task].peft_task_type],
        num_virtual_tokens=prompt.num_virtual_tokens,
        modules_to_save=head or None,
    )


def adapter_config(recipe: Recipe, head: list[str]) -> Any:
    """peft's config for the recipe's adapter method."""
    section = recipe.adapter_section
    if recipe.method == "ia3":
        return ia3_config(section, recipe.task, head)
    if recipe.method in ("prompt_tuning", "prefix_tuning"):
        return prompt_config(recipe.method, section, recipe.task, head)
    return lora_config(section, recipe.task, head)


def apply_adapter(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """Wrap the model in the recipe's peft adapter; a new task head trains in full beside it.
    A 4-bit base (QLoRA) is first made trainable the way peft prescribes."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_adapter_targets(model, recipe)
    if recipe.model.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    head = head_module_names(model) if recipe.task_kind.new_head else []
    return get_peft_model(model, adapter_config(recipe, head))


def check_adapter_targets(model: torch.nn.Module, recipe: Recipe) -> None:
    if recipe.method == "lora":
        check_lora_targets(model, recipe.lora)
        return
    if recipe.method != "ia3":
        return
    targets = (recipe.ia3.target_modules or []) + (recipe.ia3.feedforward_modules or [])
    misses = lora_target_misses(model, targets)
    if misses:
        raise UserInputError(
            "ia3.target_modules",
            f"no module of the model matches {misses}; linear modules are "
            f"{linear_module_suffixes(model)}",
        )
