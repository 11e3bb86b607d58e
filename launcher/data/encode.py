"""Encoding rows into examples, in batches, with prompt masking: instruction, chat and text
formats here, the classification formats in labels.py."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from launcher.data import labels as label_formats
from launcher.data.marked_chat import MarkedChat, RowErrorAt, marked_tokens, marks_generation
from launcher.data.tokenized import IDS_ONLY, IGNORE_INDEX, Encoded, Row, RowError, SplitStats
from launcher.errors import UserInputError
from launcher.recipe.sections import DataSection, LabelsSection


ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}

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


def instruction_item(row: dict[str, Any], cfg: DataSection) -> tuple[str, str]:
    """The prompt and the response of an instruction row."""
    names = cfg.fields
    instruction = _text_field(row, names.instruction)
    extra = _text_field(row, names.input, required=False)
    output = _text_field(row, names.output)
    input_block = f"### Input:\n{extra}\n\n" if extra else ""
    values = {"instruction": instruction, "input": extra, "input_block": input_block}
    return fill_prompt(cfg.prompt_template, values), output


def instruction_tokens(
    items: Sequence[tuple[str, str]], cfg: DataSection, tokenizer: Any
) -> list[Encoded]:
    prompts = tokenizer([p for p, _ in items], add_special_tokens=True, **IDS_ONLY)["input_ids"]
    answers = tokenizer([a for _, a in items], add_special_tokens=False, **IDS_ONLY)["input_ids"]
    eos = [tokenizer.eos_token_id]  # a property that looks the token up: read it once
    out = []
    for prompt_ids, answer in zip(prompts, answers):
        answer_ids = answer + eos
        ids = prompt_ids + answer_ids
        masked = ids if cfg.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        out.append(Encoded(ids, list(masked)))
    return out


def text_tokens(texts: Sequence[str], tokenizer: Any) -> list[Encoded]:
    eos = [tokenizer.eos_token_id]
    out = []
    for ids in tokenizer(list(texts), add_special_tokens=True, **IDS_ONLY)["input_ids"]:
        ids = ids + eos
        out.append(Encoded(ids, list(ids)))
    return out


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


def chat_item(
    row: dict[str, Any], cfg: DataSection, tokenizer: Any, template: str | None
) -> tuple[str, list[tuple[int, int]]]:
    """Render with the chat template; the character spans to train on are each assistant
    turn's content and its end-of-turn (everything else is masked: BOS, system and user
    turns, role headers).

    Spans are found by rendering growing prefixes of the conversation, so any template that
    renders prefixes consistently works, without special template markers.
    """
    messages = chat_messages(row, cfg)
    rendered: dict[tuple[int, bool], str] = {}

    def render(msgs: list[dict[str, str]], gen: bool = False) -> str:
        """``msgs`` is always a prefix of ``messages``: each prefix is rendered once (the
        last assistant turn's rendering is the whole conversation's)."""
        key = (len(msgs), gen)
        if key not in rendered:
            try:
                rendered[key] = tokenizer.apply_chat_template(
                    msgs, tokenize=False, add_generation_prompt=gen, chat_template=template
                )
            except Exception as e:  # jinja2 raises whatever the template's own code raises
                raise RowError(f"the chat template cannot render this conversation: {e}") from None
        return rendered[key]

    text = render(messages)
    spans = [
        assistant_span(render, messages, i, text)
        for i, message in enumerate(messages)
        if message["role"] == "assistant"
    ]
    return text, spans


def chat_tokens(
    items: Sequence[tuple[str, list[tuple[int, int]]]] | Sequence[MarkedChat], cfg: DataSection,
    tokenizer: Any, template: str | None = None,
) -> list[Encoded]:
    """A batch of chat items: all MarkedChat (the Encoder's template marks generation) or all
    rendered texts with their assistant spans."""
    if items and isinstance(items[0], MarkedChat):
        return marked_tokens(items, cfg, tokenizer, template)
    return _span_tokens(items, cfg, tokenizer)


def _span_tokens(
    items: Sequence[tuple[str, list[tuple[int, int]]]], cfg: DataSection, tokenizer: Any
) -> list[Encoded]:
    if not items:
        return []
    enc = tokenizer([text for text, _ in items], add_special_tokens=False,
                    return_offsets_mapping=True, **IDS_ONLY)
    out = []
    for (_, spans), ids, offsets in zip(items, enc["input_ids"], enc["offset_mapping"]):
        if cfg.train_on_prompt:
            out.append(Encoded(ids, list(ids)))
            continue
        starts = np.fromiter((start for start, _end in offsets), np.int64, len(offsets))
        trained = np.zeros(len(ids), bool)
        for lo, hi in spans:  # a token is trained when it starts inside an assistant span
            trained |= (starts >= lo) & (starts < hi)
        out.append(Encoded(ids, np.where(trained, ids, IGNORE_INDEX).tolist()))
    return out


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


KEPT, TRUNCATED, TOO_LONG, NO_TARGET = range(4)  # what became of a row
BATCH = 1000


@dataclass(frozen=True)
class Encoder:
    """Encodes batches of rows: each row is checked and rendered to text in Python (an error
    names its place), then the whole batch is tokenized in one call of the tokenizer (a fast
    tokenizer encodes a batch in Rust). Picklable, for tokenizing processes."""

    cfg: DataSection
    tokenizer: Any
    labels: LabelsSection | None = None
    template: str | None = None
    marked: bool = False  # a chat template with {% generation %} blocks (marked_chat.py)

    @property
    def token_types(self) -> bool:
        """Whether examples carry token_type_ids: text pairs, for a tokenizer that makes them."""
        return bool(self.cfg.fields.text_pair) and self.cfg.format == "classification" and (
            "token_type_ids" in getattr(self.tokenizer, "model_input_names", ())
        )

    def encode(self, rows: Sequence[dict[str, Any]], wheres: Sequence[str]) -> list[Encoded]:
        items = []
        for row, where in zip(rows, wheres):
            try:
                items.append(self._item(row))
            except RowError as e:
                raise UserInputError(where, str(e)) from None
        try:
            return self._tokens(items) if items else []
        except RowErrorAt as e:  # a row the batch call found: every row gave one item
            raise UserInputError(wheres[e.index], str(e)) from None

    def _item(self, row: dict[str, Any]) -> Any:
        cfg, labels = self.cfg, self.labels
        if cfg.format == "instruction":
            return instruction_item(row, cfg)
        if cfg.format == "chat" and self.marked:
            return MarkedChat(chat_messages(row, cfg))
        if cfg.format == "chat":
            return chat_item(row, cfg, self.tokenizer, self.template)
        if cfg.format == "classification":
            return label_formats.classification_item(row, cfg, labels)
        if cfg.format == "tagging":
            return label_formats.tagging_item(row, cfg, labels)
        return _text_field(row, cfg.fields.text)

    def _tokens(self, items: list[Any]) -> list[Encoded]:
        cfg, tok = self.cfg, self.tokenizer
        if cfg.format == "instruction":
            return instruction_tokens(items, cfg, tok)
        if cfg.format == "chat":
            return chat_tokens(items, cfg, tok, self.template)
        if cfg.format == "classification":
            return label_formats.classification_tokens(items, cfg, tok)
        if cfg.format == "tagging":
            return label_formats.tagging_tokens(items, tok)
        return text_tokens(items, tok)


def make_encoder(cfg: DataSection, tokenizer: Any, labels: LabelsSection | None) -> Encoder:
    """``labels`` is the resolved label set of the classification formats."""
    template = resolve_chat_template(cfg, tokenizer) if cfg.format == "chat" else None
    if cfg.format in ("classification", "tagging") and labels is None:
        raise UserInputError("labels", f"the {cfg.format} format needs a label set")
    marked = cfg.format == "chat" and marks_generation(template or tokenizer.chat_template)
    return Encoder(cfg, tokenizer, labels, template, marked)


def finish(enc: Encoded, cfg: DataSection) -> tuple[int, Encoded]:
    """What ``max_length``, ``overflow`` and the trained tokens make of an encoded row."""
    cut = len(enc.input_ids) > cfg.max_length
    if cut and cfg.overflow == "drop":
        return TOO_LONG, enc
    if cut:
        n = cfg.max_length
        types = enc.token_type_ids[:n] if enc.token_type_ids is not None else None
        enc = Encoded(enc.input_ids[:n], enc.labels[:n], enc.target, types)
    trained = enc.labels if cfg.format == "tagging" else enc.labels[1:]
    if enc.target is None and trained.count(IGNORE_INDEX) == len(trained):
        return NO_TARGET, enc
    return (TRUNCATED if cut else KEPT), enc


def encode_rows(
    rows: Sequence[Row], cfg: DataSection, tokenizer: Any, labels: LabelsSection | None = None
) -> tuple[list[Encoded], SplitStats]:
    """Encode rows held in memory (the pipeline encodes Arrow tables in processes, with the
    same Encoder); ``labels`` is the resolved label set of the classification formats."""
    encoder = make_encoder(cfg, tokenizer, labels)
    kept: list[Encoded] = []
    counts = [0, 0, 0, 0]
    for lo in range(0, len(rows), BATCH):
        chunk = rows[lo : lo + BATCH]
        for enc in encoder.encode([r.data for r in chunk], [r.where for r in chunk]):
            status, enc = finish(enc, cfg)
            counts[status] += 1
            if status in (KEPT, TRUNCATED):
                kept.append(enc)
    return kept, SplitStats(len(rows), len(kept), counts[TRUNCATED], counts[TOO_LONG],
                            counts[NO_TARGET])
