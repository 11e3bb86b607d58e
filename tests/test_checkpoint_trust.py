"""Trust at the edges of a run directory: what a checkpoint, an export destination and the
metrics file may hold, and what ftlaunch does with files it did not write.

One real 4-step run (torchrun backend, one worker, dropout on) is shared; each test works on
its own copy, so nothing here depends on test order."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from launcher.checkpoint import commit as ckpt
from launcher.checkpoint.universal import to_universal
from launcher.train.metrics import JsonlSink, read_metrics
from launcher.recipe.run_sections import TrainSection
from launcher.train.schedule import lr_lambda
from tests.conftest import tiny_recipe, write_recipe

pytestmark = pytest.mark.e2e  # the module trains one run that most of its tests examine

TRAIN = {"max_steps": 4, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "seed": 5}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from launcher.cli import main

    tmp = tmp_path_factory.mktemp("trained")
    run_dir = tmp / "run"
    recipe = tiny_recipe(
        run_dir, train=TRAIN, checkpoint={"every_steps": 2}, data={"validation": None},
        model={"architecture": {"attention_dropout": 0.1}},
    )
    assert main([str(write_recipe(tmp / "r.yaml", recipe)), "--backend", "torchrun"]) == 0
    assert [c.step for c in ckpt.committed(run_dir)] == [4, 2]
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path):
    run_dir = tmp_path / "run dir #1"  # a space and a '#' on purpose
    shutil.copytree(trained, run_dir)
    return run_dir


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def plant(path: Path, marker: Path) -> None:
    """A real torch pickle that would create ``marker`` if anything unpickled it."""
    evil = {"module": {}, "evil": _Payload(marker)}
    torch.save(evil, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)


def recommit(step_dir: Path) -> None:
    """Re-hash every file now in ``step_dir`` into its manifest, as a forger would."""
    manifest = ckpt.read_manifest(step_dir)
    entries = ckpt.flush_and_hash(step_dir, ckpt.payload_files(step_dir))
    ckpt.commit(step_dir, entries, {k: v for k, v in manifest.items() if k != "files"})


def newest(run_dir: Path, fallback: Path | None = None) -> tuple[ckpt.Candidate | None, list[str]]:
    warnings: list[str] = []
    found = ckpt.newest_valid(run_dir, 0, 1, lambda problem: [problem], warnings.append, fallback)
    return found, warnings


def step_dir(run_dir: Path, step: int) -> Path:
    return ckpt.checkpoints_dir(run_dir) / ckpt.tag_for(step)


# ---------------------------------------------------------------- stray files and pickles


def test_export_refuses_a_stray_pickle_before_loading_anything(run_copy, cli, tmp_path):
    """zero_to_fp32 globs *_model_states.pt: a file the manifest does not name would be
    unpickled (weights_only=False) although every named file verifies."""
    marker = tmp_path / "payload-ran"
    plant(step_dir(run_copy, 4) / "a_model_states.pt", marker)
    code, _, err = cli("export", run_copy, "--out", tmp_path / "out")
    assert code == 2
    assert "a_model_states.pt is not in its COMMITTED.json" in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_resume_skips_a_checkpoint_with_a_stray_pickle(run_copy, tmp_path):
    marker = tmp_path / "payload-ran"
    plant(step_dir(run_copy, 4) / "zero_pp_rank_1_mp_rank_00_optim_states.pt", marker)
    found, warnings = newest(run_copy)
    assert found.step == 2
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is not in its COMMITTED.json" in warnings[0]
    assert not marker.exists()


def test_a_truncated_or_linked_file_is_refused(run_copy, tmp_path):
    shard = next(step_dir(run_copy, 4).glob("*model_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    other = next(step_dir(run_copy, 2).glob("*optim_states.pt"))
    elsewhere = tmp_path / "elsewhere.pt"
    other.rename(elsewhere)
    other.symlink_to(elsewhere)  # same bytes, same checksum, but not the checkpoint's own file
    assert "bytes, manifest says" in ckpt.problem(step_dir(run_copy, 4))
    assert "is a symbolic link" in ckpt.problem(step_dir(run_copy, 2))
    with pytest.raises(Exception, match="none is committed and intact"):
        newest(run_copy)


def test_a_manifest_naming_files_outside_its_directory_is_not_a_manifest(run_copy):
    path = step_dir(run_copy, 4) / ckpt.MARKER
    manifest = json.loads(path.read_text())
    manifest["files"]["../../recipe.resolved.yaml"] = {"size": 1, "sha256": "0"}
    path.write_text(json.dumps(manifest))
    assert ckpt.read_manifest(step_dir(run_copy, 4)) is None
    found, warnings = newest(run_copy)
    assert found.step == 2 and "malformed" in warnings[0]


def test_an_unchecked_universal_folder_is_set_aside_and_rebuilt(run_copy, tmp_path):
    """to_universal used to reuse any existing universal/ as it was; DeepSpeed then unpickles
    its files with weights_only=False."""
    marker = tmp_path / "payload-ran"
    planted = step_dir(run_copy, 4) / ckpt.UNIVERSAL
    planted.mkdir()
    plant(planted / "mp_rank_00_model_states.pt", marker)
    assert ckpt.problem(step_dir(run_copy, 4)) is None  # universal/ answers to its own manifest
    warnings: list[str] = []
    target = to_universal(step_dir(run_copy, 4), warnings.append)
    assert target == planted and ckpt.tree_problem(target) is None
    assert "not a verified conversion" in warnings[0]
    aside = list(ckpt.checkpoints_dir(run_copy).glob(".step_00000004.universal.rejected.*"))
    assert len(aside) == 1 and (aside[0] / "mp_rank_00_model_states.pt").is_file()  # kept
    assert to_universal(step_dir(run_copy, 4), warnings.append) == target  # reused now
    assert len(warnings) == 1
    assert not marker.exists()


# ---------------------------------------------------------------- what counts as a checkpoint


def test_a_missing_rng_file_is_a_corrupt_checkpoint(run_copy):
    """Without its RNG state a resume would silently draw other dropout masks."""
    (step_dir(run_copy, 4) / "rng_rank00000.safetensors").unlink()
    recommit(step_dir(run_copy, 4))
    found, warnings = newest(run_copy)
    assert found.step == 2
    assert "rng_rank00000.safetensors is missing from the checkpoint" in warnings[0]


def test_an_interrupted_first_save_does_not_block_the_run(trained, tmp_path):
    """Only an uncommitted step_N/ in the run dir: a fresh start, or checkpoint.resume_from."""
    run_dir = tmp_path / "run"
    partial = step_dir(run_dir, 2)
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half a save")
    found, warnings = newest(run_dir)
    assert found is None and "not committed" in warnings[0]
    found, _ = newest(run_dir, fallback=step_dir(trained, 4))
    assert found.path == step_dir(trained, 4)


def test_corrupt_resume_from_names_the_field(run_copy, tmp_path):
    for c in ckpt.committed(run_copy):
        (c.path / "trainer_state.json").write_text("{}")
    with pytest.raises(Exception, match="checkpoint.resume_from"):
        newest(tmp_path / "new", fallback=run_copy)


# ---------------------------------------------------------------- deleting only what is ours


def test_retention_and_resave_never_delete_foreign_files(run_copy):
    mine = step_dir(run_copy, 2)
    (mine / "notes.txt").write_text("the user's")
    assert ckpt.remove_checkpoint(mine) == ["notes.txt"]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert not ckpt.has_marker(mine)  # what is left is no checkpoint any more
    partial = step_dir(run_copy, 1)
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (partial / "keep.me").write_text("y")
    warnings: list[str] = []
    assert ckpt.retain(run_copy, 2, warn=warnings.append) == []
    assert sorted(p.name for p in partial.iterdir()) == ["keep.me"]
    assert any("keep.me" in w for w in warnings)


def test_export_out_never_deletes_what_ftlaunch_did_not_write(run_copy, cli, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    code, _, err = cli("export", run_copy, "--out", theirs)
    assert code == 2 and "thesis.tex" in err and "--out" in err
    assert (theirs / "thesis.tex").read_text() == "years of work"
    a_file = tmp_path / "a file"
    a_file.write_text("x")
    assert cli("export", run_copy, "--out", a_file)[0] == 2 and a_file.read_text() == "x"
    inside = step_dir(run_copy, 4) / "export"
    assert cli("export", run_copy, "--out", inside)[0] == 2 and not inside.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("export", run_copy, "--out", empty)[0] == 0
    assert cli("export", run_copy, "--out", empty, "--checkpoint", "2")[0] == 0  # replaces ours
    assert json.loads((empty / "ftlaunch_export.json").read_text())["step"] == 2
    (empty / "README.md").write_text("my model card")
    code, _, err = cli("export", run_copy, "--out", empty)
    assert code == 2 and "README.md" in err
    assert (empty / "README.md").read_text() == "my model card"
    assert not list(tmp_path.glob(".empty.*"))  # no staging or old copy left behind


# ---------------------------------------------------------------- the end-of-training check


def test_export_compares_only_against_a_probe_of_its_own_step(run_copy, cli, tmp_path):
    """The probe was taken at step 4; with step 4 no longer committed, step 2 is exported
    and must not be compared against step 4's logits."""
    (step_dir(run_copy, 4) / ckpt.MARKER).unlink()
    code, _, err = cli("export", run_copy, "--out", tmp_path / "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "ftlaunch_export.json").read_text())["step"] == 2


def test_export_check_fires_on_a_tampered_shard(run_copy, cli):
    """Weights changed and re-committed (so every checksum passes): the reloaded export no
    longer gives the trained model's logits. Exit 1, final/ untouched, nothing partial."""
    shard = step_dir(run_copy, 4) / "mp_rank_00_model_states.pt"  # what a ZeRO-2 export reads
    state = torch.load(shard, weights_only=False)  # the test's own run: trusted
    with torch.no_grad():
        for weight in state["module"].values():
            if weight.is_floating_point():
                weight.add_(0.5)
    torch.save(state, shard)
    recommit(step_dir(run_copy, 4))
    final = run_copy / "final"
    before = {n: (final / n).read_bytes() for n in ckpt.present_files(final)}
    code, _, err = cli("export", run_copy)
    assert code == 1
    assert "reloaded export vs the model at the end of training" in err
    assert {n: (final / n).read_bytes() for n in ckpt.present_files(final)} == before
    assert sorted(p.name for p in run_copy.iterdir() if p.name.startswith(".final")) == []


# ---------------------------------------------------------------- metrics.jsonl


def test_logged_lr_is_the_rate_of_that_steps_update_and_epoch_follows_the_plan(trained):
    info = json.loads((trained / "run_info.json").read_text())
    factor = lr_lambda(TrainSection.model_validate(TRAIN), info["total_steps"])
    records = [r for r in read_metrics(trained / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["lr"] == pytest.approx(TRAIN["lr"] * factor(r["step"] - 1), rel=1e-9)
        assert r["epoch"] == pytest.approx(r["step"] / info["steps_per_epoch"], rel=1e-12)


def test_a_restart_before_the_first_checkpoint_logs_step_0_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "eval_loss": 4.1}\n{"step": 1, "loss": 4.0}\n')
    JsonlSink(path, 0).close()
    assert read_metrics(path) == []
    path.write_text('{"step": 0, "eval_loss": 4.1}\n{"step": 1, "loss": 4.0}\n{"step": 2, "lo')
    JsonlSink(path, 1).close()
    assert [r["step"] for r in read_metrics(path)] == [0, 1]
