"""Checkpoints that count only once committed.

A checkpoint is ``<run>/checkpoints/step_XXXXXXXX/``: DeepSpeed's engine state written by every
rank, each rank's RNG state, and last a ``COMMITTED.json`` manifest (every file's size and
sha256) written atomically by rank 0 after all ranks have flushed and hashed their share of
the files. A directory without a manifest is an interrupted save: it never counts as a checkpoint. A
committed directory is trusted only when its files are exactly the manifest's (a stray file is
refused, since DeepSpeed's loaders pick files by glob), each matches its size and checksum, and
no pickle among them would import anything beyond tensors and DeepSpeed's own state classes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.durable import fsync_path, sha256_file, write_atomic  # noqa: F401
from launcher.errors import UserInputError
from launcher.run.rundir import RunDir

MARKER = "COMMITTED.json"
TAG_RE = re.compile(r"^step_(\d{8})$")
UNIVERSAL = "universal"
TRAINER_STATE = "trainer_state.json"
# The files one save writes, by name: what an interrupted (uncommitted) save may be cleared of.
SAVE_FILE_RE = re.compile(
    r"^((bf16_)?zero_pp_rank_\d+_mp_rank_\d+_(optim|model)_states\.pt"
    r"|mp_rank_\d+_model_states\.pt|rng_rank\d{5}\.safetensors|trainer_state\.json)$"
)
# Files no loader unpickles; every other file is scanned before anything reads it.
NOT_PICKLES = (".json", ".safetensors")
# Non-tensor classes DeepSpeed pickles into its checkpoints. Anything else in a pickle could
# run code when loaded, so such a checkpoint is refused before any loader sees it.
ALLOWED_GLOBALS = frozenset({
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
})


def checkpoints_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).checkpoints


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def payload_files(ckpt: Path) -> list[str]:
    return sorted(name for name in present_files(ckpt) if name != MARKER)


def present_files(root: Path) -> list[str]:
    """Every file, link or other non-directory under ``root``, as a relative POSIX path."""
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_symlink() or not p.is_dir()
    )


def share(items: Sequence[str], rank: int, world: int) -> list[str]:
    """This rank's slice of the files, so hashing and verifying are spread over all ranks."""
    return [x for i, x in enumerate(items) if i % world == rank]


def owned(listings: Sequence[Sequence[str]], rank: int) -> list[str]:
    """This rank's share of the files each rank sees (``listings``, in rank order): file i of
    their union goes to the (i mod k)-th of the k ranks that see it. On one shared directory
    that is :func:`share`; on node-local disks each file goes to a rank of a node holding it."""
    seen = [set(names) for names in listings]
    mine = []
    for i, name in enumerate(sorted(set().union(*seen))):
        holders = [r for r, names in enumerate(seen) if name in names]
        if holders[i % len(holders)] == rank:
            mine.append(name)
    return mine


