"""The run directory's small files between a node-local mirror and the object store.

The store is the source of truth: the driver pulls these files into its mirror before it
decides whether to resume, rank 0 pushes the ones the workers write at every commit and at
the end of training. Checkpoints and ``final/`` have their own protocols
(``launcher.checkpoint.remote``, ``launcher.run.export``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from launcher.run.rundir import RunDir
from launcher.run.store import Store, store_for


def run_files(run_dir: Path) -> list[Path]:
    """Every small file of a run that outlives the machine, in the local directory."""
    return recipe_files(run_dir) + worker_files(run_dir)


def recipe_files(run_dir: Path) -> list[Path]:
    """The ones the driver writes before the workers start."""
    files = RunDir(run_dir)
    return [files.resolved, files.ds_config]


def worker_files(run_dir: Path) -> list[Path]:
    """The ones the workers write (rank 0 pushes them)."""
    files = RunDir(run_dir)
    return [files.metrics, files.attempts, files.run_info, files.probe, files.best]


def history_files(run_dir: Path) -> list[Path]:
    """What a resumed run continues (rank 0 pulls them, on whichever node it now runs)."""
    files = RunDir(run_dir)
    return [files.metrics, files.attempts, files.best]


def rel(run_dir: Path, path: Path) -> str:
    return path.relative_to(run_dir).as_posix()


def pull(store: Store, run_dir: Path, paths: Sequence[Path]) -> None:
    """Make these files of the mirror the store's: each downloaded, or removed from the
    mirror when the store has none (a stale mirror must not pass for the run)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for path in paths:
        if store.exists(rel(run_dir, path)):
            store.download(rel(run_dir, path), path)
        else:
            path.unlink(missing_ok=True)


def push(store: Store, run_dir: Path, paths: Sequence[Path]) -> None:
    for path in paths:
        if path.is_file():
            store.upload(path, rel(run_dir, path))


def push_from_worker(output_dir: str, run_dir: Path) -> None:
    """Rank 0's push of the files the workers write; nothing for a run directory on a path."""
    store = store_for(output_dir)
    if store is not None:
        push(store, run_dir, worker_files(run_dir))
