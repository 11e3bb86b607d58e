"""Never lose work: committed checkpoints, restarts after failures, corrupt and partial
checkpoints, driver death, world-size changes, retention, export and safe loading.

Real local Ray cluster, real DeepSpeed engines; faults come from the launcher's own
FTLAUNCH_TEST_FAULT hook (launcher/train/faults.py) or from a real SIGKILL. Attention dropout is on,
so "resume is exact" depends on the RNG state being restored. Runs that change the world size
turn it off: their data-parallel split of each global batch differs from the reference's, so
their dropout masks would too."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from launcher.checkpoint import commit as ckpt
from launcher.train.metrics import read_metrics
from tests.conftest import ROOT, probe_matches, tiny_recipe, write_recipe

pytestmark = pytest.mark.e2e
STEPS = 8


DROPOUT = {"architecture": {"attention_dropout": 0.1}}
NO_DROPOUT = {"architecture": {"attention_dropout": 0.0}}


def spec(run_dir: Path, **changes):
    base = {
        "model": DROPOUT,
        "train": {"max_steps": STEPS, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "seed": 5},
        "resources": {"num_workers": 2},
        "checkpoint": {"every_steps": 2, "keep_last": 3},
        "data": {"validation": None},
    }
    from tests.conftest import deep_update

    return tiny_recipe(run_dir, **deep_update(base, changes))


def launch(cli, tmp_path: Path, recipe: dict, name: str = "recipe.yaml", *extra: str):
    return cli(write_recipe(tmp_path / name, recipe), *extra)


# Tests of what a checkpoint holds (its format, its trust checks, a changed world size) need no
# restart inside a run: they launch with torchrun, a third faster to start than Ray Train,
# resuming checkpoints the Ray reference run wrote. Restarts and kills stay on Ray.
TORCHRUN = ("--backend", "torchrun")


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def attempts(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    """An uninterrupted 2-worker run that every fault scenario must reproduce."""
    from launcher.cli import main

    tmp = tmp_path_factory.mktemp("reference")
    run_dir = tmp / "run"
    assert main([str(write_recipe(tmp / "r.yaml", spec(run_dir)))]) == 0
    return run_dir


@pytest.fixture(scope="module")
def reference_plain(ray_cluster, tmp_path_factory):
    """The same run without dropout, for the runs that change the world size."""
    from launcher.cli import main

    tmp = tmp_path_factory.mktemp("reference_plain")
    run_dir = tmp / "run"
    assert main([str(write_recipe(tmp / "r.yaml", spec(run_dir, model=NO_DROPOUT)))]) == 0
    return run_dir


def test_reference_keeps_exactly_keep_last(reference):
    assert [c.step for c in ckpt.committed(reference)] == [8, 6, 4]
    assert len(losses(reference)) == STEPS
    assert [a["resume_step"] for a in attempts(reference)] == [0]


def test_worker_crash_restarts_and_matches_uninterrupted(reference, cli, tmp_path):
    run_dir = tmp_path / "run"
    recipe = spec(run_dir, checkpoint={"max_failures": 1}, resources={"env": {"FTLAUNCH_TEST_FAULT": "crash:5"}})
    code, _, err = launch(cli, tmp_path, recipe)
    assert code == 0, err
    assert [a["resume_step"] for a in attempts(run_dir)] == [0, 4]
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-6, abs=1e-6)


def test_retries_exhausted_exit_1_after_max_failures_plus_one(ray_cluster, cli, tmp_path):
    run_dir = tmp_path / "run"
    recipe = spec(run_dir, checkpoint={"max_failures": 1},
                  resources={"env": {"FTLAUNCH_TEST_FAULT": "crash:3:always"}})
    code, _, err = launch(cli, tmp_path, recipe)
    assert code == 1
    assert "2 attempt(s) failed (checkpoint.max_failures=1)" in err
    assert len(attempts(run_dir)) == 2


def test_crash_during_save_resumes_from_previous_commit(reference, cli, tmp_path):
    run_dir = tmp_path / "run"
    recipe = spec(run_dir, checkpoint={"max_failures": 1}, resources={"env": {"FTLAUNCH_TEST_FAULT": "save:4"}})
    code, out, err = launch(cli, tmp_path, recipe)
    assert code == 0, err
    assert [a["resume_step"] for a in attempts(run_dir)] == [0, 2]
    assert any("step_00000004: not committed" in s for s in attempts(run_dir)[1]["skipped"])
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-6, abs=1e-6)
    assert [c.step for c in ckpt.committed(run_dir)] == [8, 6, 4]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_stray_pickle_and_bit_flip_are_skipped_and_nothing_runs(reference, cli, tmp_path):
    """A pickle dropped into a committed checkpoint, under a name DeepSpeed's resume would
    glob, is refused unread; a bit flip fails its checksum; the run resumes before both."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "final")
    marker = tmp_path / "payload-ran"
    stray = run_dir / "checkpoints" / "step_00000008" / "zero_pp_rank_2_mp_rank_00_optim_states.pt"
    torch.save({"evil": _Payload(marker)}, stray, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    _flip_byte(next((run_dir / "checkpoints" / "step_00000006").glob("*optim_states.pt")))
    recipe = spec(run_dir)
    code, out, err = launch(cli, tmp_path, recipe, "recipe.yaml", *TORCHRUN)
    assert code == 0, err
    last = attempts(run_dir)[-1]
    assert last["resume_step"] == 4
    assert "step_00000008" in last["skipped"][0] and stray.name in last["skipped"][0]
    assert "step_00000006" in last["skipped"][1] and "checksum" in last["skipped"][1]
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-6, abs=1e-6)
    assert not marker.exists()
    aside = list((run_dir / "checkpoints").glob(".step_00000008.set-aside.*"))
    assert [f.name for f in aside[0].iterdir()] == [stray.name]  # not ftlaunch's: kept, aside


