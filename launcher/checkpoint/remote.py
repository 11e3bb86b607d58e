"""Checkpoints on object storage: the commit protocol of ``launcher.checkpoint.commit``, with
the store as the source of truth and node-local disk as the staging area.

A save is written and hashed on each node's local disk as before; each rank uploads the files
it hashed; once every upload is done rank 0 uploads ``COMMITTED.json``, last. A step in the
store without that object is an interrupted save or upload and never counts. A resume lists
the store, downloads the newest committed step into the node-local mirror (one rank per node,
every object under the step, the marker last) and verifies the copy as any local checkpoint
(file set, sizes, checksums, pickle scan) before anything reads it; a copy that fails is
skipped for the next older one, as a corrupt local checkpoint is.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.checkpoint import commit as ckpt
from launcher.errors import UserInputError
from launcher.ranks import Rank, gather
from launcher.run.store import Store

CHECKPOINTS = "checkpoints"
Warn = Callable[[str], None]


def step_rel(tag: str, name: str = "") -> str:
    return f"{CHECKPOINTS}/{tag}/{name}" if name else f"{CHECKPOINTS}/{tag}"


@dataclass(frozen=True)
class Node:
    """This rank among the ranks that share its node's local disk."""

    index: int
    count: int

    @property
    def leader(self) -> bool:  # the rank that downloads and prunes for the node
        return self.index == 0


def node_of(rank: Rank) -> Node:
    """A collective: every rank calls it."""
    hosts = gather(socket.gethostname(), rank)
    mine = [r for r, host in enumerate(hosts) if host == hosts[rank.rank]]
    return Node(mine.index(rank.rank), len(mine))


def remote_steps(store: Store) -> list[tuple[int, bool]]:
    """Every step holding an object in the store, newest first, with whether its commit
    marker is there (an empty folder, as object stores keep one, is no step)."""
    found: dict[int, bool] = {}
    for name in store.listing(CHECKPOINTS):
        tag, _, rest = name.partition("/")
        match = ckpt.TAG_RE.match(tag)
        if match and rest:
            step = int(match.group(1))
            found[step] = found.get(step, False) or rest == ckpt.MARKER
    return sorted(found.items(), reverse=True)


def committed_steps(store: Store) -> list[int]:
    return [step for step, has_marker in remote_steps(store) if has_marker]


def remote_manifest(store: Store, tag: str) -> dict[str, Any] | None:
    try:
        manifest = json.loads(store.read_text(step_rel(tag, ckpt.MARKER)) or "")
    except json.JSONDecodeError:
        return None
    return manifest if ckpt.well_formed(manifest) else None


def upload_files(store: Store, path: Path, names: list[str]) -> None:
    for name in names:
        store.upload(path / name, step_rel(path.name, name))


def upload_marker(store: Store, path: Path) -> None:
    """The commit: from this object on the step counts in the store."""
    store.upload(path / ckpt.MARKER, step_rel(path.name, ckpt.MARKER))


def _remove(store: Store, tag: str) -> list[str]:
    """Delete what ftlaunch wrote under the step (the marker first, so an interruption
    leaves an uncommitted step, never a corrupt committed one); the other objects' names."""
    present = store.listing(step_rel(tag))
    manifest = remote_manifest(store, tag)
    if manifest is None:
        mine = {n for n in present if "/" not in n and ckpt.SAVE_FILE_RE.match(n)}
    else:
        mine = set(manifest["files"])
    store.delete(step_rel(tag, ckpt.MARKER))
    for name in sorted(mine & set(present)):
        store.delete(step_rel(tag, name))
    foreign = sorted(n for n in present if n not in mine and n != ckpt.MARKER)
    if not foreign:
        store.delete_folder(step_rel(tag))  # the empty folder a delete may leave behind
    return foreign


def clear_step(store: Store, tag: str, warn: Warn) -> None:
    """Make room in the store for a new save of this step; objects ftlaunch did not write
    there are moved to ``checkpoints/.TAG.set-aside.NS/`` (kept, never committed over)."""
    foreign = _remove(store, tag)
    if foreign:
        aside = f"{CHECKPOINTS}/.{tag}.set-aside.{time.time_ns()}"
        for name in foreign:
            store.fs.move(store.key(step_rel(tag, name)), store.key(f"{aside}/{name}"))
        store.delete_folder(step_rel(tag))
        warn(f"{store.where(step_rel(tag))} held objects ftlaunch did not write "
             f"({', '.join(foreign[:3])}); moved to {store.where(aside)}")


