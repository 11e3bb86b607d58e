"""The per-rank entry points; the program itself is launcher.train.loop.run.

Ray Train calls :func:`train_loop_per_worker`; without Ray, ``torchrun -m launcher.train.worker
RUN_DIR`` (or the ``deepspeed`` launcher) runs the same loop on a run directory that a
previous launch prepared.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

from launcher.recipe import Recipe
from launcher.run.rundir import RunDir
from launcher.train.loop import run


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: Ray has already initialised torch.distributed for this worker."""
    import ray.train

    os.environ.setdefault("LOCAL_RANK", str(ray.train.get_context().get_local_rank()))
    recipe = Recipe.model_validate(config["recipe"])
    run(recipe, config["ds_config"], Path(config["run_dir"]))


def main(argv: list[str] | None = None) -> None:
    """torchrun / deepspeed-launcher entry: ``python -m launcher.train.worker RUN_DIR``."""
    import yaml

    files = RunDir(Path((argv or sys.argv[1:])[0]).resolve())
    recipe = Recipe.model_validate(yaml.safe_load(files.resolved.read_text()))
    ds_config = json.loads(files.ds_config.read_text())
    run(recipe, ds_config, files.path)
    gc.freeze()  # as launcher.cli.entry: no collections of everything at exit (1.6-2 s)


if __name__ == "__main__":
    main()
