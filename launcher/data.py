"""Data: read rows, render formats, tokenize with prompt masking, cache, sample and collate.

Reading and encoding errors name ``file:line`` (JSON Lines) or ``file:row N`` (other formats).
Tokenized splits are cached under a key hashing the data bytes, the tokenizer, and every
setting that changes the tokens, so each node tokenizes once and every worker reuses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.errors import UserInputError
from launcher.recipe import DataSection, DataSource, LabelsSection

IGNORE_INDEX = -100
CACHE_VERSION = "1"
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


def read_rows(source: DataSource) -> list[Row]:
    """Read every row of a source; JSON Lines keep their line numbers for error messages."""
    if not is_local(source):
        return _read_hub(source)
    rows: list[Row] = []
    for path in local_files(source):
        if path.suffix == ".jsonl":
            rows.extend(_read_jsonl(path))
        else:
            rows.extend(_read_with_datasets(path))
    return rows


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserInputError(f"{path}:{number}", f"malformed JSON: {e.msg}") from None
            if not isinstance(value, dict):
                raise UserInputError(f"{path}:{number}", "each line must be a JSON object")
            yield Row(value, f"{path}:{number}")


def _read_with_datasets(path: Path) -> list[Row]:
    import datasets

    builder = LOCAL_SUFFIXES[path.suffix]
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        raise UserInputError(str(path), f"cannot read {builder} file: {e}") from None
    first_line = 2 if builder == "csv" else None
    return [
        Row(r, f"{path}:{i + first_line}" if first_line else f"{path}:row {i}")
        for i, r in enumerate(ds)
    ]


def _read_hub(source: DataSource) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(
            source.path, source.subset, split=source.split, revision=source.revision
        )
    except Exception as e:
        raise UserInputError(source.path, f"cannot load dataset: {e}") from None
    return [Row(r, f"{source.path}[{source.split}] row {i}") for i, r in enumerate(ds)]


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


def encode_instruction(row: dict[str, Any], cfg: DataSection, tokenizer: Any) -> Encoded:
    names = cfg.fields
    instruction = _text_field(row, names.instruction)
    extra = _text_field(row, names.input, required=False)
    output = _text_field(row, names.output)
    input_block = f"### Input:\n{extra}\n\n" if extra else ""
    prompt = cfg.prompt_template.format(instruction=instruction, input=extra, input_block=input_block)
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
    """Render with the chat template; train on assistant turns, mask everything else.

    Assistant spans are found by rendering growing prefixes of the conversation, so any
    template that renders prefixes consistently works, without special template markers.
    """
    messages = chat_messages(row, cfg)
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(  # noqa: E731
        msgs, tokenize=False, add_generation_prompt=gen, chat_template=template
    )
    text = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True) if i else "", render(messages[: i + 1])
        if not text.startswith(through) or not through.startswith(before):
            raise RowError("the chat template does not render conversation prefixes consistently")
        spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if cfg.train_on_prompt:
        return Encoded(ids, list(ids))
    labels = [
        tok if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for tok, (start, _end) in zip(ids, enc["offset_mapping"])
    ]
    return Encoded(ids, labels)


def resolve_chat_template(cfg: DataSection, tokenizer: Any) -> str | None:
    """The template to render chat data with, or an error if there is none."""
    if cfg.chat_template:
        path = Path(cfg.chat_template)
        return path.read_text() if path.is_file() else cfg.chat_template
    if getattr(tokenizer, "chat_template", None):
        return None
    raise UserInputError(
        "data.chat_template",
        "the tokenizer has no chat template; name one (inline Jinja or a file path)",
    )


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


def _hash_source(h: Any, source: DataSource) -> None:
    if is_local(source):
        for path in local_files(source):
            h.update(str(path.resolve()).encode())
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    else:
        h.update(json.dumps([source.path, source.subset, source.split, source.revision]).encode())


def cache_key(cfg: DataSection, tokenizer: Any, labels: LabelsSection | None = None) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    for source in (cfg.train, cfg.validation):
        if source is not None:
            _hash_source(h, source)
    h.update(tokenizer.backend_tokenizer.to_str().encode() if tokenizer.is_fast else b"slow")
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    relevant = cfg.model_dump(exclude={"packing", "shuffle", "cache_dir"})
    h.update(json.dumps(relevant, sort_keys=True).encode())
    if labels is not None:
        h.update(json.dumps(labels.model_dump(mode="json"), sort_keys=True).encode())
    return h.hexdigest()[:24]


def default_cache_dir() -> Path:
    return Path(os.environ.get("FTLAUNCH_CACHE", Path.home() / ".cache" / "ftlaunch")) / "tokenized"


def prepare_data(
    cfg: DataSection, tokenizer: Any, seed: int, labels: LabelsSection | None = None
) -> PreparedData:
    """Read, validate and tokenize train/validation, through the cache when it is warm."""
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    entry = cache_root / cache_key(cfg, tokenizer, labels)
    if (entry / "meta.json").is_file():
        meta = json.loads((entry / "meta.json").read_text())
        val = TokenizedSplit.load(entry / "validation.npz") if meta["has_validation"] else None
        stats = {k: SplitStats(**v) for k, v in meta["stats"].items()}
        return PreparedData(TokenizedSplit.load(entry / "train.npz"), val, stats)
    prepared = _tokenize_all(cfg, tokenizer, seed, labels)
    _write_cache(entry, prepared)
    return prepared


def _split_rows(cfg: DataSection, seed: int) -> tuple[list[Row], list[Row]]:
    train_rows = read_rows(cfg.train)
    if cfg.validation is not None:
        return train_rows, read_rows(cfg.validation)
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


def _write_cache(entry: Path, prepared: PreparedData) -> None:
    """Write into a temp dir beside the entry and rename, so readers never see half a cache."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
    try:
        prepared.train.save(tmp / "train.npz")
        if prepared.validation is not None:
            prepared.validation.save(tmp / "validation.npz")
        meta = {
            "has_validation": prepared.validation is not None,
            "stats": {k: v.__dict__ for k, v in prepared.stats.items()},
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
