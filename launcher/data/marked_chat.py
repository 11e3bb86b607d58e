"""Chat templates that mark their trained tokens with ``{% generation %}`` blocks: a batch of
conversations is rendered by transformers' Jinja renderer, which also returns each block's
character span, and tokenized in one call; a token is trained when its characters overlap a
block (the rule of transformers' ``return_assistant_tokens_mask``), so no prefix rendering
is needed.

The spans are turned into labels by bisecting the token offsets, a few steps per block,
where ``return_assistant_tokens_mask`` walks every token in Python and builds a 0/1 mask
that would then be walked again into labels."""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from launcher.data.tokenized import IDS_ONLY, IGNORE_INDEX, Encoded, RowError
from launcher.errors import UserInputError
from launcher.recipe.sections import DataSection


GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def marks_generation(template: Any) -> bool:
    """Whether a chat template marks the tokens to train on itself, with ``{% generation %}``
    blocks (transformers' ``return_assistant_tokens_mask``)."""
    return isinstance(template, str) and GENERATION_BLOCK.search(template) is not None


@dataclass(frozen=True)
class MarkedChat:
    """A conversation whose template marks its trained tokens: they are what the template's
    generation blocks enclose, rendered and tokenized by the tokenizer in one batch call."""

    messages: list[dict[str, str]]


class RowErrorAt(RowError):
    """A row of a batch (its index) that cannot be encoded."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def marked_tokens(
    items: Sequence[MarkedChat], cfg: DataSection, tokenizer: Any, template: str | None
) -> list[Encoded]:
    texts, spans = render_marked([item.messages for item in items], tokenizer, template)
    enc = tokenizer(texts, add_special_tokens=False, **IDS_ONLY)
    if cfg.train_on_prompt:
        return [Encoded(ids, list(ids)) for ids in enc["input_ids"]]
    if enc.encodings is None:
        raise UserInputError(
            "model.tokenizer", "a chat template with {% generation %} blocks needs a fast "
            "tokenizer (one with a tokenizer.json): the blocks are found by token offsets")
    return [
        Encoded(ids, trained_labels(ids, encoding.offsets, row_spans))
        for ids, encoding, row_spans in zip(enc["input_ids"], enc.encodings, spans)
    ]


def render_marked(
    conversations: list[list[dict[str, str]]], tokenizer: Any, template: str | None
) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Each conversation's text and the character spans of its generation blocks, rendered
    as ``apply_chat_template`` renders them (the tokenizer's special tokens are the
    template's variables); a conversation the template cannot render is named by index."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(batch: list[list[dict[str, str]]]) -> tuple[list[str], list[Any]]:
        return render_jinja_template(
            conversations=batch, chat_template=tokenizer.get_chat_template(template),
            return_assistant_tokens_mask=True, **tokenizer.special_tokens_map,
        )

    try:
        return render(conversations)
    except Exception:  # jinja2 raises whatever the template's own code raises: find the row
        for n, conversation in enumerate(conversations):
            try:
                render([conversation])
            except Exception as e:
                raise RowErrorAt(
                    n, f"the chat template cannot render this conversation: {e}") from None
        raise


_START, _END = itemgetter(0), itemgetter(1)


def trained_labels(
    ids: list[int], offsets: list[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """``ids`` where a token's characters overlap a span (end after the span's start, start
    before its end), IGNORE_INDEX elsewhere. Token offsets and spans both run in text
    order, so the tokens of a span are one run, found by two bisections."""
    labels = [IGNORE_INDEX] * len(ids)
    first = 0
    for lo, hi in spans:
        first = bisect_right(offsets, lo, lo=first, key=_END)
        last = bisect_left(offsets, hi, lo=first, key=_START)
        labels[first:last] = ids[first:last]
    return labels
