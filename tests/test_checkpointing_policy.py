"""Activation checkpointing policy: every k-th decoder layer is recomputed in the backward
pass, the others are not, and gradients are those of the model without checkpointing."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from launcher.errors import UserInputError
from launcher.model.losses import LossConfig, model_loss_sum
from launcher.model.build import enable_gradient_checkpointing
from launcher.recipe import validate_recipe
from tests.conftest import TINY_LLAMA, tiny_recipe

LAYERS = 4


def four_layer_model() -> torch.nn.Module:
    spec = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"} | {"num_hidden_layers": LAYERS}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**spec), attn_implementation="sdpa").train()


def forwards_per_layer(model: torch.nn.Module) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Run forward + backward; count how often each layer's attention ran."""
    calls = [0] * LAYERS
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, 66, (2, 12), generator=g)
    model_loss_sum(model, {"input_ids": ids, "labels": ids}, LossConfig("plain")).backward()
    return calls, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("every, recomputed", [(1, [0, 1, 2, 3]), (2, [0, 2]), (3, [0, 3])])
def test_every_kth_layer_is_recomputed_and_gradients_match(every, recomputed):
    _, reference = forwards_per_layer(four_layer_model())
    model = four_layer_model()
    enable_gradient_checkpointing(model, every)
    calls, grads = forwards_per_layer(model)
    assert calls == [2 if i in recomputed else 1 for i in range(LAYERS)]
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_without_checkpointing_nothing_is_recomputed():
    calls, _ = forwards_per_layer(four_layer_model())
    assert calls == [1] * LAYERS


def test_checkpoint_every_needs_checkpointing(tmp_path):
    with pytest.raises(UserInputError, match="model.checkpoint_every"):
        validate_recipe(tiny_recipe(tmp_path, model={"checkpoint_every": 2}))
    ok = validate_recipe(
        tiny_recipe(tmp_path, model={"gradient_checkpointing": True, "checkpoint_every": 2})
    )
    assert ok.model.checkpoint_every == 2
