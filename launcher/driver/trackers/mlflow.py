"""MLflow through ``MlflowClient`` (no global active run): the resolved recipe as params, the
metrics by step, the run files as artifacts.

Tracking URI: logging.mlflow.tracking_uri, else MLFLOW_TRACKING_URI, else a local SQLite store
in the run directory. A resumed run reopens the same run id; MLflow keeps every value logged,
so a step trained again after a restart holds two values in the metric's history (the later
timestamp is the one training continued from)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from launcher.driver.trackers.base import flatten
from launcher.recipe.run_sections import MlflowSection
from launcher.recipe import Recipe

STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
PARAM_VALUE_LIMIT = 6000  # MLflow's limit on one param value
BATCH = 100  # MLflow's limit on params per log_batch


class MlflowTracker:
    def __init__(self, section: MlflowSection):
        self.section = section
        self.client: Any = None
        self.run_id = ""

    def start(
        self, recipe: Recipe, run_dir: Path, resume_step: int, state: dict[str, Any]
    ) -> dict[str, Any]:
        from mlflow.tracking import MlflowClient

        uri = self.section.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        local = not uri
        uri = uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        shown = redact(uri)
        if state.get("run_id") and state.get("tracking_uri") == shown:
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self._create(recipe, run_dir, local)
        dump = recipe.model_dump(mode="json")
        self.client.log_text(self.run_id, yaml.safe_dump(dump, sort_keys=False), "recipe.resolved.yaml")
        return {"run_id": self.run_id, "tracking_uri": shown}

    def _create(self, recipe: Recipe, run_dir: Path, local: bool) -> str:
        from mlflow.entities import Param

        name = self.section.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "ftlaunch"
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            location = (run_dir / "mlartifacts").resolve().as_uri() if local else None
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        run = self.client.create_run(
            experiment_id, run_name=self.section.run_name, tags=dict(self.section.tags)
        )
        params = [
            Param(key_name(k), str(v)[:PARAM_VALUE_LIMIT])
            for k, v in flatten(recipe.model_dump(mode="json")).items()
        ]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(run.info.run_id, params=params[i : i + BATCH])
        return run.info.run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key_name(k), v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, STATUS[status])


def key_name(key: str) -> str:
    """MLflow accepts letters, digits, ``_ - . / `` and spaces in metric and param names."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", key)


def redact(uri: str) -> str:
    """The URI without a user:password part (trackers.json is plain text)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=host))
