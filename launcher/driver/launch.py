"""``ftlaunch train``: from the parsed command to an exported run.

Prepare (what needs the model config, tokenizer and data), check that the run directory can be
resumed, then, holding the driver's liveness file and the stop signals, train on the request's
backend (Ray Train on a cluster, or torchrun on this machine) and export ``final/``. A stop
request ends with the command that resumes the run.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.checkpoint.commit import committed
from launcher.driver import console, orchestrate, preflight, stop
from launcher.driver.hang import HangWatcher
from launcher.driver.locations import recipe_locations, with_absolute_paths
from launcher.driver.ray_session import RaySession
from launcher.driver.stop import resume_command
from launcher.driver.trackers import require, tracking
from launcher.errors import UserInputError
from launcher.jobs.address import check_cluster_address, check_cluster_answers
from launcher.recipe import Recipe, load_recipe
from launcher.run import liveness
from launcher.run import sync
from launcher.run.store import local_run_dir, store_for
from launcher.run.rundir import (
    check_creatable, check_resumable, full_disk_note, write_run_files,
)

if TYPE_CHECKING:
    from launcher.driver.prepare import Prepared

# The planner's fit warning before launch (recipe, on_ray): it reads the GPUs of the cluster,
# so it lives above driver/ and the command passes it in.
FitWarning = Callable[[Recipe, bool], None]


@dataclass(frozen=True)
class TrainRequest:
    """What ``ftlaunch train`` was asked, as parsed."""

    recipe: str
    overrides: tuple[str, ...] = ()
    output_dir: str | None = None
    backend: str = "ray"  # "ray" (Ray Train) or "torchrun" (this machine only)
    address: str | None = None
    insecure: bool = False
    allow_recipe_change: bool = False
    progress: bool = True
    argv: tuple[str, ...] = ()


def train(req: TrainRequest, fit_warning: FitWarning) -> int:
    """Prepare, train on the request's backend, export; the exit code (signals: 130/143)."""
    if req.backend == "torchrun" and req.address:
        raise UserInputError("--address", "the torchrun backend runs on this machine only; "
                             "drop --address, or use --backend ray to join a cluster")
    if req.backend == "ray":
        check_cluster_address(req.address, req.insecure, os.environ)
        check_cluster_answers(req.address, os.environ)  # before the data is prepared
    with recipe_locations(req.recipe, req.overrides, req.output_dir):
        recipe = load_recipe(req.recipe, req.overrides, req.output_dir)
        require(recipe, req.recipe)  # before anything starts
        check_creatable(local_run_dir(with_absolute_paths(recipe).output_dir))  # before the data
    session = RaySession(req.address, recipe.resources) if req.backend == "ray" else None
    with console.routed() as log, session or contextlib.nullcontext():
        if session is not None:
            session.open()  # Ray starts while the driver validates
        from launcher.driver.prepare import prepare  # torch, transformers: while Ray starts

        with recipe_locations(req.recipe, req.overrides, req.output_dir):
            prepared = prepare(recipe)
        return launch(req, prepared, session, log, fit_warning)


def launch(
    req: TrainRequest, prepared: Prepared, session: RaySession | None, log: console.RunLog,
    fit_warning: FitWarning,
) -> int:
    """The validated recipe's run directory claimed, trained under the stop signals on the
    session's Ray (None: torchrun), exported."""
    stop.raise_if_received()  # a stop during the validation that something swallowed
    recipe = prepared.recipe
    run_dir, store = local_run_dir(recipe.output_dir), store_for(recipe.output_dir)
    if store is not None:
        sync.pull(store, run_dir, sync.run_files(run_dir))  # the store is the run's truth
    resuming = check_resumable(run_dir, recipe, req.allow_recipe_change)
    stop.clear(run_dir)
    cp = recipe.checkpoint
    with liveness.Driver(run_dir) as driver, HangWatcher(run_dir, recipe.resources), \
            console.no_progress_bars():
        stop.raise_if_received()  # from here on a signal is a stop request, never an exception
        with stop.Signals(run_dir, cp.on_preempt, cp.preempt_grace_s) as signals:
            if session is None:
                progress = req.progress and recipe.logging.progress
                code = train_torchrun(prepared, run_dir, signals, driver, fit_warning, progress)
            else:
                code = train_ray(req, prepared, run_dir, resuming, signals, driver, fit_warning,
                                 session)
        if signals.stopping:
            log.print_held()  # Ray's held start-up messages come before the stop report
            return report_stop(signals, run_dir, req.argv, recipe.output_dir)
        if code != 0:
            driver.fail("training failed")
            return code
        from launcher.run.export import export_run, export_stored

        final = export_run(run_dir) if store is None else export_stored(recipe.output_dir)
        print(f"[ftlaunch] model exported and verified: {final}", file=sys.stderr)
    return code


