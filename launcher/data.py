"""Data: read rows, render formats, tokenize with prompt masking, cache, sample and collate.

Reading and encoding errors name the place as a user finds it: ``file:line`` (JSON Lines, CSV,
a JSON array: the line its element starts on), else ``file:row N`` (Parquet, a hub dataset),
rows counted from 1. Tokenized splits are cached under a key hashing the data bytes, the tokenizer's files,
the chat template, the split seed and every setting that changes the tokens, so each node
tokenizes once and every worker reuses it; an entry is verified against its checksums on load.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.durable import fsync_path, sha256_file
from launcher.errors import UserInputError
from launcher.recipe import DataSection, DataSource, LabelsSection

IGNORE_INDEX = -100
CACHE_VERSION = "2"
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


class RowError(ValueError):
    """A row that cannot be encoded; the caller adds where it came from."""


@dataclass(frozen=True)
class Row:
    data: dict[str, Any]
    where: str


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    target: int | float | tuple[float, ...] | None = None  # sequence classification only
    token_type_ids: list[int] | None = None  # text pairs, for models with segment embeddings


@dataclass(frozen=True)
class TokenizedSplit:
    """Variable-length examples stored flat: example i is ``tokens[offsets[i]:offsets[i+1]]``.

    Sequence classification adds one target per example in ``targets``: int64 class indices
    (single_label), float32 rows of multi-hot classes (multi_label) or float32 numbers
    (regression); the dtype and shape carry the meaning into the batch unchanged.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    targets: np.ndarray | None = None
    token_type_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[lo:hi], self.labels[lo:hi]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @staticmethod
    def from_examples(examples: Sequence[Encoded]) -> TokenizedSplit:
        lengths = [len(e.input_ids) for e in examples]
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat_ids = [t for e in examples for t in e.input_ids]
        flat_labels = [t for e in examples for t in e.labels]
        targets = types = None
        first = examples[0] if examples else None
        if getattr(first, "target", None) is not None:
            integer = isinstance(first.target, int)
            targets = np.asarray(
                [e.target for e in examples], dtype=np.int64 if integer else np.float32
            )
        if getattr(first, "token_type_ids", None) is not None:
            types = np.asarray([t for e in examples for t in e.token_type_ids], dtype=np.int8)
        return TokenizedSplit(
            np.asarray(flat_ids, dtype=np.int32), np.asarray(flat_labels, dtype=np.int32), offsets,
            targets, types,
        )

    def save(self, path: Path) -> None:
        optional = {
            k: v for k, v in (("targets", self.targets), ("token_type_ids", self.token_type_ids))
            if v is not None
        }
        np.savez(path, input_ids=self.input_ids, labels=self.labels, offsets=self.offsets, **optional)

    @staticmethod
    def load(path: Path) -> TokenizedSplit:
        with np.load(path, allow_pickle=False) as f:
            return TokenizedSplit(
                f["input_ids"], f["labels"], f["offsets"],
                f["targets"] if "targets" in f else None,
                f["token_type_ids"] if "token_type_ids" in f else None,
            )


@dataclass(frozen=True)
class SplitStats:
    read: int
    kept: int
    truncated: int
    dropped_too_long: int
    dropped_no_target: int

    def summary(self, name: str) -> str:
        return (
            f"{name}: {self.kept} examples kept of {self.read} read "
            f"({self.truncated} truncated, {self.dropped_too_long} dropped as too long, "
            f"{self.dropped_no_target} dropped with no target tokens)"
        )


@dataclass(frozen=True)
class PreparedData:
    train: TokenizedSplit
    validation: TokenizedSplit | None
    stats: dict[str, SplitStats] = field(default_factory=dict)


