"""Reading rows: local JSON Lines, JSON, Parquet and CSV files, or a hub dataset.

Errors name the place as a user finds it: ``file:line`` (JSON Lines, CSV, a JSON array: the
line its element starts on), else ``file:row N`` (Parquet, a hub dataset), rows counted from 1."""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from launcher.data.tokenized import Row
from launcher.errors import UserInputError
from launcher.recipe.sections import DataSection, DataSource


LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

def is_local(source: DataSource) -> bool:
    path = Path(source.path)
    return path.exists() or path.suffix in LOCAL_SUFFIXES


def local_files(source: DataSource) -> list[Path]:
    path = Path(source.path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise UserInputError(source.path, "directory holds no .jsonl/.json/.parquet/.csv files")
        return files
    if not path.exists():
        raise UserInputError(source.path, "file not found")
    if path.suffix not in LOCAL_SUFFIXES:
        raise UserInputError(source.path, f"unsupported file type; use {sorted(LOCAL_SUFFIXES)}")
    return [path]


def numeric_fields(cfg: DataSection) -> tuple[str, ...]:
    """Columns a CSV cell is read as a number from (a class index or a regression target);
    every other CSV cell stays the text it is."""
    return (cfg.fields.label,) if cfg.format == "classification" else ()


def read_rows(source: DataSource, numeric: Sequence[str] = ()) -> list[Row]:
    """Every row of a small source as a list (tests, ``--show``); the pipeline streams them
    through Arrow instead (``rowtable``)."""
    return list(iter_rows(source, numeric))


def iter_rows(source: DataSource, numeric: Sequence[str] = ()) -> Iterator[Row]:
    """Every row of a source, one at a time; JSON Lines and CSV rows keep their line numbers
    for error messages. ``numeric`` names the CSV columns whose cells are numbers where they
    look like one."""
    if not is_local(source):
        yield from native_rows(hub_dataset(source), hub_row_prefix(source))
        return
    for path in local_files(source):
        if path.suffix == ".jsonl":
            for number, line in jsonl_lines(path):
                yield Row(parse_object(line, f"{path}:{number}"), f"{path}:{number}")
        elif path.suffix == ".csv":
            for number, data in csv_records(path, frozenset(numeric)):
                yield Row(data, f"{path}:{number}")
        elif path.suffix == ".json" and is_json_array(path):
            for number, _text, value in json_array_elements(path):
                yield Row(value, f"{path}:{number}")
        else:
            yield from native_rows(file_dataset(path), f"{path}:row ")


def native_rows(ds: Any, prefix: str) -> Iterator[Row]:
    for i, row in enumerate(ds, start=1):
        yield Row(row, f"{prefix}{i}")


JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "true/false", type(None): "null"}


def jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a JSON Lines file and their numbers; a UTF-8 byte-order mark
    and CRLF endings are fine; a line that is not UTF-8 is an error naming it."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise UserInputError(str(path), f"cannot read: {e.strerror}") from None
    with f:
        for number, raw in enumerate(f, start=1):
            line = _decode_line(raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw,
                                f"{path}:{number}")
            if line.strip():
                yield number, line


def parse_object(line: str, where: str) -> dict[str, Any]:
    """One JSON Lines row: a JSON object, or an error naming the line."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserInputError(where, f"malformed JSON: {e.msg}") from None
    return _object_row(value, where, "each line")


def is_json_array(path: Path) -> bool:
    """A .json file holding an array (read here, with line numbers); any other .json (JSON
    Lines under that name, a columnar object) is read by ``datasets``."""
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16).removeprefix(codecs.BOM_UTF8)
    except OSError as e:
        raise UserInputError(str(path), f"cannot read: {e.strerror}") from None
    return head.lstrip().startswith(b"[")


def json_array_elements(path: Path) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """A JSON array of objects: each element's line (where it starts), text and value."""
    text = _read_text(path)
    decoder = json.JSONDecoder()
    at = _skip_space(text, text.index("[") + 1, path)
    line, counted, count = 1, 0, 0  # lines counted up to ``counted``: one pass over the file
    while not text.startswith("]", at):
        if count:
            if not text.startswith(",", at):
                raise _malformed(path, text, at, "expected ',' or ']' between rows")
            at = _skip_space(text, at + 1, path)
        line, counted, start = line + text.count("\n", counted, at), at, at
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as e:
            raise UserInputError(f"{path}:{e.lineno}", f"malformed JSON: {e.msg}") from None
        count += 1
        yield line, text[start:at], _object_row(value, f"{path}:{line}", f"row {count}")
        at = _skip_space(text, at, path)
    rest = text[at + 1 :]
    if rest.strip():
        raise _malformed(path, text, len(text) - len(rest.lstrip()), "extra data after the array")


def _object_row(value: object, where: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        got = JSON_TYPES.get(type(value), type(value).__name__)
        raise UserInputError(where, f"{what} must be a JSON object, got {got}")
    return value


def _skip_space(text: str, at: int, path: Path) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    if at >= len(text):
        raise _malformed(path, text, len(text.rstrip()), "the array is not closed with ']'")
    return at


def _malformed(path: Path, text: str, at: int, what: str) -> UserInputError:
    return UserInputError(f"{path}:{text.count(chr(10), 0, at) + 1}", f"malformed JSON: {what}")


def _decode_line(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(where, raw[e.start : e.start + 1], e.start + 1) from None


def _not_utf8(where: str, byte: bytes, column: int) -> UserInputError:
    return UserInputError(
        where, f"not UTF-8 text (byte {byte!r} at column {column}); save the file as UTF-8"
    )


def _read_text(path: Path) -> str:
    """A whole file as UTF-8 text, without a leading byte-order mark."""
    try:
        data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    except OSError as e:
        raise UserInputError(str(path), f"cannot read: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        byte, column = data[e.start : e.start + 1], e.start - line_start + 1
        raise _not_utf8(f"{path}:{line}", byte, column) from None


def csv_records(path: Path, numeric: frozenset[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """CSV with a header line; cells are text (numbers only in ``numeric`` columns), quoted
    fields may span lines, and every row is named by the line it starts on."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    header, start = None, 1
    try:
        for cells in reader:
            number, start = start, reader.line_num + 1
            if not cells:
                continue
            if header is None:
                header = cells
                continue
            if len(cells) != len(header):
                raise UserInputError(
                    f"{path}:{number}", f"{len(cells)} fields, but the header line has {len(header)}"
                )
            yield number, {k: _csv_cell(v) if k in numeric else v for k, v in zip(header, cells)}
    except csv.Error as e:
        raise UserInputError(f"{path}:{start}", f"malformed CSV: {e}") from None
    if header is None:
        raise UserInputError(str(path), "empty CSV file: it needs a header line naming the columns")


def _csv_cell(value: str) -> int | float | str | None:
    """A cell of a numeric column: an int or float where it reads as one, None when empty."""
    text = value.strip()
    if not text:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return value


def file_dataset(path: Path) -> Any:
    """A Parquet, CSV or non-array JSON file as ``datasets`` reads it (memory-mapped Arrow)."""
    import datasets

    builder = LOCAL_SUFFIXES[path.suffix]
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        raise UserInputError(str(path), f"cannot read {builder} file: {e}") from None


def hub_dataset(source: DataSource) -> Any:
    import datasets

    try:
        return datasets.load_dataset(
            source.path, source.subset, split=source.split, revision=source.revision
        )
    except Exception as e:
        raise UserInputError(source.path, f"cannot load dataset: {e}") from None


def hub_row_prefix(source: DataSource) -> str:
    return f"{source.path}[{source.split}] row "
