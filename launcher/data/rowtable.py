"""A source's rows as Arrow tables on disk, so tokenizing processes share them memory-mapped
and no process holds a Python list of every row.

JSON Lines, CSV and JSON-array files are split into rows here (one pass, line numbers kept)
and stored as each row's JSON text and line number; the tokenizing processes parse them.
Parquet, other JSON and hub datasets already are Arrow tables (``datasets`` keeps them
memory-mapped) and are used as they are, rows named by their index from 1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.data.read import (
    csv_records,
    file_dataset,
    hub_dataset,
    hub_row_prefix,
    is_json_array,
    is_local,
    json_array_elements,
    jsonl_lines,
    local_files,
    parse_object,
)
from launcher.recipe.sections import DataSource


WRITE_BATCH = 8192


@dataclass(frozen=True)
class RowNaming:
    """How a table's rows are read and named. ``raw``: columns ``line`` and ``row`` (a JSON
    object's text), a row named ``prefix + line``; else the file's own columns, row i named
    ``prefix + (i + 1)``."""

    prefix: str
    raw: bool

    def rows(self, batch: dict[str, list[Any]], indices: list[int]) -> tuple[list[dict], list[str]]:
        """A batch of ``dataset.map`` as row dicts and the place each row comes from."""
        if self.raw:
            wheres = [f"{self.prefix}{line}" for line in batch["line"]]
            return [parse_object(text, w) for text, w in zip(batch["row"], wheres)], wheres
        names = list(batch)
        rows = [dict(zip(names, values)) for values in zip(*(batch[n] for n in names))]
        return rows, [f"{self.prefix}{i + 1}" for i in indices]


@dataclass(frozen=True)
class RowTable:
    dataset: Any  # datasets.Dataset, memory-mapped
    naming: RowNaming


def row_tables(source: DataSource, numeric: frozenset[str], work: Path) -> list[RowTable]:
    """Every file of ``source`` as a RowTable; split files are written under ``work``."""
    if not is_local(source):
        return [RowTable(hub_dataset(source), RowNaming(hub_row_prefix(source), raw=False))]
    tables = []
    for n, path in enumerate(local_files(source)):
        records = _records(path, numeric)
        if records is None:
            tables.append(RowTable(file_dataset(path), RowNaming(f"{path}:row ", raw=False)))
        else:
            table = _write_table(records, work / f"rows-{n}.arrow")
            tables.append(RowTable(table, RowNaming(f"{path}:", raw=True)))
    return tables


def _records(path: Path, numeric: frozenset[str]) -> Iterator[tuple[int, str]] | None:
    """(line, JSON text) of each row of a file split here; None for a file ``datasets`` reads."""
    if path.suffix == ".jsonl":
        return jsonl_lines(path)
    if path.suffix == ".csv":
        return ((n, json.dumps(data)) for n, data in csv_records(path, numeric))
    if path.suffix == ".json" and is_json_array(path):
        return ((n, text) for n, text, _ in json_array_elements(path))
    return None


def _write_table(records: Iterator[tuple[int, str]], path: Path) -> Any:
    """Stream ``records`` into an Arrow file in batches, then open it memory-mapped."""
    import datasets
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("line", pa.int64()), ("row", pa.large_string())])
    lines: list[int] = []
    texts: list[str] = []
    written = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for line, text in records:
            lines.append(line)
            texts.append(text)
            if len(lines) == WRITE_BATCH:
                writer.write_batch(pa.record_batch([lines, texts], schema=schema))
                lines, texts, written = [], [], written + 1
        if lines or not written:  # an empty file is a table with no rows
            writer.write_batch(pa.record_batch([lines, texts], schema=schema))
    return datasets.Dataset.from_file(str(path))
