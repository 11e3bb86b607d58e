"""The driver's view of a run in the terminal, fed by the metrics follower.

With a terminal (stderr is a TTY) a rich panel redrawn on each new record: progress bar with
step/total and ETA, epoch, smoothed loss, lr, grad norm, every ``eval_*`` metric of the newest
evaluation, tokens/s, MFU, memory, the attempt (Ray Train restarts), the newest committed
checkpoint and any straggler. Without one, the plain progress line of ``launcher.driver.progress``,
with the straggler named on it. Either way a straggler is also warned about once, on a line
of its own. Both run on the follower's thread; neither starts one.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table

from launcher.checkpoint.commit import committed
from launcher.driver import console
from launcher.driver.stragglers import Detector, Straggler
from launcher.driver.progress import _duration, format_progress

SMOOTHING = 0.9  # exponential moving average of the loss: weight of the past


def run_info(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "run_info.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def attempts(run_dir: Path) -> int:
    path = run_dir / "attempts.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def eval_metrics(record: dict[str, Any]) -> dict[str, float]:
    """Every numeric ``eval_*`` value of a record, by name without the prefix."""
    return {
        k[len("eval_"):]: float(v) for k, v in record.items()
        if k.startswith("eval_") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class RunView:
    """What both views show, kept up to date from the records."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.started = time.time()
        self.first_step: int | None = None
        self.smoothed: float | None = None
        self.evals: dict[str, float] = {}
        self.eval_step: int | None = None
        self.detector = Detector()
        self.record: dict[str, Any] = {}
        self.info: dict[str, Any] = {}

    def update(self, record: dict[str, Any]) -> list[Straggler]:
        self.record = record
        self.info = run_info(self.run_dir)
        if self.first_step is None:
            self.first_step = record["step"]
        if "loss" in record:
            loss = float(record["loss"])
            self.smoothed = loss if self.smoothed is None else (
                SMOOTHING * self.smoothed + (1 - SMOOTHING) * loss)
        if eval_metrics(record):
            self.evals, self.eval_step = eval_metrics(record), record["step"]
        return self.detector.observe(record, self.info.get("rank_nodes"))

    def eta(self) -> str | None:
        total, step = self.info.get("total_steps"), self.record.get("step", 0)
        done = step - (self.first_step or 0)
        if not total or done <= 0:
            return None
        return _duration((time.time() - self.started) / done * (total - step))

    def checkpoint(self) -> str | None:
        found = committed(self.run_dir)
        return found[0].path.name if found else None


def straggler_note(found: list[Straggler]) -> str:
    return "; ".join(f"straggler rank {s.rank}" + (f" on {s.node}" if s.node else "")
                     + f" {s.slowdown:.1f}x" for s in found)


class PlainView:
    """One progress line per record (``format_progress``), then any straggler."""

    def __init__(self, run_dir: Path, stream: TextIO | None = None):
        self.view, self.stream = RunView(run_dir), stream

    def __call__(self, record: dict[str, Any]) -> None:
        new = self.view.update(record)
        line = format_progress(record, self.view.info.get("total_steps"), self.view.started)
        if self.view.detector.current:
            line += " | " + straggler_note(self.view.detector.current)
        for s in new:
            self._write(f"[ftlaunch] {s.message()}")
        self._write(line)

    def _write(self, line: str) -> None:
        if self.stream is None:
            console.say(line)
            return
        self.stream.write(line + "\n")
        self.stream.flush()

    def finish_view(self) -> None:
        pass


def _number(value: float) -> str:
    return f"{value:.4g}" if abs(value) >= 10 else f"{value:.4f}"


class RichView:
    """A rich panel redrawn (``Live``, no refresh thread) on each record."""

    def __init__(self, run_dir: Path, console: Console | None = None):
        self.view = RunView(run_dir)
        self.console = console or Console(stderr=True)
        self.live = Live(console=self.console, auto_refresh=False, redirect_stdout=False,
                         redirect_stderr=False)
        self._started = False

    def __call__(self, record: dict[str, Any]) -> None:
        new = self.view.update(record)
        if not self._started:
            self.live.start()
            self._started = True
            console.set_printer(self._print)
        for s in new:
            self.live.console.print(f"[ftlaunch] {s.message()}", style="bold yellow",
                                    markup=False, highlight=False)
        self.live.update(self.render(), refresh=True)

    def _print(self, line: str) -> None:
        self.live.console.print(line, markup=False, highlight=False)

    def finish_view(self) -> None:
        if self._started:
            console.set_printer(None)
            self.live.stop()
            self._started = False

    def render(self) -> Panel:
        v, r = self.view, self.view.record
        total = v.info.get("total_steps")
        head = Table.grid(padding=(0, 1))
        head.add_row(
            ProgressBar(total=total or 1, completed=r.get("step", 0), width=40),
            f"step {r.get('step', '?')}/{total or '?'}", f"ETA {v.eta() or '?'}",
        )
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        for name, value in self.rows():
            grid.add_row(name, value)
        return Panel(Group(head, grid), title="ftlaunch", title_align="left")

    def rows(self) -> list[tuple[str, str]]:
        v, r = self.view, self.view.record
        rows = []
        if "epoch" in r:
            rows.append(("epoch", f"{r['epoch']:.2f}"))
        if v.smoothed is not None:
            rows.append(("loss", f"{v.smoothed:.4f} (smoothed; last {r.get('loss', v.smoothed):.4f})"))
        for key, fmt in (("lr", "{:.3g}"), ("grad_norm", "{:.3g}")):
            if isinstance(r.get(key), (int, float)):
                rows.append((key.replace("_", " "), fmt.format(r[key])))
        if v.evals:
            shown = "  ".join(f"{k} {_number(x)}" for k, x in v.evals.items())
            rows.append(("eval", f"{shown}  (step {v.eval_step})"))
        speed = [f"{r['tokens_per_s']:,.0f} tok/s"] if "tokens_per_s" in r else []
        speed += [f"MFU {100 * r['mfu']:.1f}%"] if "mfu" in r else []
        speed += [f"mem {r['peak_memory_gb']:.1f} GB"] if "peak_memory_gb" in r else []
        rows.append(("speed", "  ".join(speed) or "-"))
        rows.append(("attempt", _attempt(attempts(v.run_dir))))
        rows.append(("checkpoint", v.checkpoint() or "none committed yet"))
        if v.detector.current:
            rows.append(("straggler", straggler_note(v.detector.current)))
        return rows


def _attempt(n: int) -> str:
    if n <= 1:
        return "1 (no restarts)"
    return f"{n} ({n - 1} restart{'s' * (n > 2)})"


def progress_view(run_dir: Path) -> PlainView | RichView:
    """The rich view when stderr is a terminal, the plain lines otherwise."""
    if sys.stderr.isatty():
        return RichView(run_dir, Console(file=sys.stderr))
    return PlainView(run_dir)