# ---------------------------------------------------------------- reading


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
    """Read every row of a source; JSON Lines and CSV rows keep their line numbers for error
    messages. ``numeric`` names the CSV columns whose cells are numbers where they look like
    one."""
    if not is_local(source):
        return _read_hub(source)
    rows: list[Row] = []
    for path in local_files(source):
        if path.suffix == ".jsonl":
            rows.extend(_read_jsonl(path))
        elif path.suffix == ".csv":
            rows.extend(_read_csv(path, frozenset(numeric)))
        elif path.suffix == ".json":
            rows.extend(_read_json(path))
        else:
            rows.extend(_read_with_datasets(path))
    return rows


JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "true/false", type(None): "null"}


def _read_jsonl(path: Path) -> Iterator[Row]:
    """One JSON object per line; a UTF-8 byte-order mark, CRLF endings and blank lines are
    fine; a line that is not UTF-8 or not an object is an error naming it."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise UserInputError(str(path), f"cannot read: {e.strerror}") from None
    with f:
        for number, raw in enumerate(f, start=1):
            line = _decode_line(raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw,
                                f"{path}:{number}")
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserInputError(f"{path}:{number}", f"malformed JSON: {e.msg}") from None
            if not isinstance(value, dict):
                got = JSON_TYPES.get(type(value), type(value).__name__)
                raise UserInputError(
                    f"{path}:{number}", f"each line must be a JSON object, got {got}"
                )
            yield Row(value, f"{path}:{number}")


def _read_json(path: Path) -> list[Row]:
    """A JSON array of objects, each row named by the line its element starts on; any other
    .json (JSON Lines under that name, a columnar object) is read by ``datasets``."""
    text = _read_text(path)
    if not text.lstrip().startswith("["):
        return _read_with_datasets(path)
    decoder = json.JSONDecoder()
    rows: list[Row] = []
    at = _skip_space(text, text.index("[") + 1, path)
    while not text.startswith("]", at):
        if rows:
            if not text.startswith(",", at):
                raise _malformed(path, text, at, "expected ',' or ']' between rows")
            at = _skip_space(text, at + 1, path)
        line = text.count("\n", 0, at) + 1
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as e:
            raise UserInputError(f"{path}:{e.lineno}", f"malformed JSON: {e.msg}") from None
        if not isinstance(value, dict):
            got = JSON_TYPES.get(type(value), type(value).__name__)
            raise UserInputError(
                f"{path}:{line}", f"row {len(rows) + 1} must be a JSON object, got {got}"
            )
        rows.append(Row(value, f"{path}:{line}"))
        at = _skip_space(text, at, path)
    rest = text[at + 1 :]
    if rest.strip():
        raise _malformed(path, text, len(text) - len(rest.lstrip()), "extra data after the array")
    return rows


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


def _read_csv(path: Path, numeric: frozenset[str]) -> Iterator[Row]:
    """CSV with a header line; cells are text (numbers only in ``numeric`` columns), quoted
    fields may span lines, and every row is named by the line it starts on."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    header, start = None, 1
    try:
        for cells in reader:
            where, start = f"{path}:{start}", reader.line_num + 1
            if not cells:
                continue
            if header is None:
                header = cells
                continue
            if len(cells) != len(header):
                raise UserInputError(
                    where, f"{len(cells)} fields, but the header line has {len(header)}"
                )
            yield Row({k: _csv_cell(v) if k in numeric else v for k, v in zip(header, cells)},
                      where)
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


def _read_with_datasets(path: Path) -> list[Row]:
    import datasets

    builder = LOCAL_SUFFIXES[path.suffix]
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        raise UserInputError(str(path), f"cannot read {builder} file: {e}") from None
    return [Row(r, f"{path}:row {i}") for i, r in enumerate(ds, start=1)]


def _read_hub(source: DataSource) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(
            source.path, source.subset, split=source.split, revision=source.revision
        )
    except Exception as e:
        raise UserInputError(source.path, f"cannot load dataset: {e}") from None
    return [Row(r, f"{source.path}[{source.split}] row {i}") for i, r in enumerate(ds, start=1)]


# ---------------------------------------------------------------- encoding


