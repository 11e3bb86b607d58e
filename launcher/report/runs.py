"""``ftlaunch runs DIR``: every run directory under DIR, with what state it is in.

Status, from positive evidence only:
  running      a live driver holds RUN_DIR/driver.lock (launcher.run.liveness)
  failed       the last driver recorded a failure (driver_failed.json)
  finished     final/ holds a verified export (final/ftlaunch_export.json and every file it
               lists) written after the last driver started
  interrupted  anything else: stopped by a signal (STOP.json), or the driver died (kill -9,
               a lost node) and left the lock file unheld
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher.errors import UserInputError
from launcher.recipe.run_sections import EarlyStoppingSection
from launcher.report.history import METRICS, read_history
from launcher.run import liveness
from launcher.run.export import EXPORT_MARK
from launcher.run.rundir import RESOLVED, RunDir, load_resolved
from launcher.train.early_stop import history_from, judge

@dataclass(frozen=True)
class RunRow:
    run_dir: str
    status: str
    steps_done: int
    steps_total: int | None
    best_metric: str | None
    best_value: float | None
    best_step: int | None
    wall_s: float | None
    output: str | None  # the verified export, when finished
    detail: str  # why the status is what it is
    problem: str | None = None  # a file of the run that could not be read (file:line: why)


def find_runs(root: Path) -> list[Path]:
    """Every directory at or below ``root`` that holds a recipe.resolved.yaml (a run's own
    subdirectories, checkpoints and exports, are not searched)."""
    if not root.is_dir():
        raise UserInputError(str(root), "not a directory")
    found = []
    for here, dirs, files in os.walk(root):
        if RESOLVED in files:
            found.append(Path(here))
            dirs.clear()
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


def verified_export(run_dir: Path) -> Path | None:
    final = run_dir / "final"
    try:
        listed = json.loads((final / EXPORT_MARK).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(listed, list) or not all((final / str(f)).is_file() for f in listed):
        return None
    return final


def status_of(run_dir: Path, live: liveness.Liveness) -> tuple[str, str, Path | None]:
    """(status, detail, verified export)."""
    driver = live.driver or {}
    where = f"pid {driver.get('pid')} on {driver.get('host')}"
    if live.held:
        return "running", f"driver {where}", None
    if live.failure is not None:
        return "failed", str(live.failure.get("reason", "")), None
    if RunDir(run_dir).stop_request.is_file():
        return "interrupted", "stopped by a signal", None
    final = verified_export(run_dir)
    started = float(driver.get("started", 0.0))
    if final is not None and (final / EXPORT_MARK).stat().st_mtime >= started:
        return "finished", "final/ exported and verified", final
    if live.driver is not None:
        return "interrupted", f"driver {where} is gone", None
    return "interrupted", "no driver record and no verified export", None


def best_eval(run_dir: Path, records: list[dict[str, Any]]) -> tuple[str | None, float | None, int | None]:
    """The recipe's early-stopping metric (its mode and min_delta), else the lowest eval_loss;
    the at_start evaluation (step 0) is no candidate, as for the best checkpoint."""
    recipe = load_resolved(run_dir)
    rule = recipe.eval.early_stopping if recipe is not None else None
    rule = rule or EarlyStoppingSection(metric="eval_loss", mode="min")
    history = history_from(records, rule.metric, math.inf)
    if not history:
        return None, None, None
    verdict = judge(history, rule)
    return rule.metric, verdict.best_value, verdict.best_step


def wall_seconds(run_dir: Path, running: bool) -> float | None:
    """From the first worker start (attempts.jsonl) to the newest record of the run: now while
    it runs, else the later of metrics.jsonl and the export. Gaps between launches count."""
    try:
        first = json.loads((run_dir / "attempts.jsonl").read_text().splitlines()[0])["time"]
    except (OSError, IndexError, ValueError, KeyError, TypeError):
        return None
    if running:
        return time.time() - float(first)
    ends = [p.stat().st_mtime for p in (run_dir / METRICS, run_dir / "final" / EXPORT_MARK)
            if p.is_file()]
    return max(ends) - float(first) if ends else None


def total_steps(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / "run_info.json").read_text())["total_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def row(run_dir: Path) -> RunRow:
    live = liveness.probe(run_dir)
    status, detail, final = status_of(run_dir, live)
    try:
        records = read_history(run_dir)
        metric, value, step = best_eval(run_dir, records)
        problem = None
    except UserInputError as e:  # one damaged run must not hide the others
        records, (metric, value, step), problem = [], (None, None, None), str(e)
    return RunRow(
        str(run_dir), status, records[-1]["step"] if records else 0, total_steps(run_dir),
        metric, value, step, wall_seconds(run_dir, status == "running"),
        str(final) if final else None, detail, problem,
    )


def table(rows: list[RunRow]) -> str:
    header = ("STATUS", "STEPS", "BEST", "WALL", "OUTPUT", "RUN")
    lines = [header]
    for r in rows:
        best = f"{r.best_metric} {r.best_value:.4g} @{r.best_step}" if r.best_metric else "-"
        wall = _duration(r.wall_s) if r.wall_s is not None else "-"
        steps = f"{r.steps_done}/{r.steps_total if r.steps_total is not None else '?'}"
        lines.append((r.status, steps, best, wall, r.output or "-", r.run_dir))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    body = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1]
        for line in lines
    ]
    return "\n".join(body + [f"unreadable: {r.problem}" for r in rows if r.problem])


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def run(root: Path, as_json: bool) -> str:
    rows = [row(p) for p in find_runs(root)]
    if as_json:
        return json.dumps([asdict(r) for r in rows], indent=1)
    return table(rows) if rows else f"no run directories under {root}"
