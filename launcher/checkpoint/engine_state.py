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
from launcher.checkpoint import rng
from launcher.checkpoint.universal import to_universal
from launcher.ranks import Rank, any_rank, gather
from launcher.recipe.run_sections import CheckpointSection
from launcher.run.rundir import RunDir


@dataclass(frozen=True)
class ResumePoint:
    candidate: ckpt.Candidate | None
    universal: bool = False
    skipped: tuple[str, ...] = ()


def find_resume_point(run_dir: Path, cfg: CheckpointSection, rank: Rank) -> ResumePoint:
    """Must run before deepspeed.initialize: a world-size change needs a config flag."""
    fallback = Path(cfg.resume_from) if cfg.resume_from else None
    skipped: list[str] = []

    def warn(message: str) -> None:
        skipped.append(message)
        rank.log(f"WARNING: {message}")

    found = ckpt.newest_valid(
        run_dir, rank.rank, rank.world, lambda problem: gather(problem, rank), warn, fallback
    )
    if found is None:
        return ResumePoint(None)
    saved_world = ckpt.read_manifest(found.path)["world_size"]
    if saved_world == rank.world:
        return ResumePoint(found, skipped=tuple(skipped))
    rank.log(f"{found.path} was written by {saved_world} ranks, resuming on {rank.world}: "
             "converting it to a universal checkpoint")
    if rank.rank == 0:
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
) -> None:
    """Save and commit step ``step`` (every rank calls it); ``recipe`` (the resolved recipe,
    as data) goes into the trainer state, ``before_commit`` runs once all shards are hashed."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    root = ckpt.checkpoints_dir(run_dir)
    path = root / ckpt.tag_for(step)
    if rank.rank == 0 and (path.exists() or path.is_symlink()):
        clear_step(path, rank)  # an interrupted or superseded save of this step
    dist.barrier()
    client_state = {"step": step, UNIVERSAL_CHECKPOINT_INFO: {"universal_checkpoint_version": 0.2}}
    engine.save_checkpoint(str(root), tag=path.name, client_state=client_state, save_latest=False)
    rng.save_rng(path, rank.rank)
    if rank.rank == 0:
        state = {"step": step, "world_size": rank.world, "recipe": recipe}
        ckpt.trainer_state_path(path).write_text(json.dumps(state, indent=1))
    dist.barrier()
    mine = ckpt.flush_and_hash(path, ckpt.share(ckpt.payload_files(path), rank.rank, rank.world))
    gathered = gather(mine, rank)
    before_commit()
    if rank.rank == 0:
        entries = {k: v for part in gathered for k, v in part.items()}
        info = {"step": step, "world_size": rank.world, "zero_stage": engine.zero_optimization_stage()}
        ckpt.commit(path, entries, info)
        ckpt.retain(run_dir, cfg.keep_last, keep=ckpt.best_steps(run_dir),
                    warn=lambda message: rank.log(f"WARNING: {message}"))
        rank.log(f"checkpoint committed: {path}")
    dist.barrier()


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


def record_attempt(run_dir: Path, start: int, point: ResumePoint, rank: Rank) -> None:
    """One line per (re)start of the worker group: where it resumed and which checkpoints it
    had to skip. The driver counts these lines to report failures."""
    if rank.rank == 0:
        record = {
            "time": time.time(), "resume_step": start, "world": rank.world,
            "universal": point.universal, "skipped": list(point.skipped),
        }
        with RunDir(run_dir).attempts.open("a") as f:
            f.write(json.dumps(record) + "\n")
