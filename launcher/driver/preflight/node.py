"""What runs on every node: versions, GPUs, free disk and both halves of the shared-storage
check (``inspect_node``), the timed gloo all-reduce, and the removal of the check's own files."""

from __future__ import annotations

import platform
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from launcher.driver.ports import free_port
from launcher.recipe.output_dir import is_uri
from launcher.run.store import Store, mirror_dir

PACKAGES = ("torch", "transformers", "deepspeed", "peft", "ray")
PREFLIGHT_DIR = ".preflight"


@dataclass(frozen=True)
class NodeReport:
    """What one node's check task found."""

    versions: Mapping[str, str | None]
    gpus: int
    capability: tuple[int, int] | None
    free_bytes: int
    sees_driver_token: bool
    write_error: str | None
    token_file: str
    created_dirs: tuple[str, ...]
    free_port: int


def inspect_node(share_dir: str, driver_token: str, node_token: str) -> NodeReport:
    """Runs on one node: versions, GPUs, free disk, and both halves of the storage check."""
    import torch

    versions: dict[str, str | None] = {"python": platform.python_version()}
    versions |= {name: _dist_version(name) for name in PACKAGES}
    versions["cuda"] = torch.version.cuda
    versions["flash-attn"] = _flash_attn_version()
    gpus = torch.cuda.device_count()
    capability = min(torch.cuda.get_device_capability(i) for i in range(gpus)) if gpus else None
    created: list[str] = []
    write_error = None
    try:
        created = write_token(share_dir, f"node-{node_token}", node_token)
    except OSError as e:
        write_error = f"{type(e).__name__}: {e}"
    try:
        sees = read_token(share_dir, f"driver-{driver_token}") == driver_token
    except OSError:
        sees = False
    free = shutil.disk_usage(_existing_ancestor(local_share(share_dir))).free
    return NodeReport(
        versions,
        gpus,
        capability,
        free,
        sees,
        write_error,
        token_path(share_dir, f"node-{node_token}"),
        tuple(created),
        free_port(),
    )


def share_of(output_dir: str) -> str:
    """Where the storage check's token files go: under output_dir (a path or a URI)."""
    if is_uri(output_dir):
        return f"{output_dir}/{PREFLIGHT_DIR}"
    return str(Path(output_dir) / PREFLIGHT_DIR)


def local_share(share_dir: str) -> Path:
    """Where the node's checkpoints go: the share, or for object storage the run's mirror on
    the node's own disk (its free space is what a save needs)."""
    return mirror_dir(share_dir) / PREFLIGHT_DIR if is_uri(share_dir) else Path(share_dir)


def token_path(share_dir: str, name: str) -> str:
    return f"{share_dir}/{name}" if is_uri(share_dir) else str(Path(share_dir) / name)


def write_token(share_dir: str, name: str, text: str) -> list[str]:
    """Write one token file (or object); the directories created for it."""
    if is_uri(share_dir):
        Store(share_dir).upload_text(text, name)
        return []
    created = make_dirs(Path(share_dir))
    (Path(share_dir) / name).write_text(text)
    return created


def read_token(share_dir: str, name: str) -> str | None:
    if is_uri(share_dir):
        return Store(share_dir).read_text(name)
    path = Path(share_dir) / name
    return path.read_text() if path.is_file() else None


def remove_files(paths: Sequence[str], dirs: Sequence[str]) -> None:
    """Runs on one node: remove its token file (or object) and the directories it created,
    if empty."""
    for path in paths:
        if is_uri(path):
            uri, _, name = path.rpartition("/")
            Store(uri).delete(name)
        else:
            Path(path).unlink(missing_ok=True)
    for directory in sorted(dirs, key=len, reverse=True):
        try:
            Path(directory).rmdir()
        except OSError:
            pass


def allreduce(
    master: str, rank: int, world: int, nbytes: int, rounds: int, timeout_s: float
) -> float:
    """Runs on one node per rank: seconds per all-reduce of ``nbytes`` over gloo."""
    import datetime

    import torch
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{master}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        data = torch.ones(nbytes // 4)
        dist.all_reduce(data)
        if data[0].item() != world:
            raise RuntimeError(f"all-reduce of ones returned {data[0].item()}, expected {world}")
        start = time.perf_counter()
        for _ in range(rounds):
            dist.all_reduce(data)
        return (time.perf_counter() - start) / rounds
    finally:
        dist.destroy_process_group()


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _flash_attn_version() -> str | None:
    """The flash-attn version if it imports, 'broken (...)' if installed but not importable."""
    version = _dist_version("flash_attn")
    if version is None:
        return None
    try:
        import flash_attn  # noqa: F401
    except Exception as e:  # noqa: BLE001 (an ABI mismatch raises anything, ImportError to OSError)
        return f"broken ({type(e).__name__})"
    return version


def make_dirs(path: Path) -> list[str]:
    """mkdir -p that returns the directories it created."""
    missing = []
    for parent in (path, *path.parents):
        if parent.exists():
            break
        missing.append(parent)
    path.mkdir(parents=True, exist_ok=True)
    return [str(p) for p in missing]


def _existing_ancestor(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())
