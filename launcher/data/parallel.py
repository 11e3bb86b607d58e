"""Tokenizing row tables in parallel: ``datasets.map(batched=True)`` with the Encoder over
contiguous shards of each table, one forked process per shard (``forked.py``: a stop ends them
at once; ``datasets.map(num_proc=N)``'s own pool could hang on it), into Arrow files that
hold one encoded row per input row (dropped rows keep their place, with no tokens), so a split
is chosen afterwards by row number.

A bad row raises UserInputError naming its place in whichever process reads it; it is raised
again here, and the caller removes the half-written work directory."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from launcher.data.encode import KEPT, TRUNCATED, Encoder, finish
from launcher.data.forked import Report, run_shards
from launcher.data.rowtable import RowNaming, RowTable


ROWS_PER_PROCESS = 1000  # a file of fewer rows is tokenized in this process (= map's batch)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as a container limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class EncodedRows:
    """A source's encoded rows: their Arrow files in row order, and per row its token count
    and what became of it (encode.KEPT, TRUNCATED, TOO_LONG or NO_TARGET)."""

    files: tuple[Path, ...]
    lengths: np.ndarray
    status: np.ndarray

    def __len__(self) -> int:
        return len(self.status)

    def kept(self) -> np.ndarray:
        return (self.status == KEPT) | (self.status == TRUNCATED)


def encoded_features(encoder: Encoder) -> Any:
    import datasets

    cfg, labels = encoder.cfg, encoder.labels
    ints = datasets.List(datasets.Value("int32"))
    features = {"input_ids": ints, "labels": ints, "length": datasets.Value("int32"),
                "status": datasets.Value("int8")}
    if cfg.format == "classification":
        kind = labels.problem_type if labels is not None else "single_label"
        features["target"] = {
            "single_label": datasets.Value("int64"), "regression": datasets.Value("float32"),
            "multi_label": datasets.List(datasets.Value("float32")),
        }[kind]
        if encoder.token_types:
            features["token_type_ids"] = datasets.List(datasets.Value("int8"))
    return datasets.Features(features)


def encode_batch(
    batch: dict[str, list[Any]], indices: list[int], naming: RowNaming, encoder: Encoder
) -> dict[str, list[Any]]:
    """One ``map`` batch: rows to columns; rows that are dropped keep their place, empty."""
    rows, wheres = naming.rows(batch, indices)
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": [], "status": []}
    has_target = encoder.cfg.format == "classification"
    has_types = encoder.token_types
    for name in ("target",) * has_target + ("token_type_ids",) * has_types:
        out[name] = []
    for enc in encoder.encode(rows, wheres):
        status, enc = finish(enc, encoder.cfg)
        kept = status in (KEPT, TRUNCATED)
        out["input_ids"].append(enc.input_ids if kept else [])
        out["labels"].append(enc.labels if kept else [])
        out["length"].append(len(enc.input_ids) if kept else 0)
        out["status"].append(status)
        if has_target:
            out["target"].append(enc.target)
        if has_types:
            out["token_type_ids"].append(enc.token_type_ids if kept else [])
    return out


def encode_tables(
    tables: list[RowTable], encoder: Encoder, work: Path, num_proc: int
) -> EncodedRows:
    """Encode every table, each with up to ``num_proc`` processes, and no more processes
    than this process has CPUs (more would only wait for them, each holding a tokenizer) nor
    than one per ROWS_PER_PROCESS rows."""
    from datasets.utils import tqdm as hf_tqdm

    files: list[Path] = []
    features = encoded_features(encoder)
    for n, table in enumerate(tables):
        ds = table.dataset
        if len(ds) == 0:
            continue
        procs = max(1, min(num_proc, available_cpus(), len(ds) // ROWS_PER_PROCESS))
        desc = f"tokenizing {table.naming.prefix.rstrip(': ')}"
        encode = EncodeShard(table, encoder, features)
        if procs == 1:
            files.append(encode(0, len(ds), work / f"encoded-{n}.arrow", desc=desc))
            continue
        bounds = np.linspace(0, len(ds), procs + 1).astype(int)
        paths = [work / f"encoded-{n}-{i}.arrow" for i in range(procs)]
        shards = [partial(_in_child, encode, start, end, path)
                  for start, end, path in zip(bounds[:-1], bounds[1:], paths)]
        with hf_tqdm(total=len(ds), unit=" examples", desc=f"{desc} (num_proc={procs})") as bar:
            run_shards(shards, bar.update)
        files.extend(paths)
    return _read_encoded(files)


@dataclass(frozen=True)
class EncodeShard:
    """Rows ``start:end`` of a table through the Encoder into one Arrow file, reporting each
    batch done when told how (a forked shard) or with datasets' own bar (``desc``)."""

    table: RowTable
    encoder: Encoder
    features: Any

    def __call__(self, start: int, end: int, path: Path, report: Report | None = None,
                 desc: str | None = None) -> Path:
        ds = self.table.dataset
        rows = ds if (start, end) == (0, len(ds)) else ds.select(range(start, end))
        rows.map(
            _encode_and_report, batched=True, batch_size=ROWS_PER_PROCESS, with_indices=True,
            remove_columns=ds.column_names, features=self.features,
            fn_kwargs={"naming": self.table.naming, "encoder": self.encoder, "offset": start,
                       "report": report},
            cache_file_name=str(path), load_from_cache_file=False,
            new_fingerprint=uuid.uuid4().hex, desc=desc,
        )
        return path


def _in_child(encode: EncodeShard, start: int, end: int, path: Path, report: Report) -> None:
    import datasets

    datasets.disable_progress_bars()  # the parent's bar counts what the shards report
    encode(start, end, path, report=report)


def _encode_and_report(batch: dict[str, list[Any]], indices: list[int], naming: RowNaming,
                       encoder: Encoder, offset: int, report: Report | None) -> dict[str, list[Any]]:
    out = encode_batch(batch, [offset + i for i in indices], naming, encoder)
    if report is not None:
        report(len(indices))
    return out


def _read_encoded(files: list[Path]) -> EncodedRows:
    if not files:
        return EncodedRows((), np.zeros(0, np.int32), np.zeros(0, np.int8))
    import datasets

    lengths, status = [], []
    for path in files:
        table = datasets.Dataset.from_file(str(path)).data
        lengths.append(table.column("length").to_numpy())
        status.append(table.column("status").to_numpy())
    return EncodedRows(tuple(files), np.concatenate(lengths), np.concatenate(status))
