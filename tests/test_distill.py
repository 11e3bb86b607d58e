"""Knowledge distillation: the loss by hand, teacher checks, and a student that moves towards
its teacher."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from launcher.data.tokenized import IGNORE_INDEX
from launcher.data.batch import collate_padded
from launcher.data.pipeline import prepare_data
from launcher.tasks.distill import distill_loss_sum, target_logits
from launcher.train.metrics import read_metrics
from launcher.model.build import build_model, load_tokenizer
from launcher.tasks.base import load_task_config
from launcher.run.rundir import load_resolved
from tests.conftest import ROOT, TINY_LLAMA, tiny_recipe, write_recipe


def test_loss_equals_hand_computation():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    labels = torch.tensor([0, 2])
    alpha, t = 0.3, 2.0
    expected = 0.0
    for s_row, t_row, y in zip(student.tolist(), teacher.tolist(), labels.tolist()):
        log_z = math.log(sum(math.exp(v) for v in s_row))
        ce = log_z - s_row[y]
        p = [math.exp(v / t) for v in t_row]
        p = [v / sum(p) for v in p]
        q = [math.exp(v / t) for v in s_row]
        q = [v / sum(q) for v in q]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        expected += alpha * ce + (1 - alpha) * t * t * kl
    got = distill_loss_sum(student, teacher, labels, alpha, t)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_causal_targets_are_shifted_and_masked():
    logits = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2], [IGNORE_INDEX, IGNORE_INDEX, 3]])
    picked, targets = target_logits(logits, labels, "causal_lm")
    assert targets.tolist() == [1, 2, 3]
    assert torch.equal(picked, torch.stack([logits[0, 0], logits[0, 1], logits[1, 1]]))


def test_teacher_with_another_vocabulary_exits_2(tmp_path, cli, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_LLAMA, vocab_size=80)
    teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    teacher.save_pretrained(tmp_path / "teacher")
    monkeypatch.chdir(ROOT)
    recipe = tiny_recipe(tmp_path / "run", method="distill", distill={"teacher": str(tmp_path / "teacher")})
    code, _, err = cli("check", write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 2 and "distill.teacher" in err and "80 tokens" in err and "66" in err


def test_distill_section_goes_with_the_method(tmp_path, cli):
    recipe = tiny_recipe(tmp_path / "run", method="distill")
    code, _, err = cli("check", write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 2 and "distill" in err


def kl_to_teacher(student, teacher, split, pad_id, t=2.0):
    total, count = 0.0, 0
    with torch.no_grad():
        for lo in range(0, len(split), 32):
            batch = collate_padded(split, np.arange(lo, min(lo + 32, len(split))), pad_id)
            batch.pop("labels")
            s, te = student(**batch).logits / t, teacher(**batch).logits / t
            kl = torch.nn.functional.kl_div(s.log_softmax(-1), te.log_softmax(-1), log_target=True,
                                            reduction="sum")
            total, count = total + kl.item(), count + len(s)
    return total / count


@pytest.mark.e2e
@pytest.mark.xdist_group("sentiment")
def test_student_moves_towards_the_teacher(tmp_path, sentiment_run):
    from transformers import AutoModelForSequenceClassification

    from tests.test_training_controls import train_sentiment

    teacher_run = sentiment_run  # the shipped recipe's trained classifier
    student_run = train_sentiment(  # the same shape, initialised from another seed
        tmp_path / "student", "train.max_steps=40", "eval.at_start=false", "method=distill",
        "train.seed=7", f"distill={{teacher: {teacher_run / 'final'}, alpha: 0.2, temperature: 2.0}}",
    )
    recipe = load_resolved(student_run)
    tokenizer = load_tokenizer(recipe.model)
    split = prepare_data(recipe.data, tokenizer, recipe.train.seed, recipe.labels).validation
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_run / "final").eval()
    torch.manual_seed(recipe.train.seed)  # the student as the worker initialised it
    initial = build_model(recipe.model, load_task_config(recipe, tokenizer.pad_token_id), "sdpa",
                          recipe.task).eval()
    trained = AutoModelForSequenceClassification.from_pretrained(student_run / "final").eval()
    before = kl_to_teacher(initial, teacher, split, tokenizer.pad_token_id)
    after = kl_to_teacher(trained, teacher, split, tokenizer.pad_token_id)
    assert after < 0.5 * before, (before, after)
    evals = [r for r in read_metrics(student_run / "metrics.jsonl") if "eval_accuracy" in r]
    assert evals[-1]["eval_accuracy"] >= 0.9, evals


@pytest.mark.e2e
def test_causal_lm_student_learns_from_a_teacher_sharded_by_zero3(tmp_path, cli):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_LLAMA)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    teacher.save_pretrained(tmp_path / "teacher")
    recipe = tiny_recipe(
        tmp_path / "run", method="distill",
        distill={"teacher": str(tmp_path / "teacher"), "alpha": 0.0, "temperature": 1.0},
        train={"max_steps": 12, "micro_batch_size": 8, "lr": 3e-3},
        resources={"num_workers": 2}, data={"validation": None}, deepspeed={"config": "zero3"},
    )
    code, _, err = cli(write_recipe(tmp_path / "r.yaml", recipe), "--backend", "torchrun")
    assert code == 0, err
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    teacher_share = json.loads((tmp_path / "run" / "run_info.json").read_text())["teacher_parameters"]
    assert teacher_share["total"] == sum(p.numel() for p in teacher.parameters())
    half = teacher_share["total"] / 2  # two ranks; norms stay whole (persistence threshold)
    assert half <= teacher_share["held_by_rank0"] < 1.1 * half, teacher_share
