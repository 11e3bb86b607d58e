"""The console of a real run: people see ftlaunch's lines once each and the progress, the
libraries' chatter goes to driver.log; a slowed rank is named as a straggler; the rich view
renders a real run's records."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from conftest import ROOT, tiny_recipe, write_recipe
from launcher.driver.live import PlainView, RichView
from launcher.train.metrics import read_metrics

pytestmark = pytest.mark.e2e

CHATTER = ("FutureWarning", "Setting accelerator to CPU", "deepspeed_shm_comm_op",
           "PreemptionWatcher", "Started a local Ray instance", "Writing model shards")


def launch(tmp_path: Path, backend: str, workers: int, steps: int, env: dict[str, str]):
    """``ftlaunch`` in a process of its own, so that what reaches its stderr (the terminal)
    is exactly what the run printed, the workers' output included."""
    recipe = tiny_recipe(
        tmp_path / "run", resources={"num_workers": workers, "use_gpu": False},
        train={"max_steps": steps, "micro_batch_size": 2, "lr": 1e-3, "seed": 1},
        logging={"progress": True},
    )
    path = write_recipe(tmp_path / "r.yaml", recipe)
    run_env = os.environ | {"FTLAUNCH_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", str(path), "--backend", backend],
        env=run_env | env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "run", proc.stdout + proc.stderr


def ours(terminal: str) -> list[str]:
    return [line for line in terminal.splitlines() if line.startswith("[ftlaunch]")]


def assert_console_for_people(run_dir: Path, terminal: str) -> str:
    for noise in CHATTER:
        assert noise not in terminal, terminal
    lines = ours(terminal)
    assert len(lines) == len(set(lines)), terminal  # each [ftlaunch] line once
    assert any("examples kept" in line for line in lines), terminal
    assert any("checkpoint committed" in line for line in lines), terminal
    assert "model exported and verified" in terminal
    log = (run_dir / "driver.log").read_text()
    assert "FutureWarning" in log and "Setting accelerator to CPU" in log, log
    return log


@pytest.fixture(scope="module")
def slowed(tmp_path_factory):
    """2 torchrun workers, the last one sleeping 0.3 s at the start of every step."""
    return launch(tmp_path_factory.mktemp("slowed"), "torchrun", 2, 10,
                  {"FTLAUNCH_TEST_FAULT": "slow_step:0+", "FTLAUNCH_TEST_SLOW_STEP_S": "0.3"})


@pytest.mark.xdist_group("live_slowed")  # one trained run serves both
def test_torchrun_console_has_no_chatter_and_names_the_straggler(slowed):
    run_dir, terminal = slowed
    assert_console_for_people(run_dir, terminal)
    warnings = [line for line in ours(terminal) if "straggler" in line]
    host = json.loads((run_dir / "run_info.json").read_text())["rank_nodes"][1]
    assert len(warnings) == 1, terminal
    assert warnings[0].startswith(f"[ftlaunch] straggler: rank 1 on {host} is ")
    assert "slower than the median over the last 5 steps" in warnings[0]
    steps = [line for line in terminal.splitlines() if line.startswith("step ")]
    assert len(steps) == 10 and f"straggler rank 1 on {host}" in steps[-1], terminal
    assert "eval_loss" in steps[-1] and "perplexity" in steps[-1]
    for record in read_metrics(run_dir / "metrics.jsonl"):
        fast, slow = record["rank_step_s"]
        assert slow >= 0.3 > fast


@pytest.mark.xdist_group("live_slowed")  # one trained run serves both
def test_rich_view_renders_every_eval_metric_and_the_run_state(slowed):
    run_dir, _ = slowed
    records = read_metrics(run_dir / "metrics.jsonl")
    records[-1] |= {"eval_accuracy": 0.875, "eval_f1": 0.8125}  # as a classifier writes them
    out = io.StringIO()
    view = RichView(run_dir, Console(file=out, force_terminal=True, width=140))
    for record in records:
        view(record)
    view.finish_view()
    text = out.getvalue()
    for shown in ("step 10/10", "accuracy 0.8750", "f1 0.8125", "perplexity", "loss",
                  "grad norm", "lr", "tok/s", "mem", "epoch", "1 (no restarts)",
                  "step_00000010", "straggler rank 1"):
        assert shown in text, (shown, text)
    assert text.count("[ftlaunch] straggler: rank 1") == 1
    plain = io.StringIO()
    PlainView(run_dir, plain)(records[-1])
    assert "accuracy 0.875 | f1 0.812" in plain.getvalue()


def test_ray_console_has_no_chatter_and_each_line_once(tmp_path):
    run_dir, terminal = launch(tmp_path, "ray", 2, 3, {"RAY_DEDUP_LOGS": "0"})
    log = assert_console_for_people(run_dir, terminal)
    assert "PreemptionWatcher" in log and "[ftlaunch] Ray started on this machine: GCS at" in log
    assert "Started a local Ray instance" not in log  # Ray's own start-up lines are muted
    assert "(RayTrainWorker pid=" in log and "[ftlaunch] attention kernel" in log
