"""A wheel built from the checkout, installed into a fresh venv that cannot see the checkout,
resolves the DeepSpeed presets it ships."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_recipe, write_recipe


@pytest.mark.e2e
def test_installed_wheel_resolves_presets(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist), "."], cwd=src, check=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    wheel = next(dist.glob("*.whl"))
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import launcher; print(launcher.__file__)"],
                           cwd=work, env=env, check=True, capture_output=True, text=True)
    assert Path(where.stdout.strip()).is_relative_to(venv)
    recipe = write_recipe(work / "r.yaml", tiny_recipe(work / "run", deepspeed={"config": "zero2"}))
    check = subprocess.run([str(venv / "bin" / "ftlaunch"), "check", str(recipe)], cwd=work,
                           env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert '"stage": 2' in check.stdout
