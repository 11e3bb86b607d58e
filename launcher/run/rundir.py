"""The run directory: created only after every check passed, reused to resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from launcher.checkpoint.commit import write_atomic
from launcher.errors import UserInputError
from launcher.recipe import Recipe

RESOLVED = "recipe.resolved.yaml"
DS_CONFIG = "ds_config.json"
FREE_TRAIN_FIELDS = {"max_steps", "epochs", "micro_batch_size", "grad_accum", "global_batch_size"}


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
    path = run_dir / RESOLVED
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


def write_run_files(run_dir: Path, recipe: Recipe, ds_config: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    write_atomic(run_dir / RESOLVED, text)
    write_atomic(run_dir / DS_CONFIG, json.dumps(ds_config, indent=2))
