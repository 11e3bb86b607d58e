"""Saving and restoring the DeepSpeed engine through the checkpoint commit protocol.

Every rank calls these together. A save is committed by rank 0 only after all ranks wrote,
flushed and hashed their share of the files; a restore first agrees on the newest checkpoint
every rank verified, converting it to DeepSpeed's universal format when the world size
changed since it was written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from launcher.checkpoint import commit as ckpt
from launcher.checkpoint import remote, rng
from launcher.checkpoint.universal import to_universal
from launcher.ranks import Rank, any_rank, gather
from launcher.recipe.run_sections import CheckpointSection
from launcher.run import sync
from launcher.run.rundir import RunDir
from launcher.run.store import Store


@dataclass(frozen=True)
class ResumePoint:
    candidate: ckpt.Candidate | None
    universal: bool = False
    skipped: tuple[str, ...] = ()


def find_resume_point(
    run_dir: Path, cfg: CheckpointSection, rank: Rank, store: Store | None = None
) -> ResumePoint:
    """Must run before deepspeed.initialize: a world-size change needs a config flag. With a
    ``store`` its checkpoints count, downloaded into ``run_dir`` (node-local) and verified."""
    fallback = Path(cfg.resume_from) if cfg.resume_from else None
    skipped: list[str] = []

    def warn(message: str) -> None:
        skipped.append(message)
        rank.log(f"WARNING: {message}")

    node = remote.node_of(rank) if store is not None else None
    if store is not None and rank.rank == 0:
        sync.pull(store, run_dir, sync.history_files(run_dir))
    found = remote.newest_valid(store, run_dir, rank, node, warn) if node else None
    if found is None and (store is None or fallback is not None):
        found = ckpt.newest_valid(
            run_dir, rank.rank, rank.world, lambda problem: gather(problem, rank), warn,
            fallback, own=store is None,
        )
    if found is None:
        return ResumePoint(None)
    saved_world = ckpt.read_manifest(found.path)["world_size"]
    if saved_world == rank.world:
        return ResumePoint(found, skipped=tuple(skipped))
    rank.log(f"{found.path} was written by {saved_world} ranks, resuming on {rank.world}: "
             "converting it to a universal checkpoint")
    if (node.leader if node else rank.rank == 0):  # each node-local copy is converted
        to_universal(found.path, warn)
    dist.barrier()
    return ResumePoint(found, universal=True, skipped=tuple(skipped))


def config_for(ds_config: dict[str, Any], point: ResumePoint) -> dict[str, Any]:
    if not point.universal:
        return ds_config
    return ds_config | {"checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def restore(engine: Any, point: ResumePoint, rank: Rank) -> int:
    """Load engine, optimizer, scheduler and RNG state; return the step to continue from."""
    if point.candidate is None:
        return 0
    path = point.candidate.path
    load_dir, tag = (path, ckpt.UNIVERSAL) if point.universal else (path.parent, path.name)
    loaded, _ = engine.load_checkpoint(
        str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the verified checkpoint {path}")
    if not rng.load_rng(path, rank.rank, ckpt.read_manifest(path)["world_size"]):
        rank.log(f"{path} has no RNG state for rank {rank.rank}: it keeps its seeded stream")
    rank.log(f"resumed from {path} (step {point.candidate.step})")
    return point.candidate.step


def save(
    engine: Any, run_dir: Path, step: int, rank: Rank, cfg: CheckpointSection,
    recipe: dict[str, Any], before_commit: Callable[[], None] = lambda: None,
    store: Store | None = None,
) -> None:
    """Save and commit step ``step`` (every rank calls it); ``recipe`` (the resolved recipe,
    as data) goes into the trainer state, ``before_commit`` runs once all shards are hashed
    (and, with a ``store``, uploaded: the step is committed there by its marker, last)."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    root = ckpt.checkpoints_dir(run_dir)
    path = root / ckpt.tag_for(step)
    node = remote.node_of(rank) if store is not None else None
    if (node.leader if node else rank.rank == 0) and (path.exists() or path.is_symlink()):
        clear_step(path, rank)  # an interrupted or superseded save of this step
    if store is not None and rank.rank == 0:
        remote.clear_step(store, path.name, lambda message: rank.log(f"WARNING: {message}"))
    dist.barrier()
    client_state = {"step": step, UNIVERSAL_CHECKPOINT_INFO: {"universal_checkpoint_version": 0.2}}
    engine.save_checkpoint(str(root), tag=path.name, client_state=client_state, save_latest=False)
    rng.save_rng(path, rank.rank)
    if rank.rank == 0:
        state = {"step": step, "world_size": rank.world, "recipe": recipe}
        ckpt.trainer_state_path(path).write_text(json.dumps(state, indent=1))
    dist.barrier()
    names = ckpt.owned(gather(ckpt.payload_files(path), rank), rank.rank)
    mine = ckpt.flush_and_hash(path, names)
    if store is not None:
        remote.upload_files(store, path, names)
    gathered = gather(mine, rank)
    before_commit()
    if rank.rank == 0:
        entries = {k: v for part in gathered for k, v in part.items()}
        info = {"step": step, "world_size": rank.world, "zero_stage": engine.zero_optimization_stage()}
        ckpt.commit(path, entries, info)
        commit_and_retain(run_dir, path, cfg, rank, store)
    if node is not None and node.leader:
        remote.prune_local(run_dir, path.name, lambda message: rank.log(f"WARNING: {message}"))
    dist.barrier()


