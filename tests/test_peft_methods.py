"""The peft family beyond plain LoRA: DoRA, rsLoRA, IA3, prompt and prefix tuning train, save,
reload and reproduce the trained model's outputs; QLoRA is refused clearly where it cannot run."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from launcher.train.metrics import read_metrics
from tests.conftest import (
    DATA, ROOT, TINY_LLAMA, adapter_moved, probe_matches, tiny_recipe, write_recipe,
)
from tests.test_classification_data import cls_recipe


def train_torchrun(cli, tmp_path, recipe):
    code, _, err = cli(write_recipe(tmp_path / "r.yaml", recipe), "--backend", "torchrun")
    assert code == 0, err
    return tmp_path / "run"


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("method", "section", "flag"),
    [
        ("lora", {"lora": {"r": 8, "alpha": 16, "use_dora": True}}, ("use_dora", True)),
        ("ia3", {}, ("peft_type", "IA3")),
        ("prompt_tuning", {"prompt": {"num_virtual_tokens": 4}}, ("peft_type", "PROMPT_TUNING")),
        ("prefix_tuning", {"prompt": {"num_virtual_tokens": 4}}, ("peft_type", "PREFIX_TUNING")),
    ],
    ids=["dora", "ia3", "prompt", "prefix"],
)
def test_causal_lm_adapters_reload_with_same_outputs(cli, tmp_path, method, section, flag):
    from peft import AutoPeftModelForCausalLM

    recipe = tiny_recipe(
        tmp_path / "run", method=method, **section,
        # IA3 scales and virtual tokens on a frozen random base move the loss slowly: they take
        # a large learning rate
        train={"max_steps": 6, "micro_batch_size": 8, "lr": 1e-2 if method == "lora" else 3e-1},
        resources={"num_workers": 2}, eval={"max_batches": 2, "at_start": True},
    )
    run_dir = train_torchrun(cli, tmp_path, recipe)
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]
    # the adapter trained: the held-out loss fell from the untrained model's
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 6
    assert evals[-1]["eval_loss"] < 0.995 * evals[0]["eval_loss"], evals  # same batches: 0 at init
    adapter_moved(run_dir)
    adapter_config = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert adapter_config[flag[0]] == flag[1]
    probe_matches(run_dir, AutoPeftModelForCausalLM.from_pretrained(str(run_dir / "final")).eval())
    info = json.loads((run_dir / "run_info.json").read_text())
    assert 0 < info["trainable_parameters"] < 10_000


@pytest.mark.e2e
def test_rslora_classifier_reloads_with_same_outputs(cli, tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    # on the tiny BERT with frozen embeddings LoRA finds no signal in a few steps; the tiny
    # Llama base learns the keywords; rsLoRA scales by alpha/sqrt(r), 2.8x LoRA's alpha/r here,
    # and diverges at 3e-2
    recipe = cls_recipe(
        tmp_path, method="lora", lora={"r": 8, "alpha": 16, "use_rslora": True},
        model={"architecture": TINY_LLAMA, "tokenizer": str(DATA / "tokenizer")},
        labels={"names": ["negative", "positive"]},
        train={"max_steps": 20, "micro_batch_size": 8, "lr": 3e-3},
        resources={"num_workers": 2}, eval={"at_start": True},
    )
    run_dir = train_torchrun(cli, tmp_path, recipe)
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 20
    assert evals[-1]["eval_loss"] < 0.8 * evals[0]["eval_loss"], evals  # measured: 0.58x
    adapter_moved(run_dir)
    final = run_dir / "final"
    assert json.loads((final / "adapter_config.json").read_text())["use_rslora"] is True
    assert any(".score." in k for k in load_file(str(final / "adapter_model.safetensors")))  # the head
    probe_matches(run_dir, AutoPeftModelForSequenceClassification.from_pretrained(str(final)).eval())


@pytest.mark.e2e
def test_prompt_tuned_tagger_reloads_with_same_outputs(cli, tmp_path):
    from peft import AutoPeftModelForTokenClassification

    recipe = cls_recipe(
        tmp_path, task="token_classification", method="prompt_tuning",
        prompt={"num_virtual_tokens": 4},
        data={"train": str(DATA / "ner_train.jsonl"), "validation": str(DATA / "ner_val.jsonl"),
              "fields": {}},
        train={"max_steps": 6, "micro_batch_size": 8, "lr": 1e-2},
        resources={"num_workers": 2}, eval={"at_start": True},
    )
    run_dir = train_torchrun(cli, tmp_path, recipe)
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_f1" in r]
    first, last = evals[0], evals[-1]
    # the prompt and the new head trained: the held-out loss fell from initialisation
    assert first["step"] == 0 and last["step"] == 6
    assert last["eval_loss"] < 0.995 * first["eval_loss"], evals  # same batches: 0 at init
    adapter_moved(run_dir)
    final = run_dir / "final"
    assert any(".classifier." in k for k in load_file(str(final / "adapter_model.safetensors")))
    probe_matches(run_dir, AutoPeftModelForTokenClassification.from_pretrained(str(final)).eval())


def llama_prompt_classifier(tmp_path):
    return cls_recipe(
        tmp_path, method="prompt_tuning", prompt={"num_virtual_tokens": 4},
        model={"architecture": TINY_LLAMA, "tokenizer": str(DATA / "tokenizer")},
        labels={"names": ["negative", "positive"]},
    )


@pytest.mark.parametrize(("pad_left", "agrees"), [(True, True), (False, False)])
def test_prompt_tuned_decoder_classifier_pads_left(tmp_path, pad_left, agrees):
    """A decoder classifier under prompt tuning scores the last position: batched with left
    padding it gives each example what it gives it alone; with right padding it does not."""
    from launcher.tasks.classification import model_logits, pads_left
    from launcher.data.pipeline import prepare_data
    from launcher.model.adapters import apply_adapter
    from launcher.model.build import build_model, load_tokenizer
    from launcher.tasks.base import load_task_config
    from launcher.recipe import Recipe
    from launcher.data.batch import Batches

    recipe = Recipe.model_validate(llama_prompt_classifier(tmp_path))
    assert pads_left(recipe.task, recipe.method, "llama") and not pads_left(recipe.task, recipe.method, "bert")
    tokenizer = load_tokenizer(recipe.model)
    config = load_task_config(recipe, tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = apply_adapter(build_model(recipe.model, config, "sdpa", recipe.task), recipe).eval()
    split = prepare_data(recipe.data, tokenizer, 0, recipe.labels).validation
    batches = Batches(split, None, tokenizer.pad_token_id, torch.float32, "sdpa", pad_left)
    rows = np.arange(16)
    assert len(set(split.lengths()[rows].tolist())) > 3  # real padding in the batch
    with torch.no_grad():
        together = model_logits(model, batches.make(rows, torch.device("cpu")))
        alone = torch.cat([model_logits(model, batches.make(rows[i : i + 1], torch.device("cpu")))
                           for i in range(len(rows))])
    assert torch.allclose(together, alone, atol=1e-3) == agrees, (together - alone).abs().max()


@pytest.mark.e2e
def test_prompt_tuned_decoder_classifier_export_predicts_as_evaluated(cli, tmp_path):
    """The export pads as training did, so batched inference with its tokenizer reproduces the
    validation accuracy the run logged."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    recipe = llama_prompt_classifier(tmp_path)
    recipe["train"] = {"max_steps": 30, "micro_batch_size": 8, "lr": 3e-2}
    recipe["resources"]["num_workers"] = 2
    run_dir = train_torchrun(cli, tmp_path, recipe)
    logged = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_accuracy" in r][-1]
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    assert tokenizer.padding_side == "left"
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(run_dir / "final")).eval()
    sentences = [r["sentence"] for r in csv.DictReader((DATA / "sentiment_val.csv").open())]
    labels = [int(r["label"]) for r in csv.DictReader((DATA / "sentiment_val.csv").open())]
    with torch.no_grad():
        batched = model(**tokenizer(sentences, padding=True, return_tensors="pt")).logits.argmax(-1)
        alone = [model(**tokenizer(s, return_tensors="pt")).logits.argmax(-1).item() for s in sentences]
    assert batched.tolist() == alone
    assert 0 < sum(alone) < len(alone)  # not one class for everything
    accuracy = sum(p == y for p, y in zip(alone, labels)) / len(labels)
    assert accuracy == pytest.approx(logged["eval_accuracy"], abs=1e-9), (accuracy, logged)


