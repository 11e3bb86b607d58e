"""Checkpoints that count only once committed.

A checkpoint is ``<run>/checkpoints/step_XXXXXXXX/``: DeepSpeed's engine state written by every
rank, each rank's RNG state, and last a ``COMMITTED.json`` manifest (every file's size and
sha256) written atomically by rank 0 after all ranks have flushed and hashed their share of
the files. A directory without a valid manifest is ignored at resume time, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launcher.errors import UserInputError

MARKER = "COMMITTED.json"
BEST = "best.json"  # in checkpoints/: the step of the best evaluation (eval.early_stopping)
TAG_RE = re.compile(r"^step_(\d{8})$")
UNIVERSAL = "universal"
# Non-tensor classes DeepSpeed pickles into its checkpoints. Anything else in a pickle could
# run code when loaded, so such a checkpoint is refused before any loader sees it.
ALLOWED_GLOBALS = frozenset({
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
})


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def write_atomic(path: Path, text: str) -> None:
    """temp + fsync + rename + fsync(dir): readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def payload_files(ckpt: Path) -> list[str]:
    return sorted(
        str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MARKER
    )


def share(items: Sequence[str], rank: int, world: int) -> list[str]:
    """This rank's slice of the files, so hashing and verifying are spread over all ranks."""
    return [x for i, x in enumerate(items) if i % world == rank]


def flush_and_hash(ckpt: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    entries = {}
    for name in names:
        path = ckpt / name
        with path.open("rb") as f:
            os.fsync(f.fileno())
        entries[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return entries


def commit(ckpt: Path, entries: dict[str, dict[str, Any]], info: dict[str, Any]) -> None:
    fsync_dir(ckpt)
    manifest = {**info, "files": dict(sorted(entries.items())), "committed_at": time.time()}
    write_atomic(ckpt / MARKER, json.dumps(manifest, indent=1))


def read_manifest(ckpt: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((ckpt / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and "files" in manifest else None


def check_files(ckpt: Path, manifest: dict[str, Any], names: Sequence[str]) -> str | None:
    """The first problem with these files against the manifest, or None when they match."""
    for name in names:
        expected = manifest["files"][name]
        path = ckpt / name
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


def unsafe_globals(path: Path) -> list[str]:
    """Globals a torch pickle would import beyond tensors and DeepSpeed's own state classes.
    Scanned from the pickle's opcodes: nothing in the file is executed."""
    if path.suffix not in (".pt", ".pth", ".bin"):
        return []
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


def newest_valid(
    run_dir: Path, rank: int, world: int, gather: Gather, warn: Callable[[str], None],
    fallback: Path | None = None,
) -> Candidate | None:
    """The newest committed checkpoint whose files all match their manifest.

    Each rank verifies its share of the files; ``gather`` collects every rank's finding
    (None when its share is intact), so every rank picks the same checkpoint. Uncommitted or
    corrupt ones are skipped with a warning. If checkpoints exist but none is valid, that is
    an error: silently starting from scratch would throw away the run.
    """
    seen = candidates(run_dir) or (outside_candidates(fallback) if fallback else [])
    for cand in seen:
        manifest = read_manifest(cand.path)
        if manifest is None:
            warn(f"skipping {cand.path}: not committed (a save was interrupted)")
            continue
        problems = gather(check_files(cand.path, manifest, share(sorted(manifest["files"]), rank, world)))
        found = [p for p in problems if p is not None]
        if not found:
            return cand
        warn(f"skipping {cand.path}: {'; '.join(found)}")
    if seen:
        raise UserInputError(
            str(checkpoints_dir(run_dir)),
            "checkpoints exist but none is committed and intact; refusing to start from "
            "scratch over them (move them away to start a new run)",
        )
    return None


def outside_candidates(path: Path) -> list[Candidate]:
    """Checkpoints named by ``checkpoint.resume_from``: one step directory or a run directory."""
    match = TAG_RE.match(path.name)
    if match and path.is_dir():
        return [Candidate(int(match.group(1)), path)]
    return candidates(path)


def to_universal(ckpt: Path) -> Path:
    """Convert a checkpoint to DeepSpeed's universal format (loadable at any world size),
    once; the result lives in ``<ckpt>/universal`` and appears there only when complete."""
    import subprocess
    import sys
    import tempfile

    target = ckpt / UNIVERSAL
    if target.is_dir():
        return target
    staging = Path(tempfile.mkdtemp(dir=ckpt, prefix=".universal."))
    try:
        subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
             "--input_folder", str(ckpt), "--output_folder", str(staging / "out")],
            check=True, capture_output=True, text=True,
        )
        (staging / "out").rename(target)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"universal conversion of {ckpt} failed:\n{e.stderr[-2000:]}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def retain(run_dir: Path, keep_last: int, keep: Sequence[int] = ()) -> list[Path]:
    """Delete committed checkpoints beyond the newest ``keep_last`` (except the steps in
    ``keep``, e.g. the best one) and interrupted saves older than the newest commit. Never
    touches the newest committed checkpoint."""
    done = committed(run_dir)
    if not done:
        return []
    newest = done[0].step
    doomed = [c.path for c in done[keep_last:] if c.step not in keep]
    doomed += [
        c.path for c in candidates(run_dir) if c.step < newest and read_manifest(c.path) is None
    ]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def write_best(run_dir: Path, step: int, metric: str, value: float) -> None:
    write_atomic(
        checkpoints_dir(run_dir) / BEST, json.dumps({"step": step, "metric": metric, "value": value})
    )


def best_steps(run_dir: Path) -> tuple[int, ...]:
    """The best checkpoint's step, when the run keeps one (for retention and export)."""
    path = checkpoints_dir(run_dir) / BEST
    return (json.loads(path.read_text())["step"],) if path.is_file() else ()


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng(ckpt: Path, rank: int) -> None:
    from safetensors.torch import save_file

    save_file(rng_state(), str(ckpt / f"rng_rank{rank:05d}.safetensors"))


def load_rng(ckpt: Path, rank: int) -> None:
    from safetensors.torch import load_file

    path = ckpt / f"rng_rank{rank:05d}.safetensors"
    if path.is_file():
        restore_rng(load_file(str(path)))


def trainer_state_path(ckpt: Path) -> Path:
    return ckpt / "trainer_state.json"