def flush_and_hash(ckpt: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    entries = {}
    for name in names:
        path = ckpt / name
        with path.open("rb") as f:
            os.fsync(f.fileno())
        entries[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return entries


def commit(ckpt: Path, entries: dict[str, dict[str, Any]], info: dict[str, Any]) -> None:
    fsync_path(ckpt)
    manifest = {**info, "files": dict(sorted(entries.items())), "committed_at": time.time()}
    write_atomic(ckpt / MARKER, json.dumps(manifest, indent=1))


def read_manifest(ckpt: Path) -> dict[str, Any] | None:
    """The manifest, or None when there is none or it is not one (unreadable, malformed, or
    naming a file outside the directory)."""
    try:
        manifest = json.loads((ckpt / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if well_formed(manifest) else None


def well_formed(manifest: Any) -> bool:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return False
    return all(
        safe_name(name) and isinstance(entry, dict) and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
        for name, entry in manifest["files"].items()
    )


def safe_name(name: Any) -> bool:
    parts = name.split("/") if isinstance(name, str) else []
    return bool(parts) and name != MARKER and all(p not in ("", ".", "..") for p in parts)


def has_marker(ckpt: Path) -> bool:
    """A commit was written: from then on the directory is a checkpoint, intact or not."""
    return (ckpt / MARKER).exists() or (ckpt / MARKER).is_symlink()


def stray_files(
    ckpt: Path, manifest: dict[str, Any], nested: tuple[str, ...] = (UNIVERSAL,)
) -> list[str]:
    """Files present but not in the manifest. A ``nested`` folder (``universal/``) is left to
    its own manifest."""
    listed = set(manifest["files"]) | {MARKER}
    return [
        name for name in present_files(ckpt)
        if name not in listed and not (name.split("/")[0] in nested and "/" in name)
    ]


def structure_problem(ckpt: Path, manifest: dict[str, Any]) -> str | None:
    """What is wrong with the directory as a whole: files the manifest does not name, or files
    a resume needs (the trainer state, every rank's RNG state) that it lacks."""
    stray = stray_files(ckpt, manifest)
    if stray:
        return (f"{stray[0]} is not in its {MARKER} (a file ftlaunch did not commit; "
                f"{len(stray)} such file(s)); refusing to load anything from it")
    world = manifest.get("world_size")
    if not isinstance(world, int) or world < 1:
        return f"{MARKER} does not record the world size"
    for name in (TRAINER_STATE, *(rng_name(r) for r in range(world))):
        if name not in manifest["files"]:
            return f"{name} is missing from the checkpoint"
    return None


def check_files(ckpt: Path, manifest: dict[str, Any], names: Sequence[str]) -> str | None:
    """The first problem with these files against the manifest, or None when they match."""
    for name in names:
        expected = manifest["files"][name]
        path = ckpt / name
        if path.is_symlink():
            return f"{name} is a symbolic link"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, manifest says {expected['size']}"
        if sha256_file(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
        unsafe = unsafe_globals(path)
        if unsafe:
            return f"{name} pickles objects that could run code when loaded: {unsafe}"
    return None


def problem(ckpt: Path) -> str | None:
    """Everything checked, by one process: the manifest, the file set, every file."""
    manifest = read_manifest(ckpt)
    if manifest is None:
        return f"{MARKER} is missing, unreadable or malformed"
    whole = structure_problem(ckpt, manifest)
    return whole or check_files(ckpt, manifest, sorted(manifest["files"]))


def tree_problem(root: Path) -> str | None:
    """Like :func:`problem`, for a directory that has no nested parts (``universal/``)."""
    manifest = read_manifest(root)
    if manifest is None:
        return f"{MARKER} is missing, unreadable or malformed"
    stray = stray_files(root, manifest, nested=())
    if stray:
        return f"{stray[0]} is not in its {MARKER}"
    return check_files(root, manifest, sorted(manifest["files"]))


def unsafe_globals(path: Path) -> list[str]:
    """Globals a torch pickle would import beyond tensors and DeepSpeed's own state classes.
    Scanned from the pickle's opcodes: nothing in the file is executed. Every file but JSON
    and safetensors is treated as a pickle, whatever its name."""
    if path.suffix in NOT_PICKLES:
        return []
    import torch  # here: the launch imports this module before it starts Ray, torch after

    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # not a torch zip/pickle at all
        return [f"unreadable ({type(e).__name__})"]
    return sorted(set(found) - ALLOWED_GLOBALS)


@dataclass(frozen=True)
class Candidate:
    step: int
    path: Path


def candidates(run_dir: Path) -> list[Candidate]:
    """Every step directory, newest first, committed or not."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = TAG_RE.match(p.name)
        if m and p.is_dir():
            found.append(Candidate(int(m.group(1)), p))
    return sorted(found, key=lambda c: c.step, reverse=True)


def committed(run_dir: Path) -> list[Candidate]:
    return [c for c in candidates(run_dir) if read_manifest(c.path) is not None]


Gather = Callable[[str | None], list[str | None]]


def saved(found: Sequence[Candidate], warn: Callable[[str], None]) -> list[Candidate]:
    """The candidates a commit was written for; interrupted saves are ignored, with a warning."""
    kept = []
    for cand in found:
        if has_marker(cand.path):
            kept.append(cand)
        else:
            warn(f"skipping {cand.path}: not committed (a save was interrupted)")
    return kept


def newest_valid(
    run_dir: Path, rank: int, world: int, gather: Gather, warn: Callable[[str], None],
    fallback: Path | None = None, own: bool = True,
) -> Candidate | None:
    """The newest committed checkpoint that is whole and matches its manifest.

    Rank 0 checks the directory's file set; each rank verifies its share of the files;
    ``gather`` collects every rank's finding (None when intact), so every rank picks the same
    checkpoint. Corrupt ones are skipped with a warning. Interrupted saves never count:
    without a commit in ``run_dir``, ``fallback`` (checkpoint.resume_from) is looked at. If
    committed checkpoints exist but none is intact, that is an error: silently starting from
    scratch would throw away the run. ``own=False`` looks at the fallback only (the run's
    own checkpoints are in an object store).
    """
    seen = saved(candidates(run_dir), warn) if own else []
    source = str(checkpoints_dir(run_dir))
    if not seen and fallback is not None:
        seen = saved(outside_candidates(fallback), warn)
        source = f"checkpoint.resume_from: {fallback}"
    for cand in seen:
        found = list(dict.fromkeys(p for p in gather(rank_problem(cand.path, rank, world)) if p))
        if not found:
            return cand
        warn(f"skipping {cand.path}: {'; '.join(found)}")
    if seen:
        raise UserInputError(
            source,
            "checkpoints exist but none is committed and intact; refusing to start from "
            "scratch over them (move them away to start a new run)",
        )
    return None


def rank_problem(ckpt: Path, rank: int, world: int) -> str | None:
    """This rank's part of verifying ``ckpt``: rank 0 the whole directory, each its files."""
    manifest = read_manifest(ckpt)
    if manifest is None:
        return f"{MARKER} is unreadable or malformed"
    whole = structure_problem(ckpt, manifest) if rank == 0 else None
    return whole or check_files(ckpt, manifest, share(sorted(manifest["files"]), rank, world))


def outside_candidates(path: Path) -> list[Candidate]:
    """Checkpoints named by ``checkpoint.resume_from``: one step directory or a run directory."""
    match = TAG_RE.match(path.name)
    if match and path.is_dir():
        return [Candidate(int(match.group(1)), path)]
    return candidates(path)


def ours(ckpt: Path) -> set[str]:
    """The files in a step directory that ftlaunch wrote: a committed one's manifest (and its
    verified conversion's), or for an interrupted save the files a save writes, by name."""
    manifest = read_manifest(ckpt)
    if manifest is None:
        return {n for n in present_files(ckpt) if "/" not in n and SAVE_FILE_RE.match(n)} | {MARKER}
    names = set(manifest["files"]) | {MARKER}
    universal = read_manifest(ckpt / UNIVERSAL)
    if universal is not None:
        names |= {f"{UNIVERSAL}/{n}" for n in [*universal["files"], MARKER]}
    return names


def remove_checkpoint(ckpt: Path) -> list[str]:
    """Delete what ftlaunch wrote in ``ckpt`` (the commit marker first, so a crash midway
    leaves an uncommitted directory, never a corrupt committed one), then the directories
    left empty. Returns the files left because ftlaunch did not write them."""
    mine = ours(ckpt)
    (ckpt / MARKER).unlink(missing_ok=True)
    left = []
    for name in present_files(ckpt):
        if name in mine:
            (ckpt / name).unlink(missing_ok=True)
        else:
            left.append(name)
    folders = [p for p in ckpt.rglob("*") if p.is_dir() and not p.is_symlink()]
    for folder in sorted(folders, reverse=True):
        _rmdir_if_empty(folder)
    _rmdir_if_empty(ckpt)
    return left


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def retain(
    run_dir: Path, keep_last: int, keep: Sequence[int] = (), warn: Callable[[str], None] = print
) -> list[Path]:
    """Delete committed checkpoints beyond the newest ``keep_last`` (except the steps in
    ``keep``, e.g. the best one) and interrupted saves older than the newest commit. Never
    touches the newest committed checkpoint, nor a file ftlaunch did not write. Returns the
    directories removed."""
    done = committed(run_dir)
    if not done:
        return []
    newest = done[0].step
    doomed = [c.path for c in done[keep_last:] if c.step not in keep]
    doomed += [
        c.path for c in candidates(run_dir) if c.step < newest and read_manifest(c.path) is None
    ]
    removed = []
    for path in doomed:
        left = remove_checkpoint(path)
        if left:
            warn(f"kept {path}: it holds files ftlaunch did not write ({', '.join(left[:3])})")
        else:
            removed.append(path)
    return removed


def write_best(run_dir: Path, step: int, metric: str, value: float) -> None:
    write_atomic(RunDir(run_dir).best, json.dumps({"step": step, "metric": metric, "value": value}))


def best_steps(run_dir: Path) -> tuple[int, ...]:
    """The best checkpoint's step, when the run keeps one (for retention and export)."""
    path = RunDir(run_dir).best
    return (json.loads(path.read_text())["step"],) if path.is_file() else ()


def rng_name(rank: int) -> str:
    return f"rng_rank{rank:05d}.safetensors"


def trainer_state_path(ckpt: Path) -> Path:
    return ckpt / TRAINER_STATE
