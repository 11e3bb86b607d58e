"""Experiment trackers (logging.trackers) fed by the driver from the run's metrics stream.

The workers write metrics.jsonl and know nothing of trackers; the driver follows the file
(launcher.train.metrics.MetricsFollower) and hands each new record to a :class:`TrackerSet`, so
tracker credentials only need to be in the driver's environment."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.driver.trackers.base import STATUSES, Tracker, numeric, read_state, write_state
from launcher.errors import UserInputError
from launcher.recipe import Recipe
from launcher.recipe.load import load_yaml_with_lines


@dataclass(frozen=True)
class Entry:
    module: str  # launcher.driver.trackers.<module>
    cls: str
    extra: str  # pip install 'ftlaunch[<extra>]'
    needs: tuple[str, ...]  # top-level packages the tracker imports


REGISTRY = {
    "tensorboard": Entry("tensorboard", "TensorBoardTracker", "tensorboard", ("tensorboard",)),
    "mlflow": Entry("mlflow", "MlflowTracker", "mlflow", ("mlflow", "sqlalchemy", "alembic")),
    "wandb": Entry("wandb", "WandbTracker", "wandb", ("wandb",)),
}
ARTIFACTS = ("ds_config.json", "run_info.json", "metrics.jsonl")


def require(recipe: Recipe, recipe_path: str | Path | None = None) -> None:
    """Every tracker the recipe names has its packages installed, or a UserInputError naming
    the field (with the recipe's file:line) and the extra to install."""
    for i, name in enumerate(recipe.logging.trackers):
        entry = REGISTRY[name]
        missing = [m for m in entry.needs if importlib.util.find_spec(m) is None]
        if missing:
            raise UserInputError(
                _where(recipe_path, ("logging", "trackers", i)),
                f"the {name} tracker needs {', '.join(missing)}, which is not installed: "
                f"pip install 'ftlaunch[{entry.extra}]'",
            )


def _where(recipe_path: str | Path | None, path: tuple[Any, ...]) -> str:
    dotted = ".".join(str(p) for p in path)
    if recipe_path is None:
        return dotted
    try:
        _, lines = load_yaml_with_lines(Path(recipe_path))
    except (OSError, UserInputError):
        lines = {}
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return f"{recipe_path}:{lines[path[:end]]}: {dotted}"
    return f"{recipe_path}: {dotted}"  # set by --set, not in the file


def resume_step(run_dir: Path) -> int:
    """The step a (re)started run continues after: its newest committed checkpoint."""
    from launcher.checkpoint.commit import committed

    done = committed(run_dir) if run_dir.is_dir() else []
    return done[0].step if done else 0


class TrackerSet:
    """The recipe's trackers as one metrics consumer: ``start``, then one call per record,
    then ``finish``. A tracker that fails while logging is dropped with a warning; training
    goes on."""

    def __init__(self, recipe: Recipe, run_dir: Path):
        self.recipe, self.run_dir = recipe, run_dir
        self.trackers: dict[str, Tracker] = {}
        self.status = "failed"

    def start(self) -> None:
        state = read_state(self.run_dir)
        resume = resume_step(self.run_dir)
        for name in dict.fromkeys(self.recipe.logging.trackers):
            entry = REGISTRY[name]
            cls = getattr(importlib.import_module(f"{__name__}.{entry.module}"), entry.cls)
            tracker = cls(getattr(self.recipe.logging, name))
            try:
                state[name] = tracker.start(self.recipe, self.run_dir, resume, state.get(name, {}))
            except Exception as e:  # a tracker's own error: bad settings, no credentials
                self.finish()
                raise UserInputError(f"logging.{name}", f"the {name} tracker did not start: {e}") from e
            self.trackers[name] = tracker
            write_state(self.run_dir, state)

    def __call__(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if not isinstance(step, int):
            return
        metrics = numeric(record)
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.log(step, metrics)
            except Exception as e:
                self._drop(name, "logging", e)

    def finish(self) -> None:
        status = self.status if self.status in STATUSES else "failed"
        files = [self.run_dir / n for n in ARTIFACTS if (self.run_dir / n).is_file()]
        for name, tracker in list(self.trackers.items()):
            try:
                for path in files:
                    tracker.artifact(path)
                tracker.finish(status)
            except Exception as e:
                self._drop(name, "finishing", e)
        self.trackers = {}

    def _drop(self, name: str, doing: str, error: Exception) -> None:
        self.trackers.pop(name, None)
        print(f"[ftlaunch] WARNING: the {name} tracker failed while {doing} and is off for "
              f"the rest of this run: {type(error).__name__}: {error}", file=sys.stderr)


@contextmanager
def tracking(recipe: Recipe, run_dir: Path) -> Iterator[TrackerSet | None]:
    """Started trackers for the body (None when the recipe names none); the caller sets
    ``.status`` ('finished', 'killed'), anything else finishes them as 'failed'."""
    if not recipe.logging.trackers:
        yield None
        return
    trackers = TrackerSet(recipe, run_dir)
    trackers.start()
    try:
        yield trackers
    finally:
        trackers.finish()
