"""Which parameters train, and at which learning rate: layer freezing, BitFit and
discriminative learning rates. Applied to the Hugging Face model before DeepSpeed wraps it."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from launcher.errors import UserInputError
from launcher.recipe.run_sections import FreezeSection, TrainSection


def embedding_parameters(model: torch.nn.Module) -> set[str]:
    """The input embeddings, and the position / token-type embeddings models keep beside them
    (BERT's ``embeddings.*`` module)."""
    embedding = model.get_input_embeddings()
    names = {n for n, p in model.named_parameters() if any(p is q for q in embedding.parameters())}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "embeddings":
            names |= {f"{name}.{n}" for n, _ in module.named_parameters()}
    return names


def layer_stack(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The transformer's stack of layers: the first ModuleList as long as the config's layers."""
    count = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name, module
    raise UserInputError("train.freeze.first_layers", "cannot find the model's stack of layers")


def frozen_names(model: torch.nn.Module, freeze: FreezeSection) -> set[str]:
    """Parameter names that ``train.freeze`` freezes; every pattern must match something."""
    names = [n for n, _ in model.named_parameters()]
    frozen: set[str] = set()
    if freeze.embeddings:
        frozen |= embedding_parameters(model)
    if freeze.first_layers:
        prefix, layers = layer_stack(model)
        if freeze.first_layers > len(layers):
            raise UserInputError(
                "train.freeze.first_layers", f"the model has only {len(layers)} layers"
            )
        starts = tuple(f"{prefix}.{i}." for i in range(freeze.first_layers))
        frozen |= {n for n in names if n.startswith(starts)}
    for pattern in freeze.patterns:
        matched = {n for n in names if re.search(pattern, n)}
        if not matched:
            raise UserInputError("train.freeze.patterns", f"'{pattern}' matches no parameter")
        frozen |= matched
    return frozen


def apply_trainable(
    model: torch.nn.Module, method: str, freeze: FreezeSection, head: list[str]
) -> None:
    """Freeze what the recipe freezes. BitFit trains only the biases (and a task head)."""
    frozen = frozen_names(model, freeze)
    in_head = tuple(f"{h}." for h in head)
    for name, param in model.named_parameters():
        if method == "bitfit":
            param.requires_grad = name.endswith("bias") or name.startswith(in_head)
        elif name in frozen:
            param.requires_grad = False
    if not any(p.requires_grad for p in model.parameters()):
        raise UserInputError("train.freeze", "nothing is left to train")


def parameter_lr(name: str, train: TrainSection) -> float:
    """The first ``train.lr_groups`` entry whose pattern matches the name, else ``train.lr``."""
    for group in train.lr_groups:
        if re.search(group.pattern, name):
            return group.lr
    return train.lr


def check_lr_groups(names: list[str], train: TrainSection) -> None:
    for group in train.lr_groups:
        if not any(re.search(group.pattern, n) for n in names):
            raise UserInputError("train.lr_groups", f"'{group.pattern}' matches no trainable parameter")


def optimizer_groups(
    named: Iterator[tuple[str, torch.nn.Parameter]], train: TrainSection
) -> list[dict]:
    """AdamW parameter groups: one per (learning rate, decay or not). No weight decay on
    biases and norm weights (parameters of rank < 2); ZeRO-3 shapes are read from ds_shape."""
    trainable = [(n, p) for n, p in named if p.requires_grad]
    check_lr_groups([n for n, _ in trainable], train)
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, p in trainable:
        decay = len(getattr(p, "ds_shape", p.shape)) >= 2
        groups.setdefault((parameter_lr(name, train), decay), []).append(p)
    order = sorted(groups, key=lambda k: (k[0] != train.lr, not k[1]))
    return [
        {"params": groups[k], "lr": k[0], "weight_decay": train.weight_decay if k[1] else 0.0}
        for k in order
    ]