def test_nothing_valid_is_an_error_not_a_fresh_start(reference, cli, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for c in ckpt.committed(run_dir):
        _flip_byte(next(c.path.glob("*model_states.pt")))
    before = (run_dir / "metrics.jsonl").read_text()
    code, _, err = launch(cli, tmp_path, spec(run_dir), "recipe.yaml", *TORCHRUN)
    assert code == 1
    assert "none is committed and intact" in err
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert len(attempts(run_dir)) == 1


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_on_a_different_world_size(reference_plain, cli, tmp_path, first, second):
    """The global batch stays the same (accumulation makes up for fewer workers), so the
    continued run must track the uninterrupted one."""
    run_dir = tmp_path / "run"
    shape = lambda n: {"num_workers": n}  # noqa: E731
    accum = lambda n: {"grad_accum": 2 // n}  # noqa: E731
    crashed = spec(run_dir, resources=shape(first) | {"env": {"FTLAUNCH_TEST_FAULT": "crash:5"}},
                   train=accum(first), model=NO_DROPOUT)
    assert launch(cli, tmp_path, crashed, "recipe.yaml", *TORCHRUN)[0] == 1
    again = spec(run_dir, resources=shape(second), train=accum(second), model=NO_DROPOUT)
    code, out, err = launch(cli, tmp_path, again, "again.yaml", *TORCHRUN)
    assert code == 0, err
    last = attempts(run_dir)[-1]
    assert (last["resume_step"], last["world"], last["universal"]) == (4, second, True)
    assert losses(run_dir) == pytest.approx(losses(reference_plain), rel=1e-4, abs=1e-4)


def test_zero3_resume_on_fewer_workers(cli, tmp_path):
    """ZeRO-3 checkpoints convert to the universal format too. DeepSpeed's ZeRO-3 universal
    load is not bit-exact: parameters, fp32 master weights, Adam moments and step load
    identically (checked by hand), yet the next updates differ slightly, on an unchanged world
    size as well (ZeRO-2's is exact). Measured here: 1e-5 relative after one step, 6e-4 after
    three; hence the looser tolerance."""
    zero3 = {"config": "zero3"}
    reference = tmp_path / "reference"
    plain = spec(reference, deepspeed=zero3, model=NO_DROPOUT)
    assert launch(cli, tmp_path, plain, "reference.yaml", *TORCHRUN)[0] == 0
    run_dir = tmp_path / "run"
    crashed = spec(run_dir, deepspeed=zero3, model=NO_DROPOUT,
                   resources={"num_workers": 2, "env": {"FTLAUNCH_TEST_FAULT": "crash:5"}})
    assert launch(cli, tmp_path, crashed, "recipe.yaml", *TORCHRUN)[0] == 1
    fewer = spec(run_dir, deepspeed=zero3, resources={"num_workers": 1}, train={"grad_accum": 2},
                 model=NO_DROPOUT)
    code, _, err = launch(cli, tmp_path, fewer, "again.yaml", *TORCHRUN)
    assert code == 0, err
    last = attempts(run_dir)[-1]
    assert (last["resume_step"], last["world"], last["universal"]) == (4, 1, True)
    assert losses(run_dir)[:5] == pytest.approx(losses(reference)[:5], rel=1e-6)
    assert losses(run_dir) == pytest.approx(losses(reference), rel=2e-3)


def committed_and_held(run_dir: Path, step: int, deadline: float, alive=lambda: True) -> None:
    """Wait until checkpoint ``step`` is committed and the last rank sits in the injected hang
    (so the run can neither finish nor save again before it is killed)."""
    hang = run_dir / f".fault_hang_{step}"
    while not (hang.exists() and any(c.step == step for c in ckpt.committed(run_dir))):
        assert alive(), "the run ended before it could be killed"
        assert time.time() < deadline, "the run never reached the step to be killed at"
        time.sleep(0.2)


def wait_gone(procs: list[psutil.Process], seconds: float) -> None:
    _, alive = psutil.wait_procs(procs, timeout=seconds)
    assert not alive, f"still running after SIGKILL: {[p.pid for p in alive]}"


HELD = {"collective_timeout_s": 600, "env": {"FTLAUNCH_TEST_FAULT": "hang:6"}}


def test_driver_sigkill_then_same_command_resumes(reference, ray_cluster, cli, tmp_path):
    """kill -9 of the driver's whole process group mid-run (Ray and its workers die with it);
    the same command then resumes from the newest commit and matches the uninterrupted run."""
    run_dir = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", spec(run_dir, resources=HELD))
    driver = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", str(path), "--no-progress"], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        committed_and_held(run_dir, 6, time.time() + 300, lambda: driver.poll() is None)
        tree = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        wait_gone(tree, 60)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert [c.step for c in ckpt.committed(run_dir)][0] == 6
    code, _, err = cli(path)  # the fault fired once: this time nothing hangs
    assert code == 0, err
    assert attempts(run_dir)[-1]["resume_step"] == 6
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, STEPS + 1))
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-6, abs=1e-6)
    probe_matches(run_dir, AutoModelForCausalLM.from_pretrained(run_dir / "final").eval())


