"""Classification and tagging without training: encoding, label sets, bad input, loss, metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from launcher.data import labels
from launcher.tasks import classification

from launcher.tasks import classification_eval as task_eval
from launcher.data.tokenized import IGNORE_INDEX, Row, TokenizedSplit
from launcher.data.batch import collate_padded
from launcher.data.encode import encode_rows
from launcher.errors import UserInputError
from launcher.model.build import load_tokenizer
from launcher.recipe.sections import DataSection, LabelsSection, ModelSection
from launcher.recipe import Recipe
from tests.conftest import DATA, deep_update, tiny_recipe, write_recipe

TINY_BERT = {
    "model_type": "bert", "vocab_size": 66, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSection(architecture=TINY_BERT, tokenizer=str(DATA / "tokenizer")))


def cls_recipe(tmp_path, task="sequence_classification", **changes):
    base = {
        "task": task,
        "model": {"architecture": TINY_BERT},
        "data": {
            "train": str(DATA / "sentiment_train.csv"), "validation": str(DATA / "sentiment_val.csv"),
            "format": "classification" if task == "sequence_classification" else "tagging",
            "fields": {"text": "sentence"}, "max_length": 32,
        },
        "train": {"max_steps": 2, "micro_batch_size": 4},
    }
    return tiny_recipe(tmp_path / "run", **deep_update(base, changes))


def rows(*items):
    return [Row(item, f"data.jsonl:{i + 1}") for i, item in enumerate(items)]


def section(fmt, **fields):
    return DataSection(train="x.jsonl", format=fmt, fields=fields, max_length=16)


def test_single_label_names_or_indices(tokenizer):
    labels = LabelsSection(names=["neg", "pos"])
    enc, stats = encode_rows(
        rows({"text": "add one", "label": "pos"}, {"text": "what", "label": 0}),
        section("classification"), tokenizer, labels,
    )
    assert [e.target for e in enc] == [1, 0] and stats.kept == 2
    split = TokenizedSplit.from_examples(enc)
    assert split.targets.dtype == np.int64
    batch = collate_padded(split, [0, 1], tokenizer.pad_token_id)
    assert batch["labels"].tolist() == [1, 0] and batch["input_ids"].shape == (2, 2)


def test_pair_multi_label_and_regression_targets(tokenizer):
    pair = section("classification", text="a", text_pair="b")
    (enc,), _ = encode_rows(rows({"a": "add one", "b": "two", "label": 1}), pair, tokenizer,
                            LabelsSection(names=["x", "y"]))
    assert enc.input_ids == tokenizer("add one", "two")["input_ids"] and len(enc.input_ids) == 3
    multi = LabelsSection(names=["a", "b", "c"], problem_type="multi_label")
    (enc,), _ = encode_rows(rows({"text": "one", "label": ["c", 0]}), section("classification"),
                            tokenizer, multi)
    assert enc.target == (1.0, 0.0, 1.0)
    reg = LabelsSection(problem_type="regression")
    (enc,), _ = encode_rows(rows({"text": "one", "label": 2.5}), section("classification"), tokenizer, reg)
    split = TokenizedSplit.from_examples([enc])
    assert split.targets.dtype == np.float32 and split.targets.tolist() == [2.5]


def test_tagging_labels_first_subword_only(tokenizer):
    labels = LabelsSection(names=["O", "B-NUM", "I-NUM"])
    (enc,), _ = encode_rows(
        rows({"tokens": ["add", "seven", "two."], "tags": ["O", "B-NUM", "I-NUM"]}),
        section("tagging"), tokenizer, labels,
    )
    # "two." is two sub-words ("two", "."): only the first carries the tag
    assert len(enc.input_ids) == 4 and enc.labels == [0, 1, 2, IGNORE_INDEX]


def test_cache_round_trip_keeps_targets(tmp_path, tokenizer):
    enc, _ = encode_rows(rows({"text": "one", "label": ["a"]}), section("classification"), tokenizer,
                         LabelsSection(names=["a", "b"], problem_type="multi_label"))
    split = TokenizedSplit.from_examples(enc)
    split.save(tmp_path, "s")
    loaded = TokenizedSplit.load(tmp_path, "s")
    assert loaded.targets.tolist() == [[1.0, 0.0]] and loaded.token_type_ids is None


def test_label_names_inferred_from_data():
    names = labels.infer_label_names(
        rows({"tags": ["I-X", "O", "B-X"]}), "tagging", section("tagging").fields
    )
    assert names == ["O", "B-X", "I-X"]
    names = labels.infer_label_names(
        rows({"label": 2}, {"label": 0}), "classification", section("classification").fields
    )
    assert names == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("fmt", "labels", "row", "message"),
    [
        ("classification", ["neg", "pos"], {"text": "one", "label": "meh"}, "not in the label set"),
        ("classification", ["neg", "pos"], {"text": "one", "label": 2}, "outside the 2 labels"),
        ("classification", ["neg", "pos"], {"text": "one"}, "missing field 'label'"),
        ("tagging", ["O", "B"], {"tokens": ["one", "two"], "tags": ["O"]}, "has 2 words but"),
        ("tagging", ["O", "B"], {"tokens": "one two", "tags": ["O", "O"]}, "list of strings"),
    ],
)
def test_bad_rows_name_file_and_line(tokenizer, fmt, labels, row, message):
    good = {"text": "one", "label": "neg"} if fmt == "classification" else {"tokens": ["one"], "tags": ["O"]}
    with pytest.raises(UserInputError) as e:
        encode_rows(rows(good, row), section(fmt), tokenizer, LabelsSection(names=labels))
    assert e.value.where == "data.jsonl:2" and message in e.value.message


def write_lines(path, items):
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return str(path)


def test_cli_bad_label_exits_2_with_file_line(tmp_path, cli):
    data = write_lines(tmp_path / "d.jsonl", [{"sentence": "one", "label": "pos"}] * 3
                       + [{"sentence": "two", "label": "bad"}])
    recipe = cls_recipe(tmp_path, labels={"names": ["neg", "pos"]},
                        data={"train": data, "validation": None})
    code, _, err = cli("check", write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 2 and f"{data}:4" in err and "'bad' in 'label' is not in the label set" in err


def test_cli_pair_without_second_column_exits_2(tmp_path, cli):
    data = write_lines(tmp_path / "d.jsonl", [{"sentence1": "one", "label": 1}])
    recipe = cls_recipe(tmp_path, data={"train": data, "validation": None,
                                        "fields": {"text": "sentence1", "text_pair": "sentence2"}})
    code, _, err = cli("check", write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 2 and f"{data}:1" in err and "missing field 'sentence2'" in err


def test_cli_mismatched_tags_exit_2(tmp_path, cli):
    data = write_lines(tmp_path / "d.jsonl", [{"tokens": ["one", "two"], "tags": ["O", "B-NUM"]},
                                              {"tokens": ["one", "two"], "tags": ["O"]}])
    recipe = cls_recipe(tmp_path, task="token_classification",
                        data={"train": data, "validation": None, "fields": {}})
    code, _, err = cli("check", write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 2 and f"{data}:2" in err and "2 words but 'tags' has 1 tags" in err


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"data": {"format": "instruction"}}, "data.format"),
        ({"task": "causal_lm", "labels": {"names": ["a", "b"]}, "data": {"format": "text"}}, "labels"),
        ({"labels": {"names": ["a", "a"]}}, "labels.names"),
        ({"labels": {"problem_type": "regression", "names": ["a", "b"]}}, "labels.names"),
        ({"data": {"packing": True}}, "data.packing"),
    ],
)
def test_recipe_rules(tmp_path, changes, field):
    from launcher.recipe import validate_recipe

    recipe = cls_recipe(tmp_path, **changes)
    with pytest.raises(UserInputError) as e:
        validate_recipe(recipe)
    assert field in e.value.where


def test_classification_sections_default(tmp_path):
    recipe = Recipe.model_validate(cls_recipe(tmp_path))
    assert recipe.labels == LabelsSection() and recipe.labels.problem_type == "single_label"


def test_losses_are_sums_normalised_by_target_count():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 4), torch.tensor([0, 3, 1])
    total = classification.loss_sum(logits, labels, "single_label")
    assert torch.allclose(total / classification.target_count(labels, "single_label"),
                          F.cross_entropy(logits, labels))
    hot = torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    total = classification.loss_sum(logits, hot, "multi_label")
    assert torch.allclose(total / classification.target_count(hot, "multi_label"),
                          F.binary_cross_entropy_with_logits(logits, hot))
    tokens = torch.tensor([[0, IGNORE_INDEX], [2, 1]])
    per_token = torch.randn(2, 2, 3)
    assert classification.target_count(tokens, "single_label") == 3
    assert torch.allclose(classification.loss_sum(per_token, tokens, "single_label") / 3,
                          F.cross_entropy(per_token.flatten(0, 1), tokens.flatten()))
    values = torch.tensor([0.5, 1.0, 2.0])
    assert torch.allclose(classification.loss_sum(logits[:, :1], values, "regression") / 3,
                          F.mse_loss(logits[:, 0], values))


def test_merge_refuses_duplicates_and_sorts():
    assert list(task_eval.merge_predictions([[(2, "b")], [(0, "a"), (1, "c")]])) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="twice"):
        task_eval.merge_predictions([[(1, "a")], [(1, "a")]])


def test_metrics_match_sklearn_and_seqeval():
    from seqeval.metrics import f1_score as entity_f1
    from sklearn.metrics import f1_score, roc_auc_score

    gold = np.array([0, 1, 1, 0, 1])
    probs = [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]]
    out = task_eval.sequence_metrics(gold, probs, "single_label")
    pred = np.argmax(probs, -1)
    assert out["eval_accuracy"] == 0.6 and out["eval_f1"] == f1_score(gold, pred)
    assert out["eval_roc_auc"] == roc_auc_score(gold, np.array(probs)[:, 1])
    reg = task_eval.sequence_metrics(np.array([1.0, 2.0, 3.0]), [1.5, 2.0, 3.5], "regression")
    assert reg["eval_spearman"] == pytest.approx(1.0) and reg["eval_pearson"] > 0.9
    names = ["O", "B-NUM", "I-NUM"]
    gold_tags, pred_tags = [[1, 2, 0, 1]], [[1, 2, 0, 0]]
    tags = task_eval.tagging_metrics(gold_tags, pred_tags, names)
    assert tags["eval_f1"] == entity_f1([["B-NUM", "I-NUM", "O", "B-NUM"]],
                                        [["B-NUM", "I-NUM", "O", "O"]])
    assert tags["eval_precision"] == 1.0 and tags["eval_recall"] == 0.5
