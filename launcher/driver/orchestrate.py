"""Ray connection and Ray Train wiring: one TorchTrainer running the worker on every rank."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.driver import console
from launcher.errors import UserInputError
from launcher.jobs.address import check_cluster_answers
from launcher.driver.ports import free_port
from launcher.recipe import Recipe
from launcher.recipe.run_sections import ResourcesSection
from launcher.driver.stop import Signals
from launcher.run.rundir import RunDir

if TYPE_CHECKING:
    from launcher.driver.progress import Consumer

QUIET_WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"} | console.WORKER_ENV


class TrainingFailed(Exception):
    """Training ended in an error after Ray Train used up its restarts."""


def connect(address: str | None, res: ResourcesSection, logging_level: int = logging.INFO) -> bool:
    """Join ``address`` / RAY_ADDRESS, or start an embedded local Ray. True if connected
    here: the caller then calls ``ray.shutdown()``, which stops an embedded Ray, and on an
    external cluster ends this job, so Ray reclaims its actors (the workers) and nothing else.
    ``logging_level``: the level ``ray.init`` gives the driver's ``ray`` logger."""
    import ray

    console.reroute()  # what Ray says from here on (at logging_level and up) goes to driver.log
    named = address or os.environ.get("RAY_ADDRESS")
    if named:  # checked even when Ray is already up here: the address named is the user's word
        check_cluster_answers(address, os.environ)
    if ray.is_initialized():
        return False
    if named:
        where = "--address" if address else "RAY_ADDRESS"
        try:
            ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True,
                     logging_level=logging_level)
        except ConnectionError as e:  # "auto" and no cluster (found by ray.init itself)
            raise UserInputError(where, str(e)) from None
        return True
    num_cpus = max(os.cpu_count() or 1, int(res.num_workers * res.cpus_per_worker + 0.999))
    start_local_ray(num_cpus, logging_level)
    return True


def start_local_ray(num_cpus: int, logging_level: int = logging.INFO) -> None:
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
        logging_level=logging_level,
    )


def check_capacity(res: ResourcesSection) -> None:
    """Fail fast, before the run directory exists, when the cluster can never fit the job."""
    import ray

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

    from launcher.train.worker import train_loop_per_worker

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
            name=RunDir.ray_storage_name,
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=recipe.checkpoint.max_failures),
            worker_runtime_env={"env_vars": QUIET_WORKER_ENV | res.worker_env()},
        ),
    )


def run_torchrun(
    recipe: Recipe, run_dir: Path, signals: Signals, consumers: Sequence[Consumer] = (),
    progress: bool = False,
) -> int:
    """Single node without Ray: torchrun starts one worker process per GPU (or CPU worker).
    The progress view (when ``progress``) and ``consumers`` (the trackers) get each new
    metrics record. The workers write into driver.log; their ``[ftlaunch]`` lines are relayed.

    torchrun gets its own session, so a Ctrl-C in the terminal reaches only this driver,
    which then stops the workers through the run directory (launcher.driver.stop)."""
    import subprocess
    import sys

    from launcher.driver.progress import follow

    env = os.environ | QUIET_WORKER_ENV | recipe.resources.worker_env()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={recipe.resources.num_workers}", "-m", "launcher.train.worker", str(run_dir),
    ]
    log = console.attach(run_dir)
    relay = console.Relay(log)
    with log.open("a") as out:
        proc = subprocess.Popen(
            command, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        with follow(run_dir, progress, consumers):
            while proc.poll() is None and not (signals.stopping and signals.expired()):
                relay.poll()
                try:
                    proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    relay.poll()
    code = proc.wait()
    if code != 0:
        for line in relay.errors:
            console.say(f"ftlaunch: worker error: {line}")
    return code


def kill_tree(pid: int, timeout_s: float = 30.0) -> None:
    """SIGKILL ``pid`` and every process below it (workers run in sessions of their own, so
    process groups do not reach them), then wait until they are gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    if alive:
        raise RuntimeError(f"processes {[p.pid for p in alive]} survived SIGKILL")


def fit(
    trainer: Any, run_dir: Path, progress: bool, max_failures: int, signals: Signals,
    consumers: Sequence[Consumer] = (),
) -> None:
    """Run ``trainer.fit()`` in a thread, so this (main) thread keeps the signal handlers
    (Ray Train installs its own SIGINT handler only on the main thread). Returns when training
    ended, or when a stop was requested and the workers did not leave by its deadline.
    The progress line (when ``progress``) and ``consumers`` get each new metrics record."""
    import threading

    from ray.train import TrainingFailedError

    from launcher.driver.progress import follow

    console.attach(run_dir)
    console.route_ray_workers()
    before = _attempts(run_dir)
    outcome: dict[str, BaseException] = {}

    def target() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e

    thread = threading.Thread(target=target, name="ftlaunch-fit", daemon=True)
    with follow(run_dir, progress, consumers):
        thread.start()
        while thread.is_alive() and not (signals.stopping and signals.expired()):
            thread.join(0.2)
    error = outcome.get("error")
    if isinstance(error, TrainingFailedError) and not signals.stopping:
        attempts = _attempts(run_dir) - before
        raise TrainingFailed(
            f"{attempts} attempt(s) failed (checkpoint.max_failures={max_failures}); "
            f"last error: {_root_cause(error)} (the workers' output is in "
            f"{RunDir(run_dir).driver_log})"
        ) from error
    if error is not None and not signals.stopping:
        raise error


def _attempts(run_dir: Path) -> int:
    path = RunDir(run_dir).attempts
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _root_cause(error: BaseException) -> str:
    seen = error
    while seen.__cause__ is not None:
        seen = seen.__cause__
    return f"{type(seen).__name__}: {seen}"