def test_worker_sigkill_restarts_and_matches_uninterrupted(reference, cli, tmp_path):
    """An external kill -9 of one training worker: Ray Train restarts the group
    (checkpoint.max_failures: 1), which resumes from the newest commit."""
    run_dir = tmp_path / "run"
    held = HELD | {"env": HELD["env"] | {"FTLAUNCH_TEST_RUN": str(run_dir)}}
    recipe = spec(run_dir, checkpoint={"max_failures": 1}, resources=held)
    killed: list[int] = []

    def kill_one_worker() -> None:
        committed_and_held(run_dir, 6, time.time() + 300)
        workers = [p for p in psutil.Process().children(recursive=True) if _runs(p, run_dir)]
        victim = min(workers, key=lambda p: p.pid)
        victim.send_signal(signal.SIGKILL)
        killed.append(victim.pid)
        wait_gone([victim], 30)

    import threading

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    code, _, err = launch(cli, tmp_path, recipe)
    killer.join(timeout=60)
    assert killed, "no worker of this run was found to kill"
    assert code == 0, err
    assert [a["resume_step"] for a in attempts(run_dir)] == [0, 6]
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-6, abs=1e-6)


def _runs(proc: psutil.Process, run_dir: Path) -> bool:
    """A Ray Train worker of this run (its environment carries the run's tag)."""
    try:
        tagged = proc.environ().get("FTLAUNCH_TEST_RUN") == str(run_dir)
        return tagged and "RayTrainWorker" in " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def test_zero3_full_export_matches_and_zero_to_fp32_reads_it(cli, tmp_path):
    run_dir = tmp_path / "run"
    recipe = spec(run_dir, deepspeed={"config": "zero3"}, train={"max_steps": 4},
                  checkpoint={"every_steps": None, "every_minutes": 0.0001, "keep_last": 2})
    code, _, err = launch(cli, tmp_path, recipe, "recipe.yaml", *TORCHRUN)
    assert code == 0, err
    assert [c.step for c in ckpt.committed(run_dir)] == [4, 3]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    probe_matches(run_dir, model)
    out = tmp_path / "fp32"
    subprocess.run(
        [sys.executable, str(run_dir / "checkpoints" / "zero_to_fp32.py"), str(run_dir / "checkpoints"),
         str(out), "--tag", "step_00000004", "--safe_serialization"],
        check=True, capture_output=True,
    )
    theirs = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    ours = model.state_dict()
    assert theirs and all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_export_merges_lora(cli, tmp_path):
    run_dir = tmp_path / "run"
    recipe = spec(run_dir, method="lora", train={"max_steps": 2, "lr": 5e-2},
                  lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    assert launch(cli, tmp_path, recipe, "recipe.yaml", *TORCHRUN)[0] == 0
    code, out, err = cli("export", run_dir, "--merge-lora", "--out", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in merged.state_dict())
    probe_matches(run_dir, merged)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_refused_and_never_runs(reference, cli, tmp_path):
    """Even with a manifest that vouches for it, a checkpoint whose pickle would import
    anything beyond tensors and DeepSpeed's state classes is refused unread."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    marker = tmp_path / "payload-ran"
    newest = ckpt.committed(run_dir)[0].path
    shard = next(newest.glob("*model_states.pt"))
    torch.save({"module": {}, "evil": _Payload(marker)}, shard, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    manifest = ckpt.read_manifest(newest)
    entries = ckpt.flush_and_hash(newest, sorted(manifest["files"]))
    ckpt.commit(newest, entries, {k: v for k, v in manifest.items() if k != "files"})
    code, _, err = cli("export", run_dir, "--checkpoint", "8")
    assert code == 2 and "could run code" in err
    assert not marker.exists()
    warnings = []
    chosen = ckpt.newest_valid(run_dir, 0, 1, lambda problem: [problem], warnings.append)
    assert chosen.step == 6 and "could run code" in warnings[0]
    assert not marker.exists()


def test_retention_never_deletes_newest_and_clears_partials(tmp_path):
    run_dir = tmp_path / "run"
    shard = "mp_rank_00_model_states.pt"
    for step in (2, 4, 6, 8):
        path = ckpt.checkpoints_dir(run_dir) / ckpt.tag_for(step)
        path.mkdir(parents=True)
        (path / shard).write_text("x")
        if step != 4:
            ckpt.commit(path, ckpt.flush_and_hash(path, [shard]), {"step": step, "world_size": 1})
    partial_newest = ckpt.checkpoints_dir(run_dir) / ckpt.tag_for(10)
    partial_newest.mkdir()
    removed = ckpt.retain(run_dir, keep_last=2)
    assert sorted(p.name for p in removed) == ["step_00000002", "step_00000004"]
    assert [c.step for c in ckpt.committed(run_dir)] == [8, 6]
    assert partial_newest.is_dir()


def test_hung_collective_becomes_a_failure(ray_cluster, cli, tmp_path):
    run_dir = tmp_path / "run"
    recipe = spec(run_dir, resources={"collective_timeout_s": 15, "env": {"FTLAUNCH_TEST_FAULT": "hang:3"}})
    began = time.time()
    code, _, err = launch(cli, tmp_path, recipe)
    assert code == 1
    assert "1 attempt(s) failed" in err
    assert time.time() - began < 240
    assert [c.step for c in ckpt.committed(run_dir)] == [2]
    # resources.hang_dump_s defaults to half the collective timeout: the stacks came first
    assert "no step for 7.5 s: stacks of every rank in" in err
    (event,) = [p for p in (run_dir / "hang").iterdir() if not p.name.startswith(".")]
    assert "in fault_point" in (event / "rank1.txt").read_text()


def test_resume_from_another_runs_checkpoint(reference, cli, tmp_path):
    """Also when the run directory already holds an interrupted first save: that is no
    checkpoint, so it neither blocks the start nor hides checkpoint.resume_from."""
    run_dir = tmp_path / "run"
    partial = ckpt.checkpoints_dir(run_dir) / ckpt.tag_for(2)
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half a save")
    recipe = spec(run_dir, checkpoint={"resume_from": str(reference / "checkpoints" / "step_00000006")})
    code, _, err = launch(cli, tmp_path, recipe, "recipe.yaml", *TORCHRUN)
    assert code == 0, err
    assert attempts(run_dir)[0]["resume_step"] == 6
    assert losses(run_dir) == pytest.approx(losses(reference)[6:], rel=1e-6, abs=1e-6)


def test_a_diverged_run_fails_and_checkpoints_no_nan_step(ray_cluster, cli, tmp_path):
    """Rank 0's loss is NaN from step 3 on (a diverged model, as bf16 makes one: DeepSpeed
    applies its NaN update). The save due at step 4 is not made, so the good checkpoint of
    step 2 is the newest; the run fails at once, naming the steps, instead of training on."""
    run_dir = tmp_path / "run"
    recipe = spec(run_dir, train={"nonfinite_loss_steps": 2}, checkpoint={"max_failures": 0},
                  resources={"env": {"FTLAUNCH_TEST_FAULT": "nan_loss:2+"}})
    code, _, err = launch(cli, tmp_path, recipe)
    assert code == 1, err
    assert ("NonFiniteLossError: the loss was nan at steps 3-4 (train.nonfinite_loss_steps=2): "
            "the run diverged") in err, err
    assert "the newest committed checkpoint is step 2" in err
    assert [c.step for c in ckpt.committed(run_dir)] == [2]
    logged = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert len(logged) == 4 and all(map(math.isfinite, logged[:2])), logged
    assert all(map(math.isnan, logged[2:])), logged
    assert not (run_dir / "final").exists()


def test_one_nan_batch_is_not_checkpointed_and_the_run_goes_on(cli, tmp_path):
    """A single bad step (the save due at step 4, whose loss is NaN, is skipped; fp32's
    DeepSpeed skips its update, the gradient norm being NaN): the run finishes and exports."""
    run_dir = tmp_path / "run"
    recipe = spec(run_dir, resources={"env": {"FTLAUNCH_TEST_FAULT": "nan_loss:3"}})
    code, _, err = launch(cli, tmp_path, recipe, "recipe.yaml", *TORCHRUN)
    assert code == 0, err
    assert [c.step for c in ckpt.committed(run_dir)] == [8, 6, 2]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert math.isnan(records[3]["loss"]) and records[3]["grad_norm"] == float("inf")
    assert all(math.isfinite(r["loss"]) for r in records if r["step"] != 4)
    assert (run_dir / "final" / "config.json").is_file()