QLORA = {"output_dir": "/tmp/x", "method": "lora", "model": {"name_or_path": "some/model", "quantization": "nf4"},
         "data": {"train": "t.jsonl", "format": "text"}}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"resources": {"use_gpu": False}}, "need GPUs"),
        ({"method": "full"}, "use method: lora"),
        ({"resources": {"use_gpu": True}, "deepspeed": {"config": "zero3"}}, "ZeRO-3"),
    ],
    ids=["cpu", "not-lora", "zero3"],
)
def test_qlora_refused_where_it_cannot_run(cli, tmp_path, changes, message):
    recipe = {**QLORA, **changes}
    code, _, err = cli("check", "--offline", write_recipe(tmp_path / "q.yaml", recipe))
    assert code == 2 and "model.quantization" in err and message in err, err


def test_ia3_section_only_with_ia3(tmp_path, cli):
    recipe = tiny_recipe(tmp_path / "run", ia3={"target_modules": ["k_proj"]})
    code, _, err = cli("check", write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 2 and "ia3" in err


def test_ia3_targets_must_match(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = tiny_recipe(tmp_path / "run", method="ia3", ia3={"target_modules": ["nope_proj"]})
    code, _, err = cli("check", write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 2 and "ia3.target_modules" in err and "nope_proj" in err
