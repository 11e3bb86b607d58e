"""Ctrl-C and SIGTERM on a real driver process: exit 130/143, the resume command on stderr,
no worker left alive, and on SIGTERM (checkpoint.on_preempt) a checkpoint of the step reached
that the printed command resumes from."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml
import pytest

from launcher.checkpoint import commit as ckpt
from launcher.train.metrics import read_metrics
from tests.conftest import ROOT, tiny_recipe, write_recipe

pytestmark = pytest.mark.e2e
STEPS = 40


def recipe_file(tmp_path: Path, **changes) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    base = {"train": {"max_steps": STEPS}, "logging": {"every_steps": 1},
            "data": {"validation": None}, "resources": {"num_workers": 2}}
    base.update(changes)
    return write_recipe(tmp_path / "r.yaml", tiny_recipe(run_dir, **base)), run_dir


def env(tmp_path: Path) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT), "FTLAUNCH_CACHE": str(tmp_path / "cache")}


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path)] if path.is_file() else []


def start_and_signal(
    tmp_path: Path, recipe: Path, run_dir: Path, sig: int, group: bool, backend: str = "torchrun"
):
    """Start the CLI in its own session, wait for step 2, send ``sig`` (to the whole process
    group, as a terminal's Ctrl-C does, or to the driver only, as Kubernetes does)."""
    err = tmp_path / "stderr.txt"
    with err.open("w") as f:
        driver = subprocess.Popen(
            [sys.executable, "-m", "launcher.cli", str(recipe), "--backend", backend,
             "--no-progress"], cwd=ROOT, env=env(tmp_path), stdout=subprocess.DEVNULL,
            stderr=f, start_new_session=True,
        )
    try:
        deadline = time.time() + 300
        while not any(s >= 2 for s in steps_logged(run_dir)):
            assert driver.poll() is None and time.time() < deadline, err.read_text()[-3000:]
            time.sleep(0.2)
        workers = psutil.Process(driver.pid).children(recursive=True)
        assert len(workers) >= 3  # torchrun and its two workers, or Ray's processes
        (os.killpg if group else os.kill)(driver.pid, sig)
        code = driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"left running: {alive}"
    return code, err.read_text()


def resume_command(stderr: str) -> str:
    match = re.search(r"To resume, run:\n  (.+)\n", stderr)
    assert match, stderr[-3000:]
    return match.group(1)


def test_sigterm_commits_the_step_reached_and_the_printed_command_resumes(tmp_path):
    recipe, run_dir = recipe_file(tmp_path)
    code, err = start_and_signal(tmp_path, recipe, run_dir, signal.SIGTERM, group=False)
    assert code == 143, err[-3000:]
    reached = steps_logged(run_dir)[-1]
    assert 2 <= reached < STEPS
    assert [c.step for c in ckpt.committed(run_dir)] == [reached]
    assert not (run_dir / "final").exists()
    done = subprocess.run(["bash", "-c", resume_command(err)], env=env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming at step {reached}" in done.stdout + done.stderr
    assert steps_logged(run_dir) == list(range(1, STEPS + 1))
    assert (run_dir / "final" / "config.json").is_file()


def test_ctrl_c_to_the_group_stops_without_saving(tmp_path):
    recipe, run_dir = recipe_file(tmp_path)
    code, err = start_and_signal(tmp_path, recipe, run_dir, signal.SIGINT, group=True)
    assert code == 130, err[-3000:]
    assert "To resume, run:" in err
    assert ckpt.committed(run_dir) == []


def test_sigterm_without_on_preempt_stops_without_saving(tmp_path):
    recipe, run_dir = recipe_file(tmp_path, checkpoint={"on_preempt": False})
    code, err = start_and_signal(tmp_path, recipe, run_dir, signal.SIGTERM, group=False)
    assert code == 143, err[-3000:]
    assert ckpt.committed(run_dir) == []


def test_ray_sigterm_commits_stops_ray_and_resumes(tmp_path):
    recipe, run_dir = recipe_file(tmp_path)
    code, err = start_and_signal(tmp_path, recipe, run_dir, signal.SIGTERM, False, "ray")
    assert code == 143, err[-3000:]
    reached = steps_logged(run_dir)[-1]
    assert [c.step for c in ckpt.committed(run_dir)] == [reached]
    done = subprocess.run(["bash", "-c", resume_command(err)], env=env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert steps_logged(run_dir) == list(range(1, STEPS + 1))


@pytest.mark.parametrize("path", ["runs/exp #3", "runs/a: b", "runs/-x", "runs/ spaced "])
def test_output_dir_is_taken_literally(cli, tmp_path, path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    target = str(tmp_path / path)
    code, out, err = cli("check", recipe, "--offline", f"--output-dir={target}")
    assert code == 0, err
    assert yaml.safe_load(out.split("# DeepSpeed config")[0])["output_dir"] == target