def commit_and_retain(
    run_dir: Path, path: Path, cfg: CheckpointSection, rank: Rank, store: Store | None
) -> None:
    """Rank 0, once the local manifest is written: with a store, the run's small files, then
    the marker (the commit), then the store's retention; without, the local retention."""
    warn = lambda message: rank.log(f"WARNING: {message}")  # noqa: E731
    keep = ckpt.best_steps(run_dir)
    if store is None:
        ckpt.retain(run_dir, cfg.keep_last, keep=keep, warn=warn)
        rank.log(f"checkpoint committed: {path}")
        return
    sync.push(store, run_dir, sync.worker_files(run_dir))
    remote.upload_marker(store, path)
    remote.retain(store, cfg.keep_last, keep, warn)
    rank.log(f"checkpoint committed: {store.where(remote.step_rel(path.name))}")


def clear_step(path: Path, rank: Rank) -> None:
    """Make room for a new save of this step: remove what ftlaunch wrote there; a directory
    still holding other files is set aside whole (kept, never committed over)."""
    left = ckpt.remove_checkpoint(path) if path.is_dir() and not path.is_symlink() else [path.name]
    if path.exists() or path.is_symlink():
        aside = path.parent / f".{path.name}.set-aside.{time.time_ns()}"
        path.rename(aside)
        rank.log(f"WARNING: {path} held files ftlaunch did not write ({', '.join(left[:3])}); "
                 f"moved to {aside}")


class SaveSchedule:
    """When to save: every N steps, every M minutes (rank 0's clock decides for all), and at
    the last step."""

    def __init__(self, cfg: CheckpointSection, total: int):
        self.every_steps = cfg.every_steps
        self.every_seconds = cfg.every_minutes * 60 if cfg.every_minutes else None
        self.total = total
        self.last = time.monotonic()

    def due(self, done: int, rank: Rank) -> bool:
        due = done == self.total or bool(self.every_steps and done % self.every_steps == 0)
        if self.every_seconds is not None:
            late = rank.rank == 0 and time.monotonic() - self.last >= self.every_seconds
            due = any_rank(due or late, rank)
        if due:
            self.last = time.monotonic()
        return due


def record_attempt(
    run_dir: Path, start: int, point: ResumePoint, rank: Rank, store: Store | None = None
) -> None:
    """One line per (re)start of the worker group: where it resumed and which checkpoints it
    had to skip. The driver counts these lines to report failures (pushed to ``store``)."""
    if rank.rank == 0:
        record = {
            "time": time.time(), "resume_step": start, "world": rank.world,
            "universal": point.universal, "skipped": list(point.skipped),
        }
        with RunDir(run_dir).attempts.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if store is not None:
            sync.push(store, run_dir, [RunDir(run_dir).attempts])
