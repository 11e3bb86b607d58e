"""Seconds from a launch's process start to its driver's call of Ray Train's ``fit()``: the
driver's share of the start-up, without the (noisier) Ray Train and worker start that follows.

    python benchmarks/to_fit.py ftlaunch RECIPE.yaml OUTPUT_DIR
    python benchmarks/to_fit.py bare SPEC.json      # benchmarks/bare_ray_deepspeed.py's spec

The process exits at ``fit()`` (its embedded Ray's processes end with it). Another checkout's
ftlaunch is measured with ``PYTHONPATH=THAT_CHECKOUT``. benchmarks/startup.py writes a recipe
and a spec for the same job into its work directory (``r0_ftlaunch_ray/recipe.yaml``,
``r0_bare_ray/spec.json``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil


def exit_at_fit(*_: object, **__: object) -> None:
    started = psutil.Process().create_time()
    print(f"to fit s {time.time() - started:.2f}", file=sys.stderr, flush=True)
    os._exit(0)


def main(argv: list[str]) -> None:
    if argv[0] == "bare":
        from ray.train.torch import TorchTrainer

        TorchTrainer.fit = exit_at_fit
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bare_ray_deepspeed

        bare_ray_deepspeed.main(argv[1])
        return
    from launcher.cli import main as ftlaunch
    from launcher.driver import orchestrate

    orchestrate.fit = exit_at_fit
    ftlaunch([argv[1], "--no-progress", "--output-dir", argv[2]])


if __name__ == "__main__":
    main(sys.argv[1:])
