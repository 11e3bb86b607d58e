"""What every tracker implements, and the run-directory state that lets a resumed run continue
the same tracker run (RUN_DIR/trackers.json, written atomically)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol

from launcher.durable import write_atomic
from launcher.recipe import Recipe

STATE = "trackers.json"


class Tracker(Protocol):
    """One experiment tracker fed by the driver.

    ``start`` returns the state to keep for a resume (e.g. the tracker's run id); ``state`` is
    what an earlier driver of this run directory kept (empty on a new run). ``resume_step`` is
    the step training continues after: steps above it are logged again."""

    def start(
        self, recipe: Recipe, run_dir: Path, resume_step: int, state: dict[str, Any]
    ) -> dict[str, Any]: ...

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def artifact(self, path: Path) -> None: ...

    def finish(self, status: str) -> None: ...


STATUSES = ("finished", "failed", "killed")


def read_state(run_dir: Path) -> dict[str, dict[str, Any]]:
    path = run_dir / STATE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return state if isinstance(state, dict) else {}


def write_state(run_dir: Path, state: dict[str, dict[str, Any]]) -> None:
    write_atomic(run_dir / STATE, json.dumps(state, indent=2, sort_keys=True))


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numbers, ``step`` left out (strings such as mfu_basis too)."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``; lists and None as JSON text."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(node, (str, int, float, bool)):
        return {prefix: node}
    return {prefix: json.dumps(node)}
