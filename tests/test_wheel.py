"""A wheel built from the checkout, installed into a fresh venv that cannot see the checkout,
ships every launcher module and the DeepSpeed presets, and trains, exports and reloads a model
from another directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_recipe, write_recipe

# Loads the exported model with the venv's transformers and compares its logits with the probe
# the worker recorded at the end of training.
RELOAD = """
import sys, torch, transformers
from safetensors.torch import load_file
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
probe = load_file(sys.argv[2])
with torch.no_grad():
    logits = model(input_ids=probe["input_ids"]).logits
torch.testing.assert_close(logits, probe["logits"], atol=1e-4, rtol=1e-4)
print("reloaded", type(model).__name__)
"""


def shipped_files(src: Path) -> set[str]:
    """What the wheel must hold: every module of launcher/ and every preset of ds_configs/."""
    modules = {p.relative_to(src).as_posix() for p in (src / "launcher").rglob("*.py")}
    presets = {f"launcher/ds_configs/{p.name}" for p in (src / "ds_configs").glob("*.json")}
    assert presets, "no presets in ds_configs/"
    return modules | presets


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_installed_wheel_trains_exports_and_reloads(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist), "."], cwd=src, check=True)
    wheel = next(dist.glob("*.whl"))
    # a subpackage left out of pyproject's explicit package list is missing from the wheel
    missing = shipped_files(src) - set(zipfile.ZipFile(wheel).namelist())
    assert not missing, f"not in the wheel: {sorted(missing)}"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python, ftlaunch = venv / "bin" / "python", venv / "bin" / "ftlaunch"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["FTLAUNCH_CACHE"] = str(tmp_path / "cache")

    def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)

    where = run(python, "-c", "import launcher; print(launcher.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr
    # the zero2 preset resolves from the installed package data only
    recipe = write_recipe(work / "r.yaml", tiny_recipe(work / "run", deepspeed={"config": "zero2"}))
    check = run(ftlaunch, "check", recipe)
    assert check.returncode == 0, check.stderr
    assert '"stage": 2' in check.stdout

    train = run(ftlaunch, recipe, "--backend", "torchrun", "--no-progress",
                "--set", "train.max_steps=2", "--set", "train.micro_batch_size=2")
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    metrics = (work / "run" / "metrics.jsonl").read_text().splitlines()
    assert [r["step"] for r in map(json.loads, metrics) if "loss" in r] == [1, 2]
    export = run(ftlaunch, "export", work / "run", "--out", work / "exported")
    assert export.returncode == 0, export.stdout[-3000:] + export.stderr[-3000:]
    reload = run(python, "-c", RELOAD, work / "exported", work / "run" / "probe.safetensors")
    assert reload.returncode == 0, reload.stdout[-3000:] + reload.stderr[-3000:]
    assert "reloaded LlamaForCausalLM" in reload.stdout
