"""The chunked loss equals the plain full-logits loss, in value and gradients, for a plain
Hugging Face model and through peft, and never projects more than one chunk at a time."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from launcher.errors import UserInputError
from launcher.model.kernels import plan_kernels, resolve_kernels
from launcher.model.losses import LossConfig, hidden_state_loss_supported, model_loss_sum
from launcher.recipe.sections import LoraSection, ModelSection
from tests.conftest import DATA, TINY_LLAMA

PLAIN = LossConfig("plain")


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    spec = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"} | overrides
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**spec), attn_implementation="sdpa")


def sft_batch(rows: int = 3, width: int = 19) -> dict[str, torch.Tensor]:
    """Prompts masked out of the labels and right padding, as collate_padded makes them."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 66, (rows, width), generator=g)
    labels = ids.clone()
    mask = torch.ones_like(ids)
    for r in range(rows):
        labels[r, : 3 + r] = -100
        labels[r, width - 2 * r :] = -100
        mask[r, width - 2 * r :] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, config: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model_loss_sum(model, sft_batch(), config)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_chunked_equals_plain(chunk):
    model = tiny_model()
    ref_loss, ref_grads = loss_and_grads(model, PLAIN)
    loss, grads = loss_and_grads(model, LossConfig("chunked", chunk))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_chunked_equals_plain_through_peft():
    model = get_peft_model(
        tiny_model(),
        LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    )
    for p in model.parameters():  # LoRA B starts at zero; make the adapters matter
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    ref_loss, ref_grads = loss_and_grads(model, PLAIN)
    loss, grads = loss_and_grads(model, LossConfig("chunked", 4))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    assert grads and all("lora_" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_tied_embeddings_get_both_gradients():
    model = tiny_model(tie_word_embeddings=True)
    ref_loss, ref_grads = loss_and_grads(model, PLAIN)
    loss, grads = loss_and_grads(model, LossConfig("chunked", 8))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    name = "model.embed_tokens.weight"
    torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)


def test_output_projection_sees_one_chunk_at_a_time():
    """Forward and the backward's recomputation project at most chunk_size positions; the
    last chunk, whose backward comes first, is not recomputed."""
    model = tiny_model()
    seen: list[int] = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[-2]))
    loss = model_loss_sum(model, sft_batch(), LossConfig("chunked", 6))
    forward_calls = len(seen)
    loss.backward()
    targets = int((sft_batch()["labels"][:, 1:] != -100).sum())
    assert seen[0] == 0  # the model's own forward is asked for no logits
    assert max(seen) <= 6 and sum(seen[1:forward_calls]) == targets
    chunks = forward_calls - 1
    assert chunks >= 3 and len(seen) == forward_calls + chunks - 1  # all but the last recomputed


def test_a_single_chunk_is_projected_once():
    model = tiny_model()
    seen: list[int] = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[-2]))
    model_loss_sum(model, sft_batch(), LossConfig("chunked", 4096)).backward()
    assert len(seen) == 2 and seen[0] == 0  # the model's own call, then the one chunk


def test_batch_without_targets_gives_zero_loss_with_a_graph():
    model = tiny_model()
    batch = sft_batch()
    batch["labels"].fill_(-100)
    loss = model_loss_sum(model, batch, LossConfig("chunked", 4))
    loss.backward()
    assert loss.item() == 0.0


def test_logit_transforming_models_use_full_logits():
    assert hidden_state_loss_supported(tiny_model())
    softcapped = tiny_model()
    softcapped.config.logit_scale = 0.5
    assert not hidden_state_loss_supported(softcapped)


def model_section(**kw) -> ModelSection:
    return ModelSection(architecture=TINY_LLAMA, tokenizer=str(DATA / "tokenizer"), **kw)


def test_cpu_plan_is_chunked_loss_without_kernels():
    plan = plan_kernels(model_section(), None, "llama", on_gpu=False, zero_stage=2)
    assert plan.kernels == "none" and plan.loss == LossConfig("chunked", 4096)
    plain = plan_kernels(model_section(loss="plain"), None, "llama", on_gpu=False, zero_stage=3)
    assert plain.loss.kind == "plain"


def test_impossible_kernel_choices_are_input_errors():
    with pytest.raises(UserInputError, match="model.kernels"):
        resolve_kernels("liger", "llama", on_gpu=True)  # no GPU and no liger-kernel here
    with pytest.raises(UserInputError, match="model.loss"):
        plan_kernels(model_section(loss="fused"), None, "llama", on_gpu=False, zero_stage=2)


def test_fused_loss_obstacles_named():
    from launcher.model.kernels import fused_obstacle

    assert fused_obstacle("liger", None, 2) is None
    assert "ZeRO-3" in fused_obstacle("liger", None, 3)
    assert "lm_head" in fused_obstacle("liger", LoraSection(modules_to_save=["lm_head"]), 2)


@pytest.mark.parametrize(
    "model, field",
    [({"kernels": "liger"}, "model.kernels"), ({"loss": "fused", "kernels": "none"}, "model.loss")],
)
def test_impossible_kernel_recipe_exits_2(cli, tmp_path, model, field):
    from tests.conftest import tiny_recipe, write_recipe

    run_dir = tmp_path / "run"
    code, _, err = cli(write_recipe(tmp_path / "r.yaml", tiny_recipe(run_dir, model=model)))
    assert code == 2 and field in err
    assert not run_dir.exists()