def retain(store: Store, keep_last: int, keep: tuple[int, ...], warn: Warn) -> None:
    """:func:`launcher.checkpoint.commit.retain` in the store."""
    steps = remote_steps(store)
    done = [step for step, has_marker in steps if has_marker]
    if not done:
        return
    doomed = [s for s in done[keep_last:] if s not in keep]
    doomed += [s for s, has_marker in steps if not has_marker and s < done[0]]
    for step in doomed:
        left = _remove(store, ckpt.tag_for(step))
        if left:
            warn(f"kept {store.where(step_rel(ckpt.tag_for(step)))}: it holds objects "
                 f"ftlaunch did not write ({', '.join(left[:3])})")


def fetch_step(store: Store, root: Path, tag: str, warn: Warn) -> str | None:
    """Make ``root/tag`` a copy of the committed step in the store: every object under it,
    the marker last (a copy interrupted midway is an uncommitted directory). A local copy
    with the same marker and objects is kept. A problem that makes the step unusable (an
    object name that would leave the directory) is returned instead."""
    path = root / tag
    objects = store.listing(step_rel(tag))
    unsafe = [n for n in objects if not (ckpt.safe_name(n) or n == ckpt.MARKER)]
    if unsafe:
        return f"object '{unsafe[0]}' would be written outside the checkpoint directory"
    if _same(store, path, objects):
        return None
    _clear_local(path, warn)
    path.mkdir(parents=True)
    for name in sorted(objects):
        if name != ckpt.MARKER:
            store.download(step_rel(tag, name), path / name)
    store.download(step_rel(tag, ckpt.MARKER), path / ckpt.MARKER)
    return None


def _same(store: Store, path: Path, objects: dict[str, int]) -> bool:
    """The local copy holds the store's objects, by name and size, and the same marker
    (its content is verified after this, as every copy is)."""
    if not (path / ckpt.MARKER).is_file() or path.is_symlink():
        return False
    local = {
        n: (path / n).stat().st_size for n in ckpt.present_files(path)
        if not n.startswith(f"{ckpt.UNIVERSAL}/")
    }
    if local != objects:
        return False
    return (path / ckpt.MARKER).read_text() == store.read_text(step_rel(path.name, ckpt.MARKER))


def _clear_local(path: Path, warn: Warn) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    left = ckpt.remove_checkpoint(path) if path.is_dir() and not path.is_symlink() else [path.name]
    if path.exists() or path.is_symlink():
        aside = path.parent / f".{path.name}.set-aside.{time.time_ns()}"
        path.rename(aside)
        warn(f"{path} held files ftlaunch did not write ({', '.join(left[:3])}); moved to {aside}")


def prune_local(run_dir: Path, keep: str, warn: Warn) -> None:
    """After a commit reached the store, the node-local copies of other steps go."""
    for cand in ckpt.candidates(run_dir):
        if cand.path.name != keep:
            left = ckpt.remove_checkpoint(cand.path)
            if left:
                warn(f"kept {cand.path}: it holds files ftlaunch did not write ({left[0]})")


def newest_valid(
    store: Store, run_dir: Path, rank: Rank, node: Node, warn: Warn
) -> ckpt.Candidate | None:
    """:func:`launcher.checkpoint.commit.newest_valid` over the store: the newest committed
    step whose downloaded copy verifies on every node (the node's ranks share the checks)."""
    steps = gather(remote_steps(store) if rank.rank == 0 else None, rank)[0]
    seen = []
    for step, has_marker in steps:
        if has_marker:
            seen.append(step)
        else:
            warn(f"skipping {store.where(step_rel(ckpt.tag_for(step)))}: not committed "
                 "(a save or its upload was interrupted)")
    root = ckpt.checkpoints_dir(run_dir)
    for step in seen:
        tag = ckpt.tag_for(step)
        found = gather(fetch_step(store, root, tag, warn) if node.leader else None, rank)
        if not any(found):
            found = gather(ckpt.rank_problem(root / tag, node.index, node.count), rank)
        problems = list(dict.fromkeys(p for p in found if p))
        if not problems:
            return ckpt.Candidate(step, root / tag)
        warn(f"skipping {store.where(step_rel(tag))}: {'; '.join(problems)}")
    if seen:
        raise UserInputError(
            store.where(CHECKPOINTS),
            "checkpoints exist but none is committed and intact; refusing to start from "
            "scratch over them (move them away to start a new run)",
        )
    return None
