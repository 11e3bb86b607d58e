"""The ftlaunch-vs-peers benchmark runs end to end in its quick CPU configuration: ftlaunch
(torchrun backend, to keep it short), the HF Trainer with group_by_length and untuned, TRL's
SFTTrainer with bfd packing and padding-free."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.synthetic_sft import LengthSpec, sample_lengths
from benchmarks.vs_hf_trainer import (
    CPU_JOB, DATASETS, QUICK_JOB, Result, fit_step_time, packed_batch, peer_examples,
)
from launcher.data.pack import group_by_length
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(1200)  # five trainings; a loaded 2-core box with -n 2 doubles their time
def test_quick_cpu_benchmark_prints_every_system_and_the_ratio(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "vs_hf_trainer.py"),
        "--mode",
        "cpu",
        "--quick",
        "--steps",
        "10",  # enough for the held-out loss to fall clearly below the untrained loss
        "--backend",
        "torchrun",
        "--datasets",
        "long_tailed",  # the fixed-length set runs the same code; the benchmark itself runs both
        "--workdir",
        str(tmp_path),
    ]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=1100, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    systems = ("ftlaunch", "hf_grouped", "trl_bfd", "trl_padding_free", "hf_random")
    rows = [line.split() for line in lines if line.split()[:1] and line.split()[0] in systems]
    assert sorted((r[0], r[1]) for r in rows) == sorted(
        (s, "long_tailed") for s in systems)
    for row in rows:
        tokens_per_s, mean_tokens_per_s, memory, eval_loss = (
            float(row[2].replace(",", "")),
            float(row[3].replace(",", "")),
            float(row[5]),
            float(row[6]),
        )
        assert tokens_per_s > 0 and mean_tokens_per_s > 0 and memory > 0
        first_step_s, after_s = float(row[8]), float(row[9])
        assert 0 < first_step_s < 1100 and 0 < after_s < 1100, row
        first_loss, rates = measured(tmp_path, row[0], row[1])
        # it trained: the held-out loss after the run is below the first step's training loss,
        # which the untrained model gave (about ln(vocab) for a random model)
        assert eval_loss < min(first_loss) - 0.05, (row, first_loss)
        # the reported median tokens/s is that of one of the runs, from its own step records
        assert any(abs(tokens_per_s - r) <= 0.5 for r in rates), (row, rates)
    # the ratio is taken against the fastest peer
    peers = {r[0]: float(r[2].replace(",", "")) for r in rows if r[0] != "ftlaunch"}
    strongest = max(peers, key=peers.get)
    assert f"long_tailed: strongest peer {strongest}" in lines
    ratio = float(re.fullmatch(r"ratio long_tailed=(\d+\.\d\d)", lines[-1]).group(1))
    ftlaunch = next(float(r[2].replace(",", "")) for r in rows if r[0] == "ftlaunch")
    # the table rounds tokens/s to whole numbers, the ratio line to 0.01: the ratio of the
    # printed figures may differ by what that rounding allows (much when a peer is slow)
    expected = ftlaunch / peers[strongest]
    rounding = expected * (0.5 / ftlaunch + 0.5 / peers[strongest]) + 0.005
    assert ratio == pytest.approx(expected, abs=rounding + 1e-9)
    # every system is also compared at ftlaunch's real tokens per step
    at = next(line for line in lines if line.startswith("long_tailed: at "))
    steps_tokens = next(float(r[4].replace(",", "")) for r in rows if r[0] == "ftlaunch")
    assert at.startswith(f"long_tailed: at {steps_tokens:,.0f} real tokens per step")
    assert all(f" {s} " in at for s in systems), at


@pytest.mark.parametrize("job", [CPU_JOB, QUICK_JOB], ids=lambda j: j.name)
@pytest.mark.parametrize("dataset", DATASETS)
def test_the_unpacked_peers_get_as_many_real_tokens_per_step_as_ftlaunch(job, dataset):
    """ftlaunch's length groups hold less than their token budget (padded to their longest);
    the peers' examples per micro batch follow what the groups really hold, not the budget."""
    import numpy as np

    spec = LengthSpec(dataset, job.seq_len, job.median_len)
    lengths = sample_lengths(spec, job.train_examples(), np.random.default_rng(0))
    rows, accum = packed_batch(job, float(lengths.mean()))
    groups = group_by_length(lengths, rows * job.seq_len)
    ours = np.mean([lengths[groups.row(r)].sum() for r in range(len(groups))]) * accum
    theirs = peer_examples(job, lengths, (rows, accum)) * job.grad_accum * lengths.mean()
    assert theirs == pytest.approx(ours, rel=0.12)