def _text_field(row: dict[str, Any], name: str, required: bool = True) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise RowError(f"missing field '{name}'")
        return ""
    if not isinstance(value, str):
        raise RowError(f"field '{name}' must be a string, got {type(value).__name__}")
    return value


PLACEHOLDER = re.compile(r"\{(instruction|input_block|input)\}")


def fill_prompt(template: str, values: dict[str, str]) -> str:
    """Replace the ``{instruction}``, ``{input}`` and ``{input_block}`` placeholders in one
    pass; every other character, braces included, is literal text (a JSON example in a
    prompt stays as written, and a row's text is never read as a placeholder)."""
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def encode_instruction(row: dict[str, Any], cfg: DataSection, tokenizer: Any) -> Encoded:
    names = cfg.fields
    instruction = _text_field(row, names.instruction)
    extra = _text_field(row, names.input, required=False)
    output = _text_field(row, names.output)
    input_block = f"### Input:\n{extra}\n\n" if extra else ""
    values = {"instruction": instruction, "input": extra, "input_block": input_block}
    prompt = fill_prompt(cfg.prompt_template, values)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + answer_ids
    masked = ids if cfg.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return Encoded(ids, list(masked))


def encode_text(row: dict[str, Any], cfg: DataSection, tokenizer: Any) -> Encoded:
    ids = tokenizer(_text_field(row, cfg.fields.text), add_special_tokens=True)["input_ids"]
    ids = ids + [tokenizer.eos_token_id]
    return Encoded(ids, list(ids))


