"""The shipped quickstart, trained in full exactly as README tells a new user to run it, holds
README's figures; running the same command again finds the run finished and only re-exports."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM

from launcher.train.metrics import read_metrics
from tests.conftest import ROOT, probe_matches

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1500)]


def ftlaunch(run_dir, cache):
    """``ftlaunch recipes/quickstart.yaml`` from the repository root, as a user types it."""
    env = {**os.environ, "FTLAUNCH_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "launcher.cli", "recipes/quickstart.yaml",
               "--output-dir", str(run_dir), "--no-progress"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200, check=False)


def test_quickstart_reaches_readme_figures_and_rerun_only_reexports(tmp_path):
    run_dir = tmp_path / "quickstart run"  # a space, as users' paths have
    started = time.monotonic()
    first = ftlaunch(run_dir, tmp_path / "cache")
    print(f"quickstart wall time: {time.monotonic() - started:.0f} s")
    assert first.returncode == 0, first.stderr[-4000:]

    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if "eval_loss" in r]
    start, end = evals[0], evals[-1]
    # README's Quickstart table: eval loss 4.26 -> 0.21, exact match 0.000 -> 0.850
    assert start["step"] == 0 and start["eval_loss"] > 3.5 and start["eval_exact_match"] < 0.05
    assert end["step"] == 300 and end["eval_loss"] < 0.4 and end["eval_exact_match"] >= 0.7, end
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(10, 301, 10))

    final = run_dir / "final"
    exported = {p.name: p.stat().st_mtime_ns for p in final.iterdir()}
    second = ftlaunch(run_dir, tmp_path / "cache")
    assert second.returncode == 0, second.stderr[-4000:]
    assert read_metrics(run_dir / "metrics.jsonl") == records  # no step trained again
    assert "model exported and verified" in second.stderr
    reexported = {p.name: p.stat().st_mtime_ns for p in final.iterdir()}
    assert reexported.keys() == exported.keys()
    assert all(reexported[n] != exported[n] for n in exported), "final/ was not re-exported"
    probe_matches(run_dir, AutoModelForCausalLM.from_pretrained(final).eval())
