"""Next-token prediction: the loss, held-out loss and perplexity, and greedy exact match."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from launcher.data.tokenized import IGNORE_INDEX, TokenizedSplit
from launcher.model.losses import LossConfig, model_loss_sum, token_loss_sum
from launcher.ranks import Rank
from launcher.recipe.sections import DistillSection
from launcher.recipe.run_sections import EvalSection
from launcher.tasks import distill
from launcher.tasks.base import EvalContext, Objective
from launcher.tasks.evaluation import Totals, evaluating, sharded

GENERATION_BATCH = 16


def target_count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def prompt_tuned_loss(engine: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Next-token loss under prompt tuning, which prepends virtual tokens to the input: taken
    from full logits on the real positions only (the hidden-state losses assume none)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = engine(**inputs, use_cache=False).logits
    return token_loss_sum(logits[:, -batch["input_ids"].shape[1] :], batch["labels"])


@dataclass(frozen=True)
class CausalLM:
    method: str
    name: str = "causal_lm"

    def configure(self, config: Any, pad_token_id: int) -> Any:
        return config

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        return []

    def pads_left(self, method: str, model_type: str) -> bool:
        return False

    def objective(self, loss: LossConfig) -> Objective:
        if self.method == "prompt_tuning":
            return Objective(prompt_tuned_loss, target_count)
        return Objective(lambda engine, batch: model_loss_sum(engine, batch, loss), target_count)

    def distill_objective(self, teacher: torch.nn.Module, cfg: DistillSection) -> Objective:
        return Objective(
            lambda engine, batch: distill.batch_distill_loss(engine, teacher, batch, self.name, cfg),
            target_count,
        )

    def evaluate(self, engine: Any, ctx: EvalContext, cfg: EvalSection) -> dict[str, float]:
        loss_sum = self.objective(LossConfig()).loss_sum
        metrics = evaluate_loss(engine, ctx, cfg.max_batches, loss_sum)
        em = cfg.exact_match
        if em is not None:
            metrics["eval_exact_match"] = exact_match(
                engine, ctx.split, ctx.rank, em.num_examples, em.max_new_tokens, ctx.pad_id,
                ctx.stage3,
            )
        return metrics

    def reported_metrics(self, cfg: EvalSection) -> set[str]:
        extra = {"eval_exact_match"} if cfg.exact_match is not None else set()
        return {"eval_loss", "eval_perplexity"} | extra

    def check_teacher(self, teacher_config: Any) -> None:
        return None


def evaluate_loss(
    engine: Any, ctx: EvalContext, max_batches: int | None, loss_sum: Any
) -> dict[str, float]:
    """Loss over the whole validation split, every example counted exactly once."""
    totals = Totals(2, ctx.rank)
    with evaluating(engine):
        for indices, real in sharded(np.arange(ctx.batches.units()), ctx.rank, ctx.micro, max_batches):
            batch = ctx.batches.make(indices, ctx.rank.device)
            if not real:
                batch["labels"].fill_(IGNORE_INDEX)
            totals.add(loss_sum(engine, batch), target_count(batch))
    summed, count = totals.reduced()
    loss = summed / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def prompt_and_target(ids: np.ndarray, labels: np.ndarray) -> tuple[list[int], list[int]]:
    """The prompt before the first trained token, and the first trained span as the target."""
    trained = np.flatnonzero(labels != IGNORE_INDEX)
    start = int(trained[0])
    end = start
    while end < len(labels) and labels[end] != IGNORE_INDEX:
        end += 1
    return ids[:start].tolist(), ids[start:end].tolist()


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def exact_match(
    engine: Any, split: TokenizedSplit, rank: Rank, num: int, max_new: int, pad_id: int, sync: bool
) -> float:
    """Greedy-decode validation prompts; a hit reproduces the whole target, stop token included.

    Of the first ``num`` examples, those whose first token is trained have no prompt to
    decode from and are left out (the recipe check refuses the settings that make them)."""
    candidates = range(min(num, len(split)))
    prompted = [i for i in candidates if split.example(i)[1][0] == IGNORE_INDEX]
    hits = Totals(2, rank)
    with evaluating(engine.module) as model:
        for chunk, real in sharded(prompted, rank, GENERATION_BATCH):
            pairs = [prompt_and_target(*split.example(int(i))) for i in chunk]
            ids, mask = left_padded([p for p, _ in pairs], pad_id)
            out = model.generate(
                input_ids=ids.to(rank.device), attention_mask=mask.to(rank.device),
                max_new_tokens=max_new, do_sample=False, pad_token_id=pad_id, synced_gpus=sync,
            )
            if not real:
                continue
            width = ids.shape[1]
            for row, (_, target) in enumerate(pairs):
                hits.add(float(out[row, width : width + len(target)].tolist() == target), 1)
    correct, total = hits.reduced()
    return correct / max(total, 1)
