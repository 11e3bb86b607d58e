"""Data preparation: read, split, encode and tokenize train/validation into a cache entry
(cache.py) that every process then memory-maps.

Rows stream from the files into Arrow tables (rowtable.py), are tokenized by
``datasets.map`` in ``data.num_proc`` processes (parallel.py) and written to ``.npy`` files a
batch at a time (store.py): no process holds a Python list of every row, and the entry is
published only when whole."""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from launcher.data.cache import cache_key, default_cache_dir, publish, read_cache, write_meta
from launcher.data.encode import make_encoder
from launcher.data.parallel import EncodedRows, available_cpus, encode_tables
from launcher.data.read import numeric_fields
from launcher.data.rowtable import row_tables
from launcher.data.store import write_split
from launcher.data.tokenized import PreparedData, SplitStats
from launcher.errors import UserInputError
from launcher.recipe.sections import DataSection, DataSource, LabelsSection


PUBLISH_ATTEMPTS = 3


def prepare_data(
    cfg: DataSection, tokenizer: Any, seed: int, labels: LabelsSection | None = None
) -> PreparedData:
    """Read, validate and tokenize train/validation, through the cache when it is warm. An
    entry that fails its checksums is rebuilt, never used; what is returned was verified."""
    root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    try:
        return _prepare_in(root, cfg, tokenizer, seed, labels)
    except OSError as e:
        if e.errno not in UNWRITABLE or not _may_be_under(e, root):
            raise
        raise UserInputError("data.cache_dir", _unwritable(root, e)) from e


UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
NOT_PERMITTED = {errno.EACCES, errno.EPERM}  # may be a data file's: the cache's only if under it


def _may_be_under(error: OSError, root: Path) -> bool:
    """The error names a file under the cache, or (a write error from pyarrow names none) it
    is one only a write raises."""
    if error.filename is None:
        return error.errno not in NOT_PERMITTED
    return Path(error.filename).is_relative_to(root)


def _unwritable(root: Path, error: OSError) -> str:
    """What the user reads when the cache's filesystem refused the tokenized data."""
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    return (f"cannot write the tokenized data under {root}: {os.strerror(error.errno)}; "
            f"nothing was cached. {'Free space there, or set' if full else 'Set'} "
            "data.cache_dir (or FTLAUNCH_CACHE) to a writable directory with room for it")


def _prepare_in(
    root: Path, cfg: DataSection, tokenizer: Any, seed: int, labels: LabelsSection | None
) -> PreparedData:
    key = cache_key(cfg, tokenizer, labels, seed)
    if key is None:  # not identifiable: tokenized afresh, mapped, and the files unlinked
        with _scratch(root, "uncached") as tmp:
            build_entry(cfg, tokenizer, seed, labels, tmp)
            data = read_cache(tmp, verified=True)
        if data is None:
            raise RuntimeError(f"the tokenized data written under {root} does not verify")
        return data
    entry = root / key
    for _ in range(PUBLISH_ATTEMPTS):
        cached = read_cache(entry)
        if cached is not None:
            return cached
        with _scratch(root, key) as tmp:
            build_entry(cfg, tokenizer, seed, labels, tmp)
            publish(tmp, entry)
        published = read_cache(entry, verified=True)
        if published is not None:
            return published
    raise RuntimeError(f"the cache entry {entry} does not verify after it was written")


@contextmanager
def _scratch(root: Path, name: str) -> Iterator[Path]:
    """A new directory beside the entry (same filesystem: the rename is atomic), removed
    afterwards whatever happens, unless it was renamed into place. Its name says which
    process on which host writes it, so the scratch of a process that was killed (SIGKILL,
    a lost node) is found and removed by the next build on that host."""
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned_scratch(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.{_HOST}.{os.getpid()}."))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_HOST = socket.gethostname().replace(".", "_")
_SCRATCH = re.compile(r"\.(?:[0-9a-f]{32}|uncached)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[^.]+")


def remove_abandoned_scratch(root: Path) -> list[Path]:
    """Remove scratch directories under ``root`` that a process of this host wrote and that
    process is gone. Anything else is left: another host's (its process may be alive), a
    live process's, and every name ftlaunch does not write."""
    removed = []
    for path in root.iterdir():
        match = _SCRATCH.fullmatch(path.name)
        if match is None or match["host"] != _HOST or not path.is_dir():
            continue
        if _alive(int(match["pid"])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def build_entry(
    cfg: DataSection, tokenizer: Any, seed: int, labels: LabelsSection | None, out: Path
) -> None:
    """Tokenize train and validation into ``out``: the splits' arrays and meta.json."""
    encoder = make_encoder(cfg, tokenizer, labels)
    work = out / ".work"
    num_proc = cfg.num_proc or available_cpus()

    def encode(source: DataSource, name: str) -> EncodedRows:
        tables = row_tables(source, frozenset(numeric_fields(cfg)), work / name)
        return encode_tables(tables, encoder, work / name, num_proc)

    checksums: dict[str, str] = {}
    try:
        rows = encode(cfg.train, "train")
        held = held_out(cfg, seed, len(rows))
        stats = {"train": write_split(rows, None if held is None else ~held, out, "train", checksums)}
        if not stats["train"].kept:
            raise UserInputError(
                cfg.train.path, "no usable training examples: " + stats["train"].summary("train")
            )
        if cfg.validation is not None:
            stats["validation"] = write_split(
                encode(cfg.validation, "validation"), None, out, "validation", checksums
            )
        elif held is not None and held.any():
            stats["validation"] = write_split(rows, held, out, "validation", checksums)
        _check_validation(cfg, stats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_meta(out, stats, checksums)


def held_out(cfg: DataSection, seed: int, n: int) -> np.ndarray | None:
    """Which of ``n`` training rows data.val_fraction holds out (a mask), or None."""
    if cfg.validation is not None or cfg.val_fraction <= 0:
        return None
    order = np.random.default_rng(seed).permutation(n)
    held = np.zeros(n, bool)
    held[order[: max(1, int(round(cfg.val_fraction * n)))]] = True
    return held


def _check_validation(cfg: DataSection, stats: dict[str, SplitStats]) -> None:
    val = stats.get("validation")
    if val is not None and not val.kept:
        where = cfg.validation.path if cfg.validation else "data.val_fraction"
        raise UserInputError(where, "no usable validation examples: " + val.summary("validation"))
