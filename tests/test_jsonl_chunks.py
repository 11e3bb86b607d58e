"""JSON Lines files cut into chunks for the tokenizing processes give exactly the lines, line
numbers and errors that reading the file line by line gives, wherever the cuts fall."""

from __future__ import annotations

import codecs
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from launcher.data.read import chunk_lines, jsonl_chunks, jsonl_lines
from launcher.errors import UserInputError

LINES = st.lists(st.one_of(
    st.sampled_from(["", " ", "\r", "\t ", '{"a": 1}', '{"a": 1}\r', "[1, 2]", "{"]),
    st.text(alphabet=st.characters(blacklist_characters="\n", blacklist_categories=["Cs"]),
            max_size=300),
), max_size=40)


def by_lines(path: Path) -> list[tuple[int, str]]:
    """The definition: Python's own line iteration, a BOM dropped from the first line."""
    out = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            line = (raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw).decode()
            if line.strip():
                out.append((number, line.removesuffix("\n")))
    return out


def by_chunks(path: Path, rows: int, min_bytes: int) -> list[tuple[int, str]]:
    chunks = list(jsonl_chunks(path, rows, min_bytes))
    assert [start for start, _, _ in chunks] == [0, *(stop for _, stop, _ in chunks)][:len(chunks)]
    assert (chunks[-1][1] if chunks else 0) == path.stat().st_size
    out = []
    with path.open("rb") as f:
        for start, stop, first in chunks:
            f.seek(start)
            out.extend(chunk_lines(f.read(stop - start), first, path))
    return out


@given(lines=LINES, end=st.sampled_from(["", "\n", "\r\n"]), bom=st.booleans(),
       rows=st.integers(1, 50), min_bytes=st.integers(1, 64))
def test_chunks_give_the_lines_reading_line_by_line_gives(tmp_path_factory, lines, end, bom,
                                                          rows, min_bytes):
    path = tmp_path_factory.mktemp("chunks") / "rows # with space.jsonl"
    path.write_bytes(codecs.BOM_UTF8 * bom + ("\n".join(lines) + end).encode())
    assert by_chunks(path, rows, min_bytes) == by_lines(path) == list(jsonl_lines(path))


@pytest.mark.parametrize("min_bytes", [1, 7, 1 << 12])
def test_a_line_that_is_not_utf8_is_named_wherever_the_chunk_starts(tmp_path, min_bytes):
    path = tmp_path / "latin1.jsonl"
    good = b'{"text": "fine"}\n'
    path.write_bytes(good * 20 + b"\n" + b'{"text": "caf\xe9"}\n' + good * 5)
    with pytest.raises(UserInputError) as raised:
        by_chunks(path, 3, min_bytes)
    assert str(raised.value) == (
        f"{path}:22: not UTF-8 text (byte b'\\xe9' at column 14); save the file as UTF-8"
    )


def test_a_line_longer_than_a_chunk_stays_whole(tmp_path):
    path = tmp_path / "long.jsonl"
    long = '{"text": "' + "x" * 100_000 + '"}'
    path.write_text(f'{{"a": 1}}\n{long}\n{{"b": 2}}')
    assert by_chunks(path, 1, 1) == [(1, '{"a": 1}'), (2, long), (3, '{"b": 2}')]
