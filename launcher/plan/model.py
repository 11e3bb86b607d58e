"""The recipe's model as the planner needs it: parameter counts (all, trainable, the largest
module, the 4-bit ones) and the decoder's shape, from the model config alone. The model is
built on the meta device (no weights are read or allocated), then the recipe's adapter or
freezing is applied to it exactly as training applies it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from launcher.errors import UserInputError
from launcher.model.adapters import apply_adapter
from launcher.model.build import load_model_config, meta_model
from launcher.plan.memory import Counts, Shape
from launcher.recipe import Recipe
from launcher.tasks.base import task_for
from launcher.model.trainable import apply_trainable


@dataclass(frozen=True)
class ModelFacts:
    model_type: str
    counts: Counts
    shape: Shape
    non_embedding: int  # parameters of the matrix products (launcher.model.flops' N)
    adapter_inputs: int  # per layer: input features of adapted linears (LoRA dropout copies)
    adapted_per_layer: int
    head_trainable: bool  # whether the output projection trains (fused loss keeps its grad)


def shape_of(config: Any) -> Shape:
    config = config.get_text_config()
    try:
        heads = config.num_attention_heads
        hidden = config.hidden_size
        return Shape(
            layers=config.num_hidden_layers,
            hidden=hidden,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or hidden // heads,
            intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
            vocab=config.vocab_size,
        )
    except AttributeError as e:
        raise UserInputError("model", f"the planner needs a decoder-style config: {e}") from None


def build_meta(recipe: Recipe) -> tuple[Any, torch.nn.Module]:
    """The model config and the trainable model on the meta device."""
    task = task_for(recipe)
    config = task.configure(load_model_config(recipe.model), 0)
    model = meta_model(config, recipe.task)
    with torch.device("meta"):
        if recipe.uses_adapter:
            model = apply_adapter(model, recipe)
        else:
            apply_trainable(model, recipe.method, recipe.train.freeze, task.head_modules(model))
    return config, model


def largest_layer(model: torch.nn.Module) -> int:
    """DeepSpeed's largest layer: the module with the most parameters of its own."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def quantized_params(model: torch.nn.Module, recipe: Recipe) -> int:
    """Frozen linear weights bitsandbytes stores in 4 bits (not the output projection)."""
    if recipe.model.quantization == "none":
        return 0
    head = model.get_output_embeddings()
    return sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head and not m.weight.requires_grad
    )


def model_facts(recipe: Recipe) -> ModelFacts:
    config, model = build_meta(recipe)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    shape = shape_of(config)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings().weight
    head = base.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is embedding
    adapted = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    dropout = recipe.lora.dropout if recipe.lora is not None else 0.0
    inputs = sum(m.base_layer.in_features for m in adapted) if dropout > 0 else 0
    head_trains = head is not None and any(p.requires_grad for p in head.parameters())
    return ModelFacts(
        model_type=config.model_type,
        counts=Counts(total, trainable, largest_layer(model), quantized_params(base, recipe)),
        shape=shape,
        non_embedding=total if tied else total - embedding.numel(),
        adapter_inputs=inputs // shape.layers,
        adapted_per_layer=len(adapted) // shape.layers,
        head_trainable=head_trains,
    )