def chat_messages(row: dict[str, Any], cfg: DataSection) -> list[dict[str, str]]:
    """Normalise OpenAI (role/content) or ShareGPT (from/value) turns to role/content."""
    names = cfg.fields
    key = names.messages or ("messages" if "messages" in row else "conversations")
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise RowError(f"field '{key}' must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"{key}[{i}] must be an object")
        role_key = names.role or ("role" if "role" in turn else "from")
        content_key = names.content or ("content" if "content" in turn else "value")
        role, content = turn.get(role_key), turn.get(content_key)
        if not isinstance(role, str) or not isinstance(content, str):
            raise RowError(f"{key}[{i}] needs string '{role_key}' and '{content_key}'")
        messages.append({"role": ROLE_ALIASES.get(role, role), "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(f"'{key}' has no assistant turn to learn from")
    return messages


def encode_chat(
    row: dict[str, Any], cfg: DataSection, tokenizer: Any, template: str | None
) -> Encoded:
    """Render with the chat template; train on each assistant turn's content and its
    end-of-turn, mask everything else (BOS, system and user turns, role headers).

    Spans are found by rendering growing prefixes of the conversation, so any template that
    renders prefixes consistently works, without special template markers.
    """
    messages = chat_messages(row, cfg)

    def render(msgs: list[dict[str, str]], gen: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=gen, chat_template=template
            )
        except Exception as e:  # jinja2 raises whatever the template's own code raises
            raise RowError(f"the chat template cannot render this conversation: {e}") from None

    text = render(messages)
    spans = [
        assistant_span(render, messages, i, text)
        for i, message in enumerate(messages)
        if message["role"] == "assistant"
    ]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if cfg.train_on_prompt:
        return Encoded(ids, list(ids))
    labels = [
        tok if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for tok, (start, _end) in zip(ids, enc["offset_mapping"])
    ]
    return Encoded(ids, labels)


def assistant_span(
    render: Any, messages: list[dict[str, str]], i: int, text: str
) -> tuple[int, int]:
    """Character span of assistant turn ``i`` in ``text``: from where its content starts to
    the end of its turn.

    The turn starts after the conversation before it rendered with the generation prompt (the
    assistant header). A template that ignores add_generation_prompt (or cannot render an
    empty conversation, for a first turn) renders that header inside the turn, so the
    content is looked up inside the turn instead; a turn whose content cannot be found is
    refused rather than trained with its header.
    """
    through = render(messages[: i + 1])
    if not text.startswith(through):
        raise RowError("the chat template does not render conversation prefixes consistently")
    plain, prompted = _render_prefix(render, messages[:i])
    if prompted is not None and prompted != plain and through.startswith(prompted):
        return len(prompted), len(through)
    base = len(plain) if plain is not None and through.startswith(plain) else 0
    content = messages[i]["content"].strip()
    at = through.find(content, base) if content else -1
    if at < 0:
        raise RowError(
            f"cannot find assistant turn {i}'s content in what the chat template renders for "
            "it, and the template adds no generation prompt to mark where it starts; use a "
            "template that honours add_generation_prompt (data.chat_template)"
        )
    return at, len(through)


def _render_prefix(render: Any, prefix: list[dict[str, str]]) -> tuple[str | None, str | None]:
    """The conversation before a turn rendered without and with the generation prompt; None
    for a rendering the template refuses (many cannot render an empty conversation)."""
    out: list[str | None] = []
    for gen in (False, True):
        try:
            out.append(render(prefix, gen))
        except Exception:  # jinja2 raises anything a template's own code can raise
            if prefix:
                raise
            out.append(None)
    return out[0], out[1]


def resolve_chat_template(cfg: DataSection, tokenizer: Any) -> str | None:
    """The template to render chat data with (None: the tokenizer's own), or an error."""
    if cfg.chat_template:
        return read_chat_template(cfg.chat_template)
    if getattr(tokenizer, "chat_template", None):
        return None
    raise UserInputError(
        "data.chat_template",
        "the tokenizer has no chat template; name one (inline Jinja or a file path)",
    )


def read_chat_template(value: str) -> str:
    """data.chat_template: the file it names, else inline Jinja. A value that names no file
    and holds no Jinja tag is an error (a mistyped path is never rendered as literal text)."""
    path = Path(value).expanduser()
    try:
        is_file = path.is_file()
    except OSError:  # e.g. an inline template longer than a file name may be
        is_file = False
    if is_file:
        try:
            return path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise UserInputError("data.chat_template", f"cannot read {value}: {e}") from None
    if "{{" in value or "{%" in value:
        return value
    raise UserInputError(
        "data.chat_template",
        f"'{_shorten(value)}' is neither an existing file nor a Jinja template "
        "({{ ... }} or {% ... %})",
    )


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_rows(
    rows: Sequence[Row], cfg: DataSection, tokenizer: Any, labels: LabelsSection | None = None
) -> tuple[list[Encoded], SplitStats]:
    """Encode every row; ``labels`` is the resolved label set of the classification formats."""
    from launcher import classification

    template = resolve_chat_template(cfg, tokenizer) if cfg.format == "chat" else None
    if cfg.format in ("classification", "tagging") and labels is None:
        raise UserInputError("labels", f"the {cfg.format} format needs a label set")
    kept: list[Encoded] = []
    truncated = too_long = no_target = 0
    for row in rows:
        try:
            if cfg.format == "instruction":
                enc = encode_instruction(row.data, cfg, tokenizer)
            elif cfg.format == "chat":
                enc = encode_chat(row.data, cfg, tokenizer, template)
            elif cfg.format == "classification":
                enc = classification.encode_classification(row.data, cfg, tokenizer, labels)
            elif cfg.format == "tagging":
                enc = classification.encode_tagging(row.data, cfg, tokenizer, labels)
            else:
                enc = encode_text(row.data, cfg, tokenizer)
        except RowError as e:
            raise UserInputError(row.where, str(e)) from None
        cut = len(enc.input_ids) > cfg.max_length
        if cut and cfg.overflow == "drop":
            too_long += 1
            continue
        if cut:
            n = cfg.max_length
            types = enc.token_type_ids[:n] if enc.token_type_ids is not None else None
            enc = Encoded(enc.input_ids[:n], enc.labels[:n], enc.target, types)
        trained = enc.labels if cfg.format == "tagging" else enc.labels[1:]
        if enc.target is None and all(t == IGNORE_INDEX for t in trained):
            no_target += 1
            continue
        truncated += cut
        kept.append(enc)
    return kept, SplitStats(len(rows), len(kept), truncated, too_long, no_target)


# ---------------------------------------------------------------- preparation + cache


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
    relevant = cfg.model_dump(exclude={"packing", "shuffle", "cache_dir"})
    if cfg.val_fraction > 0:
        relevant["split_seed"] = seed  # which rows are held out
    h.update(json.dumps(relevant, sort_keys=True).encode())
    if labels is not None:
        h.update(json.dumps(labels.model_dump(mode="json"), sort_keys=True).encode())
    return h.hexdigest()[:32]


def default_cache_dir() -> Path:
    return Path(os.environ.get("FTLAUNCH_CACHE", Path.home() / ".cache" / "ftlaunch")) / "tokenized"


def prepare_data(
    cfg: DataSection, tokenizer: Any, seed: int, labels: LabelsSection | None = None
) -> PreparedData:
    """Read, validate and tokenize train/validation, through the cache when it is warm. An
    entry that fails its checksums is rebuilt, never used."""
    key = cache_key(cfg, tokenizer, labels, seed)
    if key is None:
        return _tokenize_all(cfg, tokenizer, seed, labels)
    entry = (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()) / key
    cached = read_cache(entry)
    if cached is not None:
        return cached
    prepared = _tokenize_all(cfg, tokenizer, seed, labels)
    _write_cache(entry, prepared)
    return prepared


def _split_rows(cfg: DataSection, seed: int) -> tuple[list[Row], list[Row]]:
    numeric = numeric_fields(cfg)
    train_rows = read_rows(cfg.train, numeric)
    if cfg.validation is not None:
        return train_rows, read_rows(cfg.validation, numeric)
    if cfg.val_fraction > 0:
        order = np.random.default_rng(seed).permutation(len(train_rows))
        n_val = max(1, int(round(cfg.val_fraction * len(train_rows))))
        held = set(order[:n_val].tolist())
        return (
            [r for i, r in enumerate(train_rows) if i not in held],
            [r for i, r in enumerate(train_rows) if i in held],
        )
    return train_rows, []


def _tokenize_all(
    cfg: DataSection, tokenizer: Any, seed: int, labels: LabelsSection | None
) -> PreparedData:
    train_rows, val_rows = _split_rows(cfg, seed)
    train, train_stats = encode_rows(train_rows, cfg, tokenizer, labels)
    if not train:
        raise UserInputError(
            cfg.train.path, "no usable training examples: " + train_stats.summary("train")
        )
    stats = {"train": train_stats}
    validation = None
    if val_rows or cfg.validation is not None:
        val, val_stats = encode_rows(val_rows, cfg, tokenizer, labels)
        where = cfg.validation.path if cfg.validation else "data.val_fraction"
        if not val:
            raise UserInputError(where, "no usable validation examples: " + val_stats.summary("validation"))
        stats["validation"] = val_stats
        validation = TokenizedSplit.from_examples(val)
    return PreparedData(TokenizedSplit.from_examples(train), validation, stats)


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


# ---------------------------------------------------------------- packing


@dataclass(frozen=True)
class PackedSplit:
    """Rows of whole examples, each row at most ``max_length`` tokens (first-fit decreasing)."""

    rows: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.rows)


def pack_examples(lengths: np.ndarray, max_length: int) -> PackedSplit:
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order.tolist():
        n = int(lengths[i])
        for b, free in enumerate(space):
            if n <= free:
                bins[b].append(i)
                space[b] -= n
                break
        else:
            bins.append([i])
            space.append(max_length - n)
    return PackedSplit(tuple(tuple(sorted(b)) for b in bins))


# ---------------------------------------------------------------- sampling and collation


@dataclass(frozen=True)
class StepPlan:
    """Which units (examples or packed rows) every rank uses at every optimizer step.

    Deterministic in (seed, epoch), so a resumed run continues exactly from a step number.
    """

    num_units: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int
    shuffle: bool

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_units // self.global_batch

    def micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = (
            np.random.default_rng([self.seed, epoch]).permutation(self.num_units)
            if self.shuffle
            else np.arange(self.num_units)
        )
        batch = order[k * self.global_batch : (k + 1) * self.global_batch]
        per_rank = self.micro_batch_size * self.grad_accum
        mine = batch[rank * per_rank : (rank + 1) * per_rank]
        return [
            mine[m * self.micro_batch_size : (m + 1) * self.micro_batch_size]
            for m in range(self.grad_accum)
        ]


def total_steps(plan: StepPlan, max_steps: int | None, epochs: float) -> int:
    return max_steps if max_steps is not None else max(1, math.ceil(epochs * plan.steps_per_epoch))


def collate_padded(
    split: TokenizedSplit, indices: Sequence[int], pad_id: int, pad_left: bool = False
) -> dict[str, torch.Tensor]:
    """Pad to the longest example (on the right unless ``pad_left``); padding is masked out of
    attention and loss.

    With per-example targets (sequence classification) those are the batch's labels."""
    examples = [split.example(int(i)) for i in indices]
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    types = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        at = slice(width - len(ids), width) if pad_left else slice(0, len(ids))
        input_ids[row, at] = torch.from_numpy(ids.astype(np.int64))
        labels[row, at] = torch.from_numpy(labs.astype(np.int64))
        attention[row, at] = 1
        if split.token_type_ids is not None:
            lo, hi = split.offsets[int(indices[row])], split.offsets[int(indices[row]) + 1]
            types[row, at] = torch.from_numpy(split.token_type_ids[lo:hi].astype(np.int64))
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
    if split.targets is not None:
        batch["labels"] = torch.from_numpy(split.targets[np.asarray(indices, dtype=np.int64)])
    if split.token_type_ids is not None:
        batch["token_type_ids"] = types
    return batch


def collate_packed(
    split: TokenizedSplit, packed: PackedSplit, row_indices: Sequence[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples; positions restart per example and ``segment_ids``
    (0 = padding, k = k-th example) let the model keep attention inside each example."""
    rows = [packed.rows[int(r)] for r in row_indices]
    lengths = split.lengths()
    width = max(sum(int(lengths[i]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row, start=1):
            ids, labs = split.example(i)
            n = len(ids)
            input_ids[r, at : at + n] = torch.from_numpy(ids.astype(np.int64))
            labels[r, at : at + n] = torch.from_numpy(labs.astype(np.int64))
            labels[r, at] = IGNORE_INDEX
            positions[r, at : at + n] = torch.arange(n)
            segments[r, at : at + n] = seg
            at += n
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": positions,
        "segment_ids": segments,
    }


def block_diagonal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D causal mask that lets a token see only earlier tokens of its own example."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(same.shape[-2:], dtype=torch.bool, device=same.device).tril()
    allowed = same & causal & (segment_ids[:, :, None] > 0)
    allowed |= torch.eye(same.shape[-1], dtype=torch.bool, device=same.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=same.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def flatten_packed(batch: dict[str, torch.Tensor], segment_ids: torch.Tensor) -> dict[str, Any]:
    """Padding-free layout for flash-attn varlen: the real tokens of all packed rows in one row,
    positions restarting per example, and the examples' cumulative lengths.

    transformers derives varlen boundaries from ``position_ids`` only when the batch is a single
    row, so the boundaries are passed explicitly (``cu_seq_lens_*``, ``max_length_*``); that also
    spares it a device sync per layer to find them.
    """
    real = segment_ids > 0
    flat: dict[str, Any] = {k: v[real][None] for k, v in batch.items()}
    starts = torch.nonzero(flat["position_ids"][0] == 0).flatten()
    bounds = torch.cat([starts, torch.tensor([int(real.sum())])]).to(torch.int32)
    longest = int(bounds.diff().max())
    return flat | {
        "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
        "max_length_q": longest, "max_length_k": longest,
    }
