"""The tokenized-data cache: a key hashing the data bytes, the tokenizer's files, the chat
template, the split seed and every setting that changes the tokens; entries (one ``.npy`` file
per array, memory-mapped by every process that reads them) published atomically and verified
against their checksums before use."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from launcher.data.encode import resolve_chat_template
from launcher.data.read import is_local, local_files
from launcher.data.tokenized import PreparedData, SplitStats, TokenizedSplit
from launcher.durable import fsync_path, sha256_file
from launcher.errors import UserInputError
from launcher.recipe.sections import DataSection, DataSource, LabelsSection


CACHE_VERSION = "3"  # 3: one memory-mapped .npy file per array

def _hash_source(h: Any, source: DataSource) -> bool:
    """Feed a source's identity into ``h``: local files by name and contents, a hub dataset
    by its pinned revision. False for a hub dataset without a revision, whose contents may
    change under the same name (it is read afresh every time, not cached)."""
    if not is_local(source):
        h.update(json.dumps([source.path, source.subset, source.split, source.revision]).encode())
        return source.revision is not None
    for path in local_files(source):
        h.update(str(path.resolve()).encode() + b"\0")
        try:
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as e:
            raise UserInputError(str(path), f"cannot read: {e.strerror}") from None
        h.update(b"\0")
    return True


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of everything that decides how a tokenizer encodes: the files it saves (vocab,
    merges or sentencepiece model, added and special tokens, normalizer and post-processor,
    its config), fast or slow alike, plus its class and its in-memory special tokens (the
    pad token ftlaunch may set)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory(prefix="ftlaunch-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    h.update(repr(sorted((i, str(t)) for i, t in tokenizer.added_tokens_decoder.items())).encode())
    return h.hexdigest()


def cache_key(
    cfg: DataSection, tokenizer: Any, labels: LabelsSection | None = None, seed: int = 0
) -> str | None:
    """A hash of everything that changes the tokenized splits, or None when they cannot be
    identified (a hub dataset without a pinned revision) and must not be cached."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    for source in (cfg.train, cfg.validation):
        if source is not None and not _hash_source(h, source):
            return None
    h.update(tokenizer_fingerprint(tokenizer).encode())
    if cfg.format == "chat":
        h.update(str(resolve_chat_template(cfg, tokenizer) or tokenizer.chat_template).encode())
    relevant = cfg.model_dump(exclude={"packing", "packing_layout", "shuffle", "cache_dir", "num_proc"})
    if cfg.val_fraction > 0:
        relevant["split_seed"] = seed  # which rows are held out
    h.update(json.dumps(relevant, sort_keys=True).encode())
    if labels is not None:
        h.update(json.dumps(labels.model_dump(mode="json"), sort_keys=True).encode())
    return h.hexdigest()[:32]


def default_cache_dir() -> Path:
    return Path(os.environ.get("FTLAUNCH_CACHE", Path.home() / ".cache" / "ftlaunch")) / "tokenized"

def read_cache(entry: Path, verified: bool = False) -> PreparedData | None:
    """The cached splits, memory-mapped, or None when the entry is missing or does not match
    the checksums its meta.json records (a crash mid-write, a truncated or altered file): it
    is rebuilt. Every file is hashed before it is mapped, unless ``verified``: the entry was
    just published by this process, whose checksums are of the bytes it wrote, or verified by
    it (``publish``)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        for name, digest in meta["files"].items():
            if not verified and sha256_file(entry / name) != digest:
                return None
        names = ("train", "validation") if meta["has_validation"] else ("train",)
        if not all(f"{n}.{a}.npy" in meta["files"] for n in names for a in REQUIRED):
            return None
        splits = [TokenizedSplit.load(entry, n) for n in names]
        stats = {k: SplitStats(**v) for k, v in meta["stats"].items()}
    except (OSError, ValueError, KeyError, TypeError):  # absent, garbled or from another version
        return None
    if not all(_consistent(split) for split in splits):
        return None
    return PreparedData(splits[0], splits[1] if len(splits) > 1 else None, stats)


REQUIRED = ("input_ids", "labels", "offsets")


def _consistent(split: TokenizedSplit) -> bool:
    offsets = split.offsets
    tokens = len(split.input_ids)
    return (
        offsets.ndim == 1 and len(offsets) >= 1 and int(offsets[0]) == 0
        and bool(np.all(np.diff(offsets) >= 0))
        and int(offsets[-1]) == tokens == len(split.labels)
        and (split.targets is None or len(split.targets) == len(split))
        and (split.token_type_ids is None or len(split.token_type_ids) == tokens)
    )


def write_meta(entry: Path, prepared_stats: dict[str, SplitStats], checksums: dict[str, str]) -> None:
    meta = {
        "has_validation": "validation" in prepared_stats,
        "stats": {k: v.__dict__ for k, v in prepared_stats.items()},
        "files": checksums,
    }
    (entry / "meta.json").write_text(json.dumps(meta))


def publish(tmp: Path, entry: Path) -> None:
    """fsync a finished entry written in ``tmp`` (beside ``entry``) and rename it into place,
    so no reader (and no later run after a crash) sees half a cache; an intact entry another
    process published first wins, a corrupt one in the way is replaced. Either way the entry
    in place afterwards has been verified: this process's own bytes were hashed as they were
    written, another's are hashed before they win (an intact entry is never replaced)."""
    for path in tmp.iterdir():
        fsync_path(path)
    fsync_path(tmp)
    _move_into_place(tmp, entry)
    fsync_path(entry.parent)


def _move_into_place(tmp: Path, entry: Path) -> None:
    """Rename ``tmp`` to ``entry``; an intact entry another process wrote first wins, a
    corrupt one (never used) is moved aside and removed."""
    try:
        tmp.rename(entry)
        return
    except OSError:
        if read_cache(entry) is not None:
            return
    stale = entry.with_name(f".{entry.name}.stale.{os.getpid()}")
    entry.rename(stale)
    shutil.rmtree(stale, ignore_errors=True)
    tmp.rename(entry)
