"""Resolve a DeepSpeed preset or file into the exact dict every rank passes to DeepSpeed.

Pure: (recipe, world size, hidden size) -> dict. ``"auto"`` values are filled from the
recipe; explicit values that contradict the recipe are errors, never silently overridden.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from launcher.errors import UserInputError
from launcher.recipe import Recipe
from launcher.recipe.secrets import SECRETS_HELP, secret_key_paths

# The presets ship inside the package (launcher/ds_configs/ in a wheel, mapped there by
# pyproject.toml) and live in the top-level ds_configs/ of a source checkout or editable install.
PRESET_DIRS = (
    Path(__file__).resolve().parents[1] / "ds_configs",
    Path(__file__).resolve().parents[2] / "ds_configs",
)
DEFAULT_BUCKET = 500_000_000
MIN_BUCKET = 1 << 22


def preset_dir() -> Path:
    """Where this installation keeps its DeepSpeed presets."""
    for path in PRESET_DIRS:
        if path.is_dir():
            return path
    raise UserInputError(
        "deepspeed.config",
        f"this ftlaunch installation has no presets (looked in {', '.join(map(str, PRESET_DIRS))}); "
        "reinstall it, or give a path to a .json file",
    )


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.json"))


def load_base_config(name_or_path: str) -> tuple[dict[str, Any], str]:
    """Return the config dict and a label naming where it came from."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise UserInputError("deepspeed.config", f"file not found: {name_or_path}")
    else:
        path = preset_dir() / f"{name_or_path}.json"
        if not path.is_file():
            raise UserInputError(
                "deepspeed.config",
                f"unknown preset '{name_or_path}'; presets: {', '.join(preset_names())} "
                "(or give a path to a .json file)",
            )
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path}:{e.lineno}", f"invalid JSON: {e.msg}") from None


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_ds_config(recipe: Recipe, world_size: int, hidden_size: int | None) -> dict[str, Any]:
    base, source = load_base_config(recipe.deepspeed.config)
    refuse_secrets(base, source)
    config = deep_merge(base, recipe.deepspeed.overrides)
    train = recipe.train
    hidden_sq = max(hidden_size * hidden_size, MIN_BUCKET) if hidden_size else DEFAULT_BUCKET
    expected = {
        ("train_micro_batch_size_per_gpu",): train.micro_batch_size,
        ("gradient_accumulation_steps",): train.grad_accum,
        ("train_batch_size",): train.micro_batch_size * train.grad_accum * world_size,
        ("gradient_clipping",): train.max_grad_norm or 0.0,
        ("bf16", "enabled"): recipe.model.dtype == "bf16",
        ("fp16", "enabled"): recipe.model.dtype == "fp16",
    }
    sizes = {
        ("zero_optimization", "reduce_bucket_size"): hidden_sq,
        ("zero_optimization", "allgather_bucket_size"): hidden_sq,
        ("zero_optimization", "stage3_prefetch_bucket_size"): int(0.9 * hidden_sq),
        ("zero_optimization", "stage3_param_persistence_threshold"): 10 * (hidden_size or 10**5),
    }
    for keys, value in expected.items():
        current = _get(config, keys)
        if current == "auto" or current is None:
            _set(config, keys, value)
        elif current != value:
            raise UserInputError(
                f"deepspeed.config ({source})",
                f"{'.'.join(keys)}={current!r} contradicts the recipe, which gives {value!r}; "
                "set it to \"auto\" or change the recipe",
            )
    for keys, value in sizes.items():
        if _get(config, keys) == "auto":
            _set(config, keys, value)
    leftover = _find_auto(config)
    if leftover:
        raise UserInputError(
            f"deepspeed.config ({source})", f"cannot resolve \"auto\" for {leftover}"
        )
    if config.get("optimizer") or config.get("scheduler"):
        raise UserInputError(
            f"deepspeed.config ({source})",
            "optimizer and scheduler come from the recipe's train section; remove them",
        )
    return config


def refuse_secrets(config: dict[str, Any], source: str) -> None:
    """A secret-looking key in a DeepSpeed JSON file would be copied into ds_config.json (and,
    with ftlaunch submit, into the job's working_dir); refuse it, naming only the key."""
    for path in secret_key_paths(config, "config"):
        raise UserInputError(
            f"deepspeed.config ({source})",
            f"{path.removeprefix('config.')} looks like a secret and would be stored in plain "
            f"text in ds_config.json; {SECRETS_HELP}",
        )


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(config: dict[str, Any]) -> bool:
    device = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device")
    return device in ("cpu", "nvme")


def _get(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    node: Any = config
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _set(config: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def _find_auto(node: Any, prefix: str = "") -> str | None:
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{prefix}.{key}" if prefix else key)
            if found:
                return found
    elif node == "auto":
        return prefix
    return None