def test_step_time_fit_compares_runs_at_one_step_size():
    """A run whose step time is 0.05 s plus 0.1 ms per token: its steps of 200 to 3,000
    tokens give back that line; steps of about one size give no line (its slope is noise),
    and a size outside a run's steps is never extrapolated to."""
    tokens = [200.0, 700.0, 3000.0, 1200.0]
    a, b = fit_step_time(tokens, [0.05 + 1e-4 * n for n in tokens])
    assert a == pytest.approx(0.05) and b == pytest.approx(1e-4)
    assert fit_step_time([900.0, 1000.0, 950.0], [0.2, 0.3, 0.1]) is None
    run = Result("hf_grouped", "long_tailed", 5000.0, 4000.0, 900.0, 1.0, 6.0, 6.0, 10.0, 3.0,
                 (a, b), (200.0, 3000.0))
    assert run.tokens_per_s_at(900.0) == pytest.approx(900.0 / 0.14)
    assert run.tokens_per_s_at(100.0) == run.mean_tokens_per_s == 4000.0


def measured(work: Path, system: str, dataset: str) -> tuple[list[float], list[float]]:
    """Each repeat's first-step training loss and median tokens/s over the steps after
    warm-up, read from what the run itself wrote."""
    first, rates = [], []
    for round_dir in sorted(work.glob("*/round*")):  # WORKDIR/JOB/roundN
        if system == "ftlaunch":
            records = [json.loads(line) for line in
                       (round_dir / f"ftlaunch_{dataset}" / "metrics.jsonl").read_text().splitlines()]
            steps = [r for r in records if "tokens" in r]
            first.append(steps[0]["loss"])
            rates.append(statistics.median(r["tokens_per_s"] for r in steps[1:]))
        else:
            rank0 = json.loads((round_dir / f"{system}_{dataset}" / "rank0.json").read_text())
            first.append(rank0["losses"][0])
            ends, counts = rank0["step_ends"], rank0["tokens_per_step"]
            rates.append(statistics.median(
                counts[i] / (ends[i + 1] - ends[i]) for i in range(1, len(counts))))
    assert first, f"no runs of {system} {dataset} under {work}"
    return first, rates


def test_step_breakdown_splits_each_rank_by_the_outermost_part_it_names(tmp_path):
    """py-spy's raw stacks of two processes: samples outside the training loop are left out,
    each sample counts for the outermost part its stack names, and DeepSpeed's backward is
    split into communication and autograd."""
    from benchmarks.step_breakdown import LOOPS, breakdown

    driver = 'process 1:"ftlaunch r.yaml"'
    rank = f'{driver};process 2:"python -m launcher.train.worker run"'
    loop = f"{rank};run (launcher/train/loop.py:67);{LOOPS['ftlaunch']}:171);train_step (x.py:1)"
    engine = "DeepSpeedEngine.backward (deepspeed/runtime/engine.py:1)"
    profile = tmp_path / "raw.txt"
    profile.write_text("\n".join([
        f"{driver};fit (launcher/driver/orchestrate.py:9) 50",  # the driver: not a rank's loop
        f"{rank};import_module (importlib:1) 30",  # the rank before its loop
        f"{loop};{engine};average_tensor (stage_1_and_2.py:1);reduce (c10d.py:1) 2",
        f"{loop};{engine};_engine_run_backward (torch/autograd/graph.py:1) 5",
        f"{loop};DeepSpeedEngine.forward (engine.py:1);chunked_loss_sum (losses.py:1) 2",
        f"{loop};all_reduce (launcher/ranks.py:36) 1",
    ]) + "\n")
    parts = breakdown(profile, LOOPS["ftlaunch"])
    assert list(parts) == ['process 2']
    assert dict(parts['process 2']) == {
        "total": 10,
        "DeepSpeed backward: gradient reduction (comm)": 2,
        "DeepSpeed backward: autograd": 5,
        "model forward": 2,
        "ftlaunch: all-reduce of the step's counts": 1,
    }
    (tmp_path / "flat.txt").write_text("main (x.py:1);f (x.py:2) 3\n")  # no --subprocesses
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_breakdown.py"),
         str(tmp_path / "flat.txt"), "ftlaunch"], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and not done.stdout, done
    assert re.search(r"flat.txt:1: .*--subprocesses", done.stderr), done.stderr
