"""Weights & Biases: the resolved recipe as the run config, metrics by step, the run files saved
with the run. ``wandb.init`` reads the WANDB_* variables (WANDB_MODE, WANDB_PROJECT,
WANDB_ENTITY, WANDB_API_KEY ...) for every setting the recipe leaves unset.

A resumed run reopens the same run id (``resume="allow"``). W&B's step only moves forward: a
step below the run's current step is dropped, so after a restart the steps trained again are
skipped here (W&B keeps their first values) and logging continues from the first new step."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from launcher.recipe import Recipe
from launcher.recipe.run_sections import WandbSection


class WandbTracker:
    def __init__(self, section: WandbSection):
        self.section = section
        self.run: Any = None
        self.skipped = 0

    def start(
        self, recipe: Recipe, run_dir: Path, resume_step: int, state: dict[str, Any]
    ) -> dict[str, Any]:
        import wandb

        s = self.section
        self.run = wandb.init(
            project=s.project, entity=s.entity, mode=s.mode, name=s.run_name,
            tags=list(s.tags) or None, id=state.get("id"), resume="allow",
            dir=s.dir or os.environ.get("WANDB_DIR") or str(run_dir),
            config=recipe.model_dump(mode="json"),
            settings=wandb.Settings(console="off"),  # the driver's output stays as it is
        )
        return {"id": self.run.id}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step < self.run.step:
            self.skipped += 1
            return
        self.run.log(metrics, step=step)

    def artifact(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)
