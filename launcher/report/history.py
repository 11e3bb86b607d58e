"""A run's history as plots and tables read it: ``metrics.jsonl``, checked line by line.

The training loop's own reader (``launcher.train.metrics.read_metrics``) skips what it cannot parse,
which suits a resuming worker; a report must not quietly draw a damaged file, so here a line
that is not a JSON object with an integer ``step`` is an error naming ``file:line``. The one
exception is a last line without its newline: that is a write cut short by a killed run, and
it is skipped (the resumed run drops it too, see ``launcher.train.metrics.JsonlSink``).

A resume cuts the file back to the resumed step, so it normally reads as one run. Should a
step appear again anyway (a file copied together from two attempts), the later records win:
a step at or below the previous one discards every earlier record from that step on, as the
cut-back on resume would have, so no step is drawn twice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launcher.errors import UserInputError
from launcher.run.rundir import RESOLVED

METRICS = "metrics.jsonl"
EMA_WEIGHT = 0.9  # smoothed loss: s_t = 0.9 * s_(t-1) + 0.1 * loss_t, started at the first loss


def require_run_dir(path: Path) -> Path:
    if not (path / RESOLVED).is_file():
        raise UserInputError(str(path), f"not a run directory (no {RESOLVED})")
    return path


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` in step order, one per step ([] if absent)."""
    path = run_dir / METRICS
    if not path.is_file():
        return []
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    partial = lines.pop()  # after the last newline: "" unless the last write was cut short
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        record = _parse(line, f"{path}:{number}")
        while records and records[-1]["step"] >= record["step"]:
            records.pop()
        records.append(record)
    if partial.strip():
        try:
            record = _parse(partial, "")
        except UserInputError:
            return records  # the torn tail of a killed run's last write
        while records and records[-1]["step"] >= record["step"]:
            records.pop()
        records.append(record)
    return records


def _parse(line: str, where: str) -> dict[str, Any]:
    if not line.strip():
        raise UserInputError(where, "empty line in the metrics file")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserInputError(where, f"not valid JSON ({e.msg})") from None
    step = record.get("step") if isinstance(record, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UserInputError(where, "a metrics record must be an object with an integer 'step'")
    return record


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every record that holds a finite number under ``key``."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def nonfinite_stretches(records: Sequence[dict[str, Any]], key: str) -> list[tuple[int, int]]:
    """(first, last) step of each run of consecutive records whose ``key`` is NaN or
    infinite: ``series`` leaves them out, a plot must still show them (a diverged run)."""
    stretches: list[tuple[int, int]] = []
    open_at: int | None = None
    last = 0
    for record in records:
        value = record.get(key)
        bad = isinstance(value, float) and not math.isfinite(value)
        if bad and open_at is None:
            open_at = record["step"]
        elif not bad and open_at is not None and value is not None:
            stretches.append((open_at, last))
            open_at = None
        if bad:
            last = record["step"]
    if open_at is not None:
        stretches.append((open_at, last))
    return stretches


def ema(values: Sequence[float], weight: float = EMA_WEIGHT) -> list[float]:
    out: list[float] = []
    for value in values:
        out.append(value if not out else weight * out[-1] + (1 - weight) * value)
    return out


def eval_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """Every ``eval_*`` metric the history holds, in a stable order."""
    return sorted({k for r in records for k in r if k.startswith("eval_")})
