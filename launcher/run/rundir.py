"""The run directory: every file name in it, created only after every check passed, and
reused to resume."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher.durable import write_atomic
from launcher.errors import UserInputError
from launcher.recipe import Recipe

RESOLVED = "recipe.resolved.yaml"
DS_CONFIG = "ds_config.json"


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory, by what they hold."""

    path: Path

    @property
    def resolved(self) -> Path:  # the validated recipe every worker reads
        return self.path / RESOLVED

    @property
    def ds_config(self) -> Path:
        return self.path / DS_CONFIG

    @property
    def metrics(self) -> Path:  # one JSON object per logged step
        return self.path / "metrics.jsonl"

    @property
    def run_info(self) -> Path:  # total steps, kernels, data statistics
        return self.path / "run_info.json"

    @property
    def attempts(self) -> Path:  # one line per (re)start of the worker group
        return self.path / "attempts.jsonl"

    @property
    def probe(self) -> Path:  # the trained model's logits, checked by export
        return self.path / "probe.safetensors"

    @property
    def stop_request(self) -> Path:  # written by the driver on SIGINT/SIGTERM
        return self.path / "STOP.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best(self) -> Path:  # the step of the best evaluation (eval.early_stopping)
        return self.checkpoints / "best.json"

    @property
    def final(self) -> Path:  # the exported model
        return self.path / "final"

    @property
    def driver_log(self) -> Path:  # what the run printed that is not for people
        return self.path / "driver.log"

    @property
    def hang(self) -> Path:  # stack dumps when no step completes (resources.hang_dump_s)
        return self.path / "hang"

    ray_storage_name = "ray"  # Ray Train's own run state, under the run directory

    def fault_marker(self, kind: str, step: int | str) -> Path:
        return self.path / f".fault_{kind}_{step}"


FREE_TRAIN_FIELDS = {
    "max_steps", "epochs", "micro_batch_size", "grad_accum", "global_batch_size",
    "nonfinite_loss_steps",
}


def material(recipe: Recipe) -> dict[str, Any]:
    """What a checkpoint's meaning depends on. Changing these between a run and its resume
    would silently train something else; the global batch counts, not how it is split."""
    dump = recipe.model_dump(mode="json")
    data = {k: v for k, v in dump["data"].items() if k != "cache_dir"}
    train = {k: v for k, v in dump["train"].items() if k not in FREE_TRAIN_FIELDS}
    return {
        "task": dump["task"], "method": dump["method"], "model": dump["model"],
        "lora": dump["lora"], "labels": dump.get("labels"), "data": data, "train": train,
        **{k: dump.get(k) for k in ("ia3", "prompt", "distill")},
        "global_batch_size": recipe.global_batch_size,
    }


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def load_resolved(run_dir: Path) -> Recipe | None:
    path = RunDir(run_dir).resolved
    if not path.is_file():
        return None
    return Recipe.model_validate(yaml.safe_load(path.read_text()))


def check_resumable(run_dir: Path, recipe: Recipe, allow_change: bool) -> bool:
    """True when ``run_dir`` holds an earlier run of this recipe (to be resumed)."""
    previous = load_resolved(run_dir)
    if previous is None:
        return False
    changed = differences(material(previous), material(recipe))
    if changed and not allow_change:
        raise UserInputError(
            str(run_dir / RESOLVED),
            "this run directory holds a run of a different recipe; changed fields:\n  "
            + "\n  ".join(changed)
            + "\nuse another output_dir, or --allow-recipe-change to resume anyway",
        )
    return True


FULL_BELOW_BYTES = 1 << 20


def full_disk_note(run_dir: Path) -> str:
    """For a failure message: a sentence when the run directory's filesystem is full (a save
    cut short by it surfaces in a worker as an OSError, or as torch's "iostream error")."""
    try:
        free = shutil.disk_usage(run_dir).free
    except OSError:
        return ""
    if free >= FULL_BELOW_BYTES:
        return ""
    return (f"; the filesystem of {run_dir} is full ({free} bytes free): free space there, then "
            "run the same command to resume from the newest committed checkpoint")


def check_creatable(run_dir: Path) -> None:
    """Before anything starts: ``run_dir`` is a directory, or can be made one. Tried by
    creating and removing an empty directory in its first existing ancestor, since permission
    bits say nothing for root, a read-only filesystem, a full disk or a pseudo-filesystem."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError("output_dir", f"{existing} is not a directory, so {run_dir} "
                             "cannot be created")
    try:
        Path(tempfile.mkdtemp(prefix=".ftlaunch-probe-", dir=existing)).rmdir()
    except OSError as e:
        raise UserInputError(
            "output_dir", f"{run_dir} cannot be written: creating a directory in {existing} "
            f"failed ({e.strerror or e})",
        ) from None


def write_run_files(run_dir: Path, recipe: Recipe, ds_config: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    write_atomic(run_dir / RESOLVED, text)
    write_atomic(run_dir / DS_CONFIG, json.dumps(ds_config, indent=2))
