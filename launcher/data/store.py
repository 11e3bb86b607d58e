"""Writing a split's ``.npy`` files from encoded Arrow rows, one record batch at a time.

The encoded files are read with read() calls, not memory-mapped, and the arrays are written
as they stream by, so this process's resident memory stays at one batch whatever the data's
size; each file's sha256 is computed from the bytes written (the cache's checksums)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from launcher.data.encode import NO_TARGET, TOO_LONG, TRUNCATED
from launcher.data.parallel import EncodedRows
from launcher.data.tokenized import SplitStats


class ArrayFile:
    """A ``.npy`` file of a known shape written in pieces, hashed as it is written."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.path, self.dtype = path, np.dtype(dtype)
        self.expected = int(np.prod(shape))
        self.count = 0
        self.hash = hashlib.sha256()
        self.file = path.open("wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": shape}
        np.lib.format.write_array_header_1_0(self, header)

    def write(self, data: Any) -> None:
        """Raw bytes (the header) or an array of this file's dtype."""
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data, dtype=self.dtype)
            self.count += data.size
            data = memoryview(data).cast("B")
        self.file.write(data)
        self.hash.update(data)

    def close(self) -> str:
        self.file.close()
        if self.count != self.expected:
            raise RuntimeError(f"{self.path}: wrote {self.count} values, expected {self.expected}")
        return self.hash.hexdigest()


def write_array(path: Path, array: np.ndarray) -> str:
    out = ArrayFile(path, array.dtype, array.shape)
    out.write(array)
    return out.close()


def _flat(batch: Any, column: str) -> np.ndarray:
    return batch.column(column).flatten().to_numpy(zero_copy_only=False)


def write_split(
    rows: EncodedRows, select: np.ndarray | None, out: Path, name: str, checksums: dict[str, str]
) -> SplitStats:
    """The rows ``select`` picks (a mask over all rows; None: all) that were kept, as the
    split ``name`` in ``out`` (TokenizedSplit.load reads it); their sha256s go to
    ``checksums``."""
    chosen = np.ones(len(rows), bool) if select is None else select
    keep = rows.kept() & chosen
    lengths = rows.lengths[keep].astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    status = rows.status[chosen]
    stats = SplitStats(int(chosen.sum()), len(lengths), int((status == TRUNCATED).sum()),
                       int((status == TOO_LONG).sum()), int((status == NO_TARGET).sum()))
    if not len(lengths):
        return stats
    _stream(rows, keep, out, name, int(offsets[-1]), checksums)
    checksums[f"{name}.offsets.npy"] = write_array(out / f"{name}.offsets.npy", offsets)
    return stats


def _stream(
    rows: EncodedRows, keep: np.ndarray, out: Path, name: str, tokens: int,
    checksums: dict[str, str],
) -> None:
    import pyarrow as pa

    files: dict[str, ArrayFile] = {}
    targets: list[np.ndarray] = []
    at = 0
    for path in rows.files:
        with pa.OSFile(str(path)) as source:
            for batch in pa.ipc.open_stream(source):
                mask = keep[at : at + batch.num_rows]
                at += batch.num_rows
                if not mask.any():
                    continue
                batch = batch.filter(pa.array(mask))
                if not files:
                    files = _open_arrays(batch.schema.names, out, name, tokens)
                for column, file in files.items():
                    file.write(_flat(batch, column))
                if "target" in batch.schema.names:
                    targets.append(_targets(batch))
    if at != len(rows):
        raise RuntimeError(f"the encoded files hold {at} rows, expected {len(rows)}")
    for column, file in files.items():
        checksums[file.path.name] = file.close()
    if targets:
        checksums[f"{name}.targets.npy"] = write_array(
            out / f"{name}.targets.npy", np.concatenate(targets)
        )


def _open_arrays(columns: list[str], out: Path, name: str, tokens: int) -> dict[str, ArrayFile]:
    dtypes = {"input_ids": np.int32, "labels": np.int32, "token_type_ids": np.int8}
    return {c: ArrayFile(out / f"{name}.{c}.npy", dtypes[c], (tokens,))
            for c in dtypes if c in columns}


def _targets(batch: Any) -> np.ndarray:
    """int64 class indices, float32 numbers, or float32 rows of multi-hot classes."""
    import pyarrow as pa

    column = batch.column("target")
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)
    return column.to_numpy(zero_copy_only=False)
