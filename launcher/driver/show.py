"""``ftlaunch check --show N``: the first N encoded training examples as the model sees them.

Trained tokens are highlighted and masked ones dim (rich, on a terminal); without a terminal
each trained span is wrapped in ``⟦`` and ``⟧``, characters ordinary data does not hold, so
the output can be read, diffed and checked by a program (what each task marks:
``launcher.tasks.show``). Then the token-length percentiles of each split and its truncation
and drop counts.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import numpy as np

from launcher.data.tokenized import PreparedData, TokenizedSplit
from launcher.recipe import Recipe
from launcher.tasks.show import CLOSE, OPEN, Span, example_spans


def plain(spans: list[Span]) -> str:
    return "".join(f"{OPEN}{text}{CLOSE}" if trained else text for text, trained in spans)


def length_summary(name: str, split: TokenizedSplit, stats: Any) -> str:
    lengths = split.lengths()
    p50, p90, p99 = (int(np.percentile(lengths, q)) for q in (50, 90, 99)) if len(lengths) else (0,) * 3
    top = int(lengths.max()) if len(lengths) else 0
    counts = f"; {stats.summary(name)}" if stats is not None else ""
    return f"{name} lengths (tokens): p50 {p50}, p90 {p90}, p99 {p99}, max {top}{counts}"


def show(recipe: Recipe, data: PreparedData, n: int, stream: TextIO | None = None) -> None:
    """Print ``n`` training examples (fewer when the split is smaller) and the length summary."""
    from launcher.model.build import load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    stream = stream or sys.stdout
    styled = stream.isatty()
    console = None
    if styled:
        from rich.console import Console

        console = Console(file=stream, highlight=False)
    stream.write(f"# {min(n, len(data.train))} of {len(data.train)} training examples "
                 f"(trained tokens {'highlighted, masked dim' if styled else f'in {OPEN} {CLOSE}'})\n")
    for i in range(min(n, len(data.train))):
        spans = example_spans(data.train, i, recipe, tokenizer)
        stream.write(f"--- example {i} ({len(data.train.example(i)[0])} tokens)\n")
        if console is not None:
            console.print(styled_text(spans))
        else:
            stream.write(plain(spans) + "\n")
    splits = {"train": data.train, "validation": data.validation}
    for name, split in splits.items():
        if split is not None:
            stream.write(f"# {length_summary(name, split, data.stats.get(name))}\n")
    stream.flush()


def styled_text(spans: list[Span]) -> Any:
    from rich.text import Text

    text = Text()
    for piece, trained in spans:
        text.append(piece, style="bold green" if trained else "dim")
    return text
