"""Everything the driver checks and resolves before any worker starts.

Structural checks live in the schema; these need the model config, the tokenizer, the data
and this machine. Any failure is a UserInputError, raised before a run directory exists.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from launcher.data.labels import infer_label_names
from launcher.data.tokenized import PreparedData
from launcher.data.read import iter_rows, numeric_fields
from launcher.data.batch import packing_layout, training_units
from launcher.data.pipeline import prepare_data
from launcher.tasks.distill import check_teacher
from launcher.recipe.ds_config import resolve_ds_config, zero_stage
from launcher.tasks.base import task_for
from launcher.errors import UserInputError
from launcher.model.kernels import plan_kernels
from launcher.model.adapters import check_adapter_targets
from launcher.model.build import (
    hidden_size,
    load_model_config,
    load_tokenizer,
    max_positions,
    meta_model,
    remote_code_kwargs,
    resolve_attention,
)
from launcher.recipe import Recipe
from launcher.model.trainable import apply_trainable, check_lr_groups
from launcher.driver.locations import with_absolute_paths


@dataclass(frozen=True)
class Prepared:
    recipe: Recipe
    ds_config: dict[str, Any]
    attention: str | None
    data: PreparedData
    train_units: int


def with_label_names(recipe: Recipe) -> Recipe:
    """Fill labels.names from the training data when the recipe leaves them out, so the
    resolved recipe (and every worker, and the export) carries one fixed label order."""
    labels = recipe.labels
    if labels is None or labels.names is not None or labels.problem_type == "regression":
        return recipe
    rows = iter_rows(recipe.data.train, numeric_fields(recipe.data))  # streamed, not held
    names = infer_label_names(rows, recipe.data.format, recipe.data.fields)
    return recipe.model_copy(update={"labels": labels.model_copy(update={"names": names})})


def check_trainable(recipe: Recipe, model: torch.nn.Module) -> None:
    """train.freeze and train.lr_groups name parameters this model has (full and bitfit)."""
    head = task_for(recipe).head_modules(model)
    apply_trainable(model, recipe.method, recipe.train.freeze, head)
    check_lr_groups([n for n, p in model.named_parameters() if p.requires_grad], recipe.train)


def check_quantization(recipe: Recipe, ds_config: dict[str, Any]) -> None:
    """QLoRA needs bitsandbytes on a CUDA machine and a ZeRO stage that leaves frozen weights
    whole: ZeRO-3 would partition the packed 4-bit tensors."""
    if recipe.model.quantization == "none":
        return
    if zero_stage(ds_config) == 3:
        raise UserInputError(
            "model.quantization",
            "DeepSpeed ZeRO-3 partitions every weight and cannot shard bitsandbytes 4-bit "
            "weights; use deepspeed.config zero1 or zero2 with QLoRA",
        )
    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is None:
        raise UserInputError("model.quantization", "needs the bitsandbytes package (pip install bitsandbytes)")


def check_early_stopping(recipe: Recipe) -> None:
    stopping = recipe.eval.early_stopping
    if stopping is None:
        return
    known = task_for(recipe).reported_metrics(recipe.eval)
    if stopping.metric not in known:
        raise UserInputError(
            "eval.early_stopping.metric",
            f"'{stopping.metric}' is not reported by this run; choose one of {sorted(known)}",
        )


def prepare_offline(recipe: Recipe) -> tuple[Recipe, dict[str, Any]]:
    """Checks that need no model, tokenizer or data: for recipes whose model or data live on
    a hub this machine cannot reach. The DeepSpeed config is resolved with default buckets."""
    recipe = with_absolute_paths(recipe)
    hidden = (recipe.model.architecture or {}).get("hidden_size")
    ds_config = resolve_ds_config(recipe, recipe.resources.num_workers, hidden)
    check_quantization(recipe, ds_config)
    return recipe, ds_config


def check_units(recipe: Recipe, data: PreparedData, attention: str | None) -> int:
    """The training units (examples, packed rows or length groups); at least one global batch
    of them, or a UserInputError."""
    train, cfg = recipe.train, recipe.data
    units, micro, kind = len(data.train), train.micro_batch_size, "examples"
    if cfg.packing:
        layout = packing_layout(cfg.packing_layout, attention)
        packed, micro = training_units(data.train.lengths(), cfg.max_length, micro, layout)
        units, kind = len(packed), "packed rows" if layout == "rows" else "length groups"
    needed = micro * train.grad_accum * recipe.resources.num_workers
    if units < needed:
        raise UserInputError(
            "data.train",
            f"{units} training {kind} is fewer than one global batch of {needed} ("
            f"{'one length group per micro batch' if kind == 'length groups' else 'micro_batch_size'}"
            " x grad_accum x num_workers)",
        )
    return units


def prepare(recipe: Recipe) -> Prepared:
    recipe = with_absolute_paths(recipe)
    config = load_model_config(recipe.model)
    limit = max_positions(config)
    if limit is not None and recipe.data.max_length > limit:
        raise UserInputError(
            "data.max_length",
            f"{recipe.data.max_length} exceeds the model's maximum of {limit} positions",
        )
    attention = None
    if not recipe.resources.use_gpu or torch.cuda.is_available():
        attention = resolve_attention(recipe.model.attention, recipe.resources.use_gpu)
    skeleton = meta_model(config, recipe.task, remote_code_kwargs(recipe.model))
    if recipe.uses_adapter:
        check_adapter_targets(skeleton, recipe)
    else:
        check_trainable(recipe, skeleton)
    tokenizer = load_tokenizer(recipe.model)
    recipe = with_label_names(recipe)
    check_early_stopping(recipe)
    if recipe.distill is not None:
        check_teacher(recipe, config)
    data = prepare_data(recipe.data, tokenizer, recipe.train.seed, recipe.labels)
    units = check_units(recipe, data, attention)
    ds_config = resolve_ds_config(recipe, recipe.resources.num_workers, hidden_size(config))
    check_quantization(recipe, ds_config)
    if not recipe.resources.use_gpu or torch.cuda.is_available():
        plan_kernels(
            recipe.model, recipe.lora, config.model_type, recipe.resources.use_gpu,
            zero_stage(ds_config),
        )
    return Prepared(recipe, ds_config, attention, data, units)
