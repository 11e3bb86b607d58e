"""The ftlaunch-vs-Trainer benchmark runs end to end in its quick CPU configuration."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_quick_cpu_benchmark_prints_both_systems_and_the_ratio(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "vs_hf_trainer.py"),
        "--mode",
        "cpu",
        "--quick",
        "--steps",
        "3",
        "--workdir",
        str(tmp_path),
    ]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    rows = [line.split() for line in lines if line.startswith(("ftlaunch ", "hf_trainer "))]
    assert sorted((r[0], r[1]) for r in rows) == [
        ("ftlaunch", "fixed"),
        ("ftlaunch", "long_tailed"),
        ("hf_trainer", "fixed"),
        ("hf_trainer", "long_tailed"),
    ]
    for row in rows:
        tokens_per_s, memory, eval_loss = (
            float(row[2].replace(",", "")),
            float(row[5]),
            float(row[6]),
        )
        assert tokens_per_s > 0 and memory > 0 and 0 < eval_loss < 10
    assert re.fullmatch(r"ratio long_tailed=\d+\.\d\d fixed=\d+\.\d\d", lines[-1])
