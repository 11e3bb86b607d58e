"""Classification and tagging end to end: real Ray, real DeepSpeed, tiny models on CPU.

Each task trains on generated data whose label a keyword decides, so its validation metric
must climb far above chance; the exported model must load with the task's Auto class and
reproduce, in one process over the whole validation set, the metrics the 2-worker run logged
(101 validation examples: uneven shares and an uneven last batch on every rank).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from launcher.data.batch import collate_padded
from launcher.data.pipeline import prepare_data
from launcher.train.metrics import read_metrics
from launcher.model.build import load_tokenizer
from launcher.run.rundir import load_resolved
from tests.conftest import train_recipe

pytestmark = pytest.mark.e2e


def evals(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]


def validation_outputs(run_dir, model):
    """The exported model's logits on every validation example, in one process."""
    recipe = load_resolved(run_dir)
    tokenizer = load_tokenizer(recipe.model)
    split = prepare_data(recipe.data, tokenizer, recipe.train.seed, recipe.labels).validation
    logits, labels = [], []
    with torch.no_grad():
        for lo in range(0, len(split), 32):
            batch = collate_padded(split, np.arange(lo, min(lo + 32, len(split))), tokenizer.pad_token_id)
            gold = batch.pop("labels")
            logits.append(model(**batch).logits)
            labels.append(gold)
    return recipe, logits, labels


@pytest.fixture(scope="module")
def ner(ray_cluster, tmp_path_factory):
    return train_recipe("ner_bert_lora", tmp_path_factory.mktemp("ner") / "run", "eval.at_start=true")


@pytest.mark.xdist_group("sentiment")
def test_sentiment_learns_and_export_reproduces_metrics(sentiment_run):
    from sklearn import metrics as m
    from transformers import AutoModelForSequenceClassification

    sentiment = sentiment_run
    records = evals(sentiment)
    first, last = records[0], records[-1]
    assert first["step"] == 0 and first["eval_accuracy"] < 0.75
    assert last["step"] == 40 and last["eval_accuracy"] >= 0.95 and last["eval_f1"] >= 0.95
    model = AutoModelForSequenceClassification.from_pretrained(sentiment / "final").eval()
    assert model.config.id2label == {0: "negative", 1: "positive"}
    _, logits, labels = validation_outputs(sentiment, model)
    probs = torch.softmax(torch.cat(logits), -1).numpy()
    gold, pred = torch.cat(labels).numpy(), probs.argmax(-1)
    assert len(gold) == 101
    assert last["eval_accuracy"] == pytest.approx(m.accuracy_score(gold, pred), abs=1e-9)
    assert last["eval_f1"] == pytest.approx(m.f1_score(gold, pred), abs=1e-9)
    assert last["eval_mcc"] == pytest.approx(m.matthews_corrcoef(gold, pred), abs=1e-9)
    assert last["eval_roc_auc"] == pytest.approx(m.roc_auc_score(gold, probs[:, 1]), abs=1e-4)
    loss = torch.nn.functional.cross_entropy(torch.cat(logits), torch.cat(labels))
    assert last["eval_loss"] == pytest.approx(loss.item(), rel=1e-4)


def test_ner_lora_trains_head_and_export_reproduces_entity_f1(ner):
    from peft import PeftModel
    from seqeval.metrics import f1_score
    from transformers import AutoModelForTokenClassification

    records = evals(ner)
    assert records[0]["step"] == 0 and records[0]["eval_f1"] < 0.2
    last = records[-1]
    # LoRA on a randomly initialised body learns slowly: entity F1 from ~0.1 to ~0.7
    assert last["step"] == 80 and last["eval_f1"] >= 0.5 and last["eval_accuracy"] >= 0.8, records
    final = ner / "final"
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert any(k.startswith("base_model.model.classifier.") for k in adapter), list(adapter)[:5]
    base = AutoModelForTokenClassification.from_pretrained(final / "base_model")
    model = PeftModel.from_pretrained(base, str(final)).eval()
    recipe, logits, labels = validation_outputs(ner, model)
    names = recipe.labels.names
    assert names[0] == "O" and set(names) == {"O", "B-NUM", "I-NUM", "B-TEEN"}
    gold_tags, pred_tags = [], []
    for lg, lab in zip(logits, labels):
        pred = lg.argmax(-1)
        for row in range(len(lab)):
            keep = lab[row] != -100
            gold_tags.append([names[t] for t in lab[row][keep].tolist()])
            pred_tags.append([names[t] for t in pred[row][keep].tolist()])
    assert last["eval_f1"] == pytest.approx(f1_score(gold_tags, pred_tags), abs=1e-9)


def test_multi_label_llama_zero3(ray_cluster, tmp_path):
    from transformers import AutoModelForSequenceClassification

    run_dir = train_recipe("topics_llama_multilabel", tmp_path / "run", "train.max_steps=30")
    last = evals(run_dir)[-1]
    assert last["step"] == 30 and last["eval_f1"] >= 0.9, last
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "final").eval()
    assert model.config.problem_type == "multi_label_classification"
    assert list(model.config.id2label.values()) == ["arithmetic", "polite", "spelling"]
    _, logits, labels = validation_outputs(run_dir, model)
    pred = (torch.sigmoid(torch.cat(logits)) > 0.5).int().numpy()
    gold = torch.cat(labels).int().numpy()
    from sklearn.metrics import f1_score

    assert last["eval_f1"] == pytest.approx(f1_score(gold, pred, average="micro"), abs=1e-9)


def test_sentence_pairs_under_torchrun(tmp_path):
    run_dir = train_recipe("pairs_bert", tmp_path / "run", backend="torchrun")
    first, last = evals(run_dir)
    assert first["step"] == 20 and last["step"] == 40 and last["eval_accuracy"] >= 0.95, last
