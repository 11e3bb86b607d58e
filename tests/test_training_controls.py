"""Early stopping, the best checkpoint, layer freezing, BitFit and discriminative learning rates."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from launcher.checkpoint import commit as ckpt
from launcher.train.early_stop import history_from, judge
from launcher.errors import UserInputError
from launcher.train.metrics import read_metrics
from launcher.recipe.run_sections import EarlyStoppingSection, FreezeSection, TrainSection
from launcher.model.trainable import apply_trainable, optimizer_groups
from launcher.train.setup import build_optimizer
from tests.conftest import train_recipe
from tests.test_classification_data import TINY_BERT


def rule(mode="max", patience=2, min_delta=0.0):
    return EarlyStoppingSection(metric="eval_f1", mode=mode, patience=patience, min_delta=min_delta)


def stop_step(values, cfg):
    """The step (1-based evaluation index) at which the rule stops, or None."""
    for n in range(1, len(values) + 1):
        if judge(list(enumerate(values[:n], start=1)), cfg).stop:
            return n
    return None


def test_stops_after_patience_evaluations_without_improvement():
    assert stop_step([0.5, 0.6, 0.7, 0.7, 0.65, 0.9], rule()) == 5
    assert stop_step([0.5, 0.6, 0.7, 0.8], rule()) is None
    assert stop_step([0.5, 0.6, 0.6, 0.7, 0.69, 0.7], rule(patience=3)) is None
    assert stop_step([3.0, 2.0, 2.5, 1.0, 1.2, 1.1], rule("min")) == 6
    # improvements within min_delta do not count
    assert stop_step([0.5, 0.505, 0.509], rule(min_delta=0.01)) == 3
    verdict = judge([(10, 0.5), (20, 0.8), (30, 0.7)], rule())
    assert (verdict.best_step, verdict.best_value, verdict.stale, verdict.improved) == (20, 0.8, 1, False)


def test_history_skips_step_zero_and_later_steps():
    records = [{"step": 0, "eval_f1": 0.1}, {"step": 5, "loss": 1.0}, {"step": 10, "eval_f1": 0.5},
               {"step": 20, "eval_f1": 0.6}]
    assert history_from(records, "eval_f1", 10) == [(10, 0.5)]


def test_retention_keeps_the_best_checkpoint(tmp_path):
    for step in (10, 20, 30, 40):
        path = ckpt.checkpoints_dir(tmp_path) / ckpt.tag_for(step)
        path.mkdir(parents=True)
        ckpt.commit(path, {}, {"step": step})
    ckpt.write_best(tmp_path, 10, "eval_f1", 0.9)
    ckpt.retain(tmp_path, 2, keep=ckpt.best_steps(tmp_path))
    assert [c.step for c in ckpt.committed(tmp_path)] == [40, 30, 10]


@pytest.fixture
def bert():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    spec = dict(TINY_BERT)
    return AutoModelForSequenceClassification.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_embeddings_and_first_layers(bert):
    apply_trainable(bert, "full", FreezeSection(embeddings=True, first_layers=1), ["classifier"])
    names = trainable(bert)
    # exactly the embeddings and layer 0 freeze: everything else (layer 1, pooler, head) trains
    frozen = ("bert.embeddings.", "bert.encoder.layer.0.")
    everything = {n for n, _ in bert.named_parameters()}
    assert names == {n for n in everything if not n.startswith(frozen)}, everything - names
    assert "classifier.weight" in names and any(n.startswith("bert.encoder.layer.1.") for n in names)


def test_freeze_patterns_must_match(bert):
    apply_trainable(bert, "full", FreezeSection(patterns=[r"\.pooler\."]), ["classifier"])
    assert not any(".pooler." in n for n in trainable(bert))
    with pytest.raises(UserInputError, match="matches no parameter"):
        apply_trainable(bert, "full", FreezeSection(patterns=["nothing_like_this"]), [])
    with pytest.raises(UserInputError, match="only 2 layers"):
        apply_trainable(bert, "full", FreezeSection(first_layers=3), [])


def test_bitfit_trains_biases_and_head_only(bert):
    apply_trainable(bert, "bitfit", FreezeSection(), ["classifier"])
    names = trainable(bert)
    assert names == {n for n, _ in bert.named_parameters() if n.endswith("bias") or n.startswith("classifier.")}
    count = sum(p.numel() for n, p in bert.named_parameters() if n in names)
    assert 0 < count < 0.1 * sum(p.numel() for p in bert.parameters())


def test_discriminative_learning_rates(bert):
    train = TrainSection(lr=1e-4, weight_decay=0.1, lr_groups=[{"pattern": "^classifier", "lr": 1e-2}])
    groups = optimizer_groups(bert.named_parameters(), train)
    by_lr = {(g["lr"], g["weight_decay"]): len(g["params"]) for g in groups}
    assert by_lr[(1e-2, 0.1)] == 1 and by_lr[(1e-2, 0.0)] == 1  # classifier weight, bias
    assert groups[0]["lr"] == 1e-4 and groups[0]["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in groups) == len(list(bert.parameters()))
    bad = TrainSection(lr_groups=[{"pattern": "^nope", "lr": 1e-2}])
    with pytest.raises(UserInputError, match="matches no trainable parameter"):
        optimizer_groups(bert.named_parameters(), bad)


def test_the_optimizer_is_fused_on_cpu_and_steps_like_the_plain_one(bert):
    """The fused AdamW kernel on a CPU (the per-tensor loop was 7x slower a step), giving the
    plain AdamW's update."""
    train = TrainSection(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(bert, train, offload=False)
    devices = {p.device.type for g in fused.param_groups for p in g["params"]}
    assert fused.defaults["fused"] and devices == {"cpu"}
    before = {n: p.detach().clone() for n, p in bert.named_parameters()}
    plain_params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in bert.named_parameters()}
    plain = torch.optim.AdamW(
        optimizer_groups(plain_params.items(), train), lr=train.lr, betas=train.betas, eps=train.eps
    )
    for name, p in bert.named_parameters():
        p.grad = torch.full_like(p, 0.5) * (1 + len(name) % 3)
        plain_params[name].grad = p.grad.clone()
    fused.step()
    plain.step()
    for name, p in bert.named_parameters():
        assert not torch.equal(p, before[name])
        torch.testing.assert_close(p.detach(), plain_params[name].detach(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- end to end (torchrun, no Ray)


def train_sentiment(run_dir, *overrides):
    return train_recipe("sentiment_bert", run_dir, *overrides, backend="torchrun")


@pytest.mark.e2e
def test_early_stopping_exports_the_best_checkpoint(tmp_path):
    from launcher.run.export import export_run

    run_dir = train_sentiment(
        tmp_path / "run", "train.max_steps=200", "eval.every_steps=5", "eval.at_start=false",
        "checkpoint.every_steps=1000", "checkpoint.keep_last=2",
        "eval.early_stopping={metric: eval_loss, mode: min, patience: 2, min_delta: 0.02}",
    )
    records = read_metrics(run_dir / "metrics.jsonl")
    cfg = EarlyStoppingSection(metric="eval_loss", mode="min", patience=2, min_delta=0.02)
    history = history_from(records, "eval_loss", 10**9)
    values = [v for _, v in history]
    assert stop_step(values, cfg) == len(values), values  # stopped at the first evaluation the rule fires
    stopped_at = history[-1][0]
    assert stopped_at < 200 and records[-1]["step"] == stopped_at
    best = judge(history, cfg).best_step
    assert ckpt.best_steps(run_dir) == (best,) and best < stopped_at
    kept = [c.step for c in ckpt.committed(run_dir)]
    assert best in kept and stopped_at in kept
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    newest = load_file(str(export_run(run_dir, tmp_path / "newest", step=stopped_at) / "model.safetensors"))
    best_export = load_file(str(export_run(run_dir, tmp_path / "best", step=best) / "model.safetensors"))
    assert all(torch.equal(final[k], best_export[k]) for k in final)
    assert not all(torch.equal(final[k], newest[k]) for k in final)


@pytest.mark.e2e
def test_freezing_and_bitfit_train_only_what_they_claim(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from launcher.model.build import build_model, load_tokenizer
    from launcher.tasks.base import load_task_config
    from launcher.run.rundir import load_resolved

    frozen_run = train_sentiment(
        tmp_path / "frozen", "train.max_steps=6", "resources.num_workers=1", "eval.every_steps=6",
        "train.freeze={embeddings: true, first_layers: 1}",
        "train.lr_groups=[{pattern: '^classifier', lr: 0.01}]",
    )
    bitfit_run = train_sentiment(
        tmp_path / "bitfit", "train.max_steps=6", "resources.num_workers=1", "eval.every_steps=6",
        "method=bitfit",
    )
    for run_dir, is_frozen in (
        (frozen_run, lambda n: n.startswith(("bert.embeddings.", "bert.encoder.layer.0."))),
        (bitfit_run, lambda n: not (n.endswith("bias") or n.startswith("classifier."))),
    ):
        recipe = load_resolved(run_dir)
        tokenizer = load_tokenizer(recipe.model)
        torch.manual_seed(recipe.train.seed)  # the worker's initialisation, reproduced
        model = build_model(recipe.model, load_task_config(recipe, tokenizer.pad_token_id), "sdpa",
                            recipe.task)
        initial = {n: p.detach() for n, p in model.named_parameters()}
        trained = AutoModelForSequenceClassification.from_pretrained(run_dir / "final").state_dict()
        frozen = [n for n in initial if is_frozen(n)]
        moving = [n for n in initial if not is_frozen(n)]
        assert frozen and moving
        assert all(torch.equal(initial[n], trained[n]) for n in frozen)
        assert all(not torch.equal(initial[n], trained[n]) for n in moving)
        info = json.loads((run_dir / "run_info.json").read_text())
        assert info["trainable_parameters"] == sum(initial[n].numel() for n in moving)
