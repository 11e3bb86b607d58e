"""ftlaunch on 2 Ray workers with ZeRO-2 and gradient accumulation matches a plain
single-process PyTorch loop over the same global batches, step for step."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from launcher.data.batch import StepPlan, collate_padded
from launcher.data.pipeline import prepare_data
from launcher.train.metrics import read_metrics
from launcher.model.build import load_model_config
from launcher.recipe import Recipe
from launcher.train.schedule import lr_lambda
from launcher.model.losses import token_loss_sum
from tests.conftest import DATA, tiny_recipe, write_recipe

pytestmark = pytest.mark.e2e
STEPS = 8


def reference_losses(recipe: Recipe) -> list[float]:
    """The textbook loop: one process, the whole global batch, mean loss over target tokens."""
    train = recipe.train
    tokenizer = AutoTokenizer.from_pretrained(str(DATA / "tokenizer"))
    split = prepare_data(recipe.data, tokenizer, train.seed).train
    torch.manual_seed(train.seed)
    model = AutoModelForCausalLM.from_config(
        load_model_config(recipe.model), attn_implementation="sdpa", dtype=torch.float32
    )
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=train.lr, betas=train.betas, eps=train.eps,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train, STEPS))
    world = recipe.resources.num_workers
    plan = StepPlan(len(split), train.micro_batch_size, train.grad_accum, world, train.seed, True)
    losses = []
    for step in range(STEPS):
        indices = [i for r in range(world) for m in plan.micro_batches(step, r) for i in m.tolist()]
        batch = collate_padded(split, indices, tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = (batch["labels"][:, 1:] != -100).sum()
        loss = token_loss_sum(logits, batch["labels"]) / targets
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def test_loss_curve_matches_plain_pytorch(ray_cluster, cli, tmp_path):
    spec = tiny_recipe(
        tmp_path / "run",
        train={"max_steps": STEPS, "micro_batch_size": 3, "grad_accum": 2, "lr": 2e-3,
               "weight_decay": 0.1, "warmup_steps": 2, "max_grad_norm": 0.5, "seed": 11},
        resources={"num_workers": 2}, data={"validation": None},
    )
    code, _, err = cli(write_recipe(tmp_path / "r.yaml", spec))
    assert code == 0, err
    ours = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    theirs = reference_losses(Recipe.model_validate(spec))
    assert len(ours) == STEPS
    assert theirs[-1] < theirs[0]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-5, atol=2e-5)
