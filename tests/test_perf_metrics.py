"""Live performance metrics and the speed settings, end to end: one small LoRA run on two
torchrun workers with ZeRO-3, packing, every-other-layer checkpointing and a chunked loss
small enough that ranks hold different numbers of chunks."""

from __future__ import annotations

import json

import pytest

from launcher.driver.progress import format_progress
from launcher.train.metrics import read_metrics
from launcher.model.build import resolve_attention
from tests.conftest import tiny_recipe, write_recipe

pytestmark = pytest.mark.e2e
STEPS = 3


def test_auto_attention_on_cpu_is_sdpa():
    assert resolve_attention("auto", on_gpu=False) == "sdpa"


def test_metrics_have_throughput_mfu_memory_and_time_split(cli, tmp_path):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(
        run_dir, method="lora",
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        model={"gradient_checkpointing": True, "checkpoint_every": 2, "loss_chunk_size": 16},
        data={"packing": True, "validation": None},
        train={"max_steps": STEPS, "micro_batch_size": 2, "lr": 1e-2},
        deepspeed={"config": "zero3"}, resources={"num_workers": 2},
        logging={"progress": False, "peak_tflops": 0.5},
    )
    code, _, err = cli(write_recipe(tmp_path / "r.yaml", recipe), "--backend", "torchrun")
    assert code == 0, err
    info = json.loads((run_dir / "run_info.json").read_text())
    assert (info["attention"], info["kernels"], info["loss"]) == ("sdpa", "none", "chunked")
    assert info["packing_layout"] == "length_groups"  # sdpa: no block-diagonal mask
    assert info["peak_flops"] == 0.5e12 and info["flops_per_token"] > 0
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        split = r["time_data_s"] + r["time_fwd_bwd_s"] + r["time_optim_s"]
        assert 0 < split <= r["tokens"] / r["tokens_per_s"]
        assert r["mfu_basis"] == "lora"
        expected = info["flops_per_token"] * r["tokens_per_s"] / (2 * 0.5e12)
        assert r["mfu"] == pytest.approx(expected)
        assert 0.1 < r["peak_memory_gb"] < 64
    line = format_progress(records[-1], STEPS, started=0.0)
    assert "MFU" in line and "GB" in line and "tok/s" in line
