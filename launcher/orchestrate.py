"""Ray connection and Ray Train wiring: one TorchTrainer running the worker on every rank."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from launcher.errors import UserInputError
from launcher.ports import free_port
from launcher.recipe import Recipe

QUIET_WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


class TrainingFailed(Exception):
    """Training ended in an error after Ray Train used up its restarts."""


def connect(address: str | None, recipe: Recipe) -> bool:
    """Join ``address`` / RAY_ADDRESS, or start an embedded local Ray. True if started here."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    res = recipe.resources
    start_local_ray(max(os.cpu_count() or 1, int(res.num_workers * res.cpus_per_worker + 0.999)))
    return True


def start_local_ray(num_cpus: int) -> None:
    """A private Ray instance with its own dashboard, and Ray's state API pointed at it.

    Ray Train's placement-group cleaner polls the state API, which otherwise looks up the
    cluster named in /tmp/ray/ray_current_cluster: whatever ``ray start`` last launched on
    this machine, perhaps long gone, in which case every poll waits out a timeout and each
    run ends 12 s late."""
    import ray

    port = free_port()
    ray.init(
        address="local",  # never join a cluster that happens to run here
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_port=port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
        log_to_driver=True,
    )


def check_capacity(recipe: Recipe) -> None:
    """Fail fast, before the run directory exists, when the cluster can never fit the job."""
    import ray

    res = recipe.resources
    total = ray.cluster_resources()
    if res.use_gpu and total.get("GPU", 0) < res.num_workers:
        raise UserInputError(
            "resources.num_workers",
            f"{res.num_workers} GPU workers requested but the Ray cluster has "
            f"{int(total.get('GPU', 0))} GPUs (set resources.use_gpu: false to train on CPU)",
        )
    if total.get("CPU", 0) < res.num_workers * res.cpus_per_worker:
        raise UserInputError(
            "resources.cpus_per_worker",
            f"{res.num_workers} workers x {res.cpus_per_worker} CPUs exceeds the cluster's "
            f"{total.get('CPU', 0):g} CPUs",
        )


def make_trainer(recipe: Recipe, ds_config: dict[str, Any], run_dir: Path) -> Any:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from launcher.worker import train_loop_per_worker

    res = recipe.resources
    per_worker = {"CPU": res.cpus_per_worker} | ({"GPU": 1} if res.use_gpu else {})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "recipe": recipe.model_dump(mode="json"),
            "ds_config": ds_config,
            "run_dir": str(run_dir),
        },
        torch_config=TorchConfig(
            backend="nccl" if res.use_gpu else "gloo", timeout_s=res.collective_timeout_s
        ),
        scaling_config=ScalingConfig(
            num_workers=res.num_workers,
            use_gpu=res.use_gpu,
            resources_per_worker=per_worker,
            placement_strategy=res.placement_strategy,
        ),
        run_config=RunConfig(
            name="ray",
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=recipe.checkpoint.max_failures),
            worker_runtime_env={"env_vars": QUIET_WORKER_ENV | res.worker_env()},
        ),
    )


def run_torchrun(recipe: Recipe, run_dir: Path) -> int:
    """Single node without Ray: torchrun starts one worker process per GPU (or CPU worker)."""
    import subprocess
    import sys

    env = os.environ | QUIET_WORKER_ENV | recipe.resources.worker_env()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={recipe.resources.num_workers}", "-m", "launcher.worker", str(run_dir),
    ]
    return subprocess.run(command, env=env).returncode


def fit(trainer: Any, run_dir: Path, progress: bool, max_failures: int) -> None:
    from ray.train import TrainingFailedError

    from launcher.metrics import ProgressFollower

    before = _attempts(run_dir)
    try:
        with ProgressFollower(run_dir) if progress else nullcontext():
            trainer.fit()
    except TrainingFailedError as e:
        attempts = _attempts(run_dir) - before
        raise TrainingFailed(
            f"{attempts} attempt(s) failed (checkpoint.max_failures={max_failures}); "
            f"last error: {_root_cause(e)}"
        ) from e


def _attempts(run_dir: Path) -> int:
    path = run_dir / "attempts.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _root_cause(error: BaseException) -> str:
    seen = error
    while seen.__cause__ is not None:
        seen = seen.__cause__
    return f"{type(seen).__name__}: {seen}"
