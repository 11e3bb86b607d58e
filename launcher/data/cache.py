"""The tokenized-data cache: a key hashing the data bytes, the tokenizer's files, the chat
template, the split seed and every setting that changes the tokens; entries written atomically
and verified against their checksums on load."""

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


CACHE_VERSION = "2"

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
    relevant = cfg.model_dump(exclude={"packing", "packing_layout", "shuffle", "cache_dir"})
    if cfg.val_fraction > 0:
        relevant["split_seed"] = seed  # which rows are held out
    h.update(json.dumps(relevant, sort_keys=True).encode())
    if labels is not None:
        h.update(json.dumps(labels.model_dump(mode="json"), sort_keys=True).encode())
    return h.hexdigest()[:32]


def default_cache_dir() -> Path:
    return Path(os.environ.get("FTLAUNCH_CACHE", Path.home() / ".cache" / "ftlaunch")) / "tokenized"

def read_cache(entry: Path) -> PreparedData | None:
    """The cached splits, or None when the entry is missing or does not match the checksums
    its meta.json records (a crash mid-write, a truncated or altered file): it is rebuilt."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        for name, digest in meta["files"].items():
            if sha256_file(entry / name) != digest:
                return None
        train = TokenizedSplit.load(entry / "train.npz")
        val = TokenizedSplit.load(entry / "validation.npz") if meta["has_validation"] else None
        stats = {k: SplitStats(**v) for k, v in meta["stats"].items()}
    except (OSError, ValueError, KeyError, TypeError):  # absent, garbled or from another version
        return None
    if not all(_consistent(split) for split in (train, val) if split is not None):
        return None
    return PreparedData(train, val, stats)


def _consistent(split: TokenizedSplit) -> bool:
    offsets = split.offsets
    return (
        len(offsets) >= 1 and int(offsets[0]) == 0 and bool(np.all(np.diff(offsets) >= 0))
        and int(offsets[-1]) == len(split.input_ids) == len(split.labels)
    )


def _write_cache(entry: Path, prepared: PreparedData) -> None:
    """Write into a temp dir beside the entry, fsync, and rename, so no reader (and no later
    run after a crash) sees half a cache; a corrupt entry in the way is replaced."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
    try:
        names = ["train.npz"]
        prepared.train.save(tmp / "train.npz")
        if prepared.validation is not None:
            prepared.validation.save(tmp / "validation.npz")
            names.append("validation.npz")
        meta = {
            "has_validation": prepared.validation is not None,
            "stats": {k: v.__dict__ for k, v in prepared.stats.items()},
            "files": {name: sha256_file(tmp / name) for name in names},
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        for name in [*names, "meta.json"]:
            fsync_path(tmp / name)
        fsync_path(tmp)
        _move_into_place(tmp, entry)
        fsync_path(entry.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
