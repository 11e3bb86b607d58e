"""End to end through a real local Ray cluster and real DeepSpeed engines on CPU."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from launcher.checkpoint.commit import committed
from launcher.train.metrics import read_metrics
from tests.conftest import probe_matches, tiny_recipe, write_recipe

pytestmark = pytest.mark.e2e


def train(cli, tmp_path, **changes):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(run_dir, **changes)
    code, out, err = cli(write_recipe(tmp_path / "recipe.yaml", recipe))
    assert code == 0, err
    return run_dir


def assert_contract(run_dir, steps, fall=0.75):
    for name in ("recipe.resolved.yaml", "ds_config.json", "metrics.jsonl", "checkpoints", "final"):
        assert (run_dir / name).exists(), name
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys()
        assert r["tokens_per_s"] > 0
    evals = [r for r in records if "eval_loss" in r]
    assert evals and evals[-1]["step"] == steps
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-3:]) / 3
    assert last < fall * first, (first, last)
    assert committed(run_dir)[0].step == steps
    return records


def test_full_finetune_zero2_two_workers(ray_cluster, cli, tmp_path):
    run_dir = train(
        cli, tmp_path,
        train={"max_steps": 24, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 2},
        resources={"num_workers": 2}, checkpoint={"every_steps": 8, "keep_last": 2},
        eval={"every_steps": 12},
    )
    assert_contract(run_dir, 24)
    assert [c.step for c in committed(run_dir)] == [24, 16]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    probe_matches(run_dir, model)
    assert json.loads((run_dir / "ds_config.json").read_text())["train_batch_size"] == 16


def test_lora_zero3_gradient_checkpointing_two_workers(ray_cluster, cli, tmp_path):
    from peft import AutoPeftModelForCausalLM

    run_dir = train(
        cli, tmp_path, method="lora",
        lora={"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
        model={"gradient_checkpointing": True},
        train={"max_steps": 20, "micro_batch_size": 8, "lr": 2e-2, "warmup_steps": 2},
        deepspeed={"config": "zero3"}, resources={"num_workers": 2},
        eval={"every_steps": 10},
    )
    assert_contract(run_dir, 20, fall=0.97)  # LoRA on a random base learns slowly
    final = run_dir / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    # peft initialises every lora_B to zero: a B still zero means that adapter never trained
    assert all(adapter[k].abs().max() > 0 for k in adapter if "lora_B" in k)
    model = AutoPeftModelForCausalLM.from_pretrained(str(final)).eval()
    probe_matches(run_dir, model)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert 0 < info["trainable_parameters"] < 20_000


def test_torchrun_backend_without_ray(cli, tmp_path):
    """The same worker under torchrun: 2 processes, ZeRO-1, no Ray anywhere."""
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(
        run_dir, train={"max_steps": 6, "micro_batch_size": 4, "lr": 3e-3},
        deepspeed={"config": "zero1"}, resources={"num_workers": 2}, data={"validation": None},
    )
    code, _, err = cli(write_recipe(tmp_path / "r.yaml", recipe), "--backend", "torchrun")
    assert code == 0, err
    assert not (run_dir / "ray").exists()
    assert json.loads((run_dir / "run_info.json").read_text())["world_size"] == 2
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    # it trained: the last steps' loss is below the first step's (the untrained model's)
    last = sum(r["loss"] for r in records[-2:]) / 2
    assert last < 0.95 * records[0]["loss"], [r["loss"] for r in records]
    probe_matches(run_dir, AutoModelForCausalLM.from_pretrained(run_dir / "final").eval())
