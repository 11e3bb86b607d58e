"""TensorBoard: event files under RUN_DIR/tensorboard (or logging.tensorboard.dir).

A resumed run writes on in the same directory with ``purge_step`` set to the first step logged
again, so TensorBoard hides the earlier events of the steps that were trained again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from launcher.driver.trackers.base import flatten
from launcher.recipe import Recipe
from launcher.recipe.run_sections import TensorBoardSection


class TensorBoardTracker:
    def __init__(self, section: TensorBoardSection):
        self.section = section
        self.writer: Any = None
        self.last_step = -1
        self.last_metrics: dict[str, float] = {}
        self.hparams: dict[str, Any] = {}

    def start(
        self, recipe: Recipe, run_dir: Path, resume_step: int, state: dict[str, Any]
    ) -> dict[str, Any]:
        self.dir = Path(self.section.dir) if self.section.dir else run_dir / "tensorboard"
        self._open(purge_step=resume_step + 1)
        self.last_step = resume_step
        dump = recipe.model_dump(mode="json")
        self.hparams = flatten(dump)
        text = yaml.safe_dump(dump, sort_keys=False)
        self.writer.add_text("recipe", _fenced(text, "yaml"), global_step=resume_step)
        return {"dir": str(self.dir)}

    def _open(self, purge_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is not None:
            self.writer.close()
        self.writer = SummaryWriter(str(self.dir), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step <= self.last_step:  # a restart trained these steps again: hide the old ones
            self._open(purge_step=step)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.last_step = step
        self.last_metrics = self.last_metrics | metrics
        self.writer.flush()

    def artifact(self, path: Path) -> None:
        kind = "json" if path.suffix == ".json" else ""
        text = path.read_text(errors="replace")
        self.writer.add_text(f"artifacts/{path.name}", _fenced(text, kind), self.last_step)

    def finish(self, status: str) -> None:
        from torch.utils.tensorboard.summary import hparams

        if self.last_metrics:
            for summary in hparams(self.hparams, self.last_metrics):
                self.writer.file_writer.add_summary(summary, self.last_step)
        self.writer.add_text("status", status, self.last_step)
        self.writer.close()


def _fenced(text: str, kind: str) -> str:
    """Markdown code block (TensorBoard renders text summaries as Markdown)."""
    return f"```{kind}\n{text}\n```"