def train_torchrun(
    prepared, run_dir: Path, signals, driver, fit_warning: FitWarning, progress: bool = False
) -> int:
    fit_warning(prepared.recipe, False)
    write_run_files(run_dir, prepared.recipe, prepared.ds_config)
    publish_run_files(prepared.recipe, run_dir)
    driver.claim()
    if signals.stopping:
        return 0
    with tracking(prepared.recipe, run_dir) as trackers:
        code = orchestrate.run_torchrun(prepared.recipe, run_dir, signals, [trackers], progress)
        if trackers:
            trackers.status = "killed" if signals.stopping else "failed" if code else "finished"
    if code != 0 and not signals.stopping:
        print(f"ftlaunch: training failed (the workers' output is in {run_dir / 'driver.log'})"
              f"{full_disk_note(run_dir)}", file=sys.stderr)
        return 1
    return 0


def train_ray(
    req: TrainRequest, prepared, run_dir: Path, resuming: bool, signals, driver,
    fit_warning: FitWarning, session: RaySession,
) -> int:
    """Train on Ray; ``session.close()`` when done lets Ray shut down while the caller
    exports."""
    recipe = prepared.recipe
    try:
        session.wait()
        signals.reclaim()
        console.log_line(f"[ftlaunch] {session.describe()}")
        if signals.stopping:
            return 0
        orchestrate.check_capacity(recipe.resources)
        preflight.check_multi_node(recipe)
        fit_warning(recipe, True)
        write_run_files(run_dir, recipe, prepared.ds_config)
        publish_run_files(recipe, run_dir)
        driver.claim()
        if signals.stopping:
            return 0
        print(f"[ftlaunch] {'resuming' if resuming else 'starting'} run in {run_dir}", file=sys.stderr)
        trainer = orchestrate.make_trainer(recipe, prepared.ds_config, run_dir)
        with tracking(recipe, run_dir) as trackers:
            orchestrate.fit(
                trainer, run_dir, req.progress and recipe.logging.progress,
                recipe.checkpoint.max_failures, signals, [trackers],
            )
            if trackers:
                trackers.status = "killed" if signals.stopping else "finished"
    except orchestrate.TrainingFailed as e:
        print(f"ftlaunch: training failed: {e}{full_disk_note(run_dir)}", file=sys.stderr)
        return 1
    finally:
        session.close()
    return 0


def publish_run_files(recipe: Recipe, run_dir: Path) -> None:
    """An object-store run's recipe and DeepSpeed config, in the store before any worker."""
    store = store_for(recipe.output_dir)
    if store is not None:
        sync.push(store, run_dir, sync.recipe_files(run_dir))


def report_stop(signals, run_dir: Path, argv: Sequence[str], output_dir: str = "") -> int:
    """After a signal: say what was kept and the command that continues the run."""
    store = store_for(output_dir)
    if store is not None:
        from launcher.checkpoint.remote import committed_steps  # imports torch: only here

        steps = committed_steps(store)
    else:
        steps = [c.step for c in committed(run_dir)] if run_dir.is_dir() else []
    kept = f"newest committed checkpoint: step {steps[0]}" if steps else "no checkpoint yet"
    print(
        f"ftlaunch: {signals.how()}; {kept}. To resume, run:\n  "
        f"{resume_command(argv)}",
        file=sys.stderr,
    )
    return signals.exit_code()
