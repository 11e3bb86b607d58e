"""``ftlaunch plot``: a run's metrics (or several runs', overlaid) as PNG files.

``figures()`` builds every figure in memory from the runs' histories (so what a figure draws
can be checked against metrics.jsonl); ``save()`` writes them. Output goes to a directory
ftlaunch owns: it lists what it wrote in ``ftlaunch_plots.json`` and refuses a directory
holding anything else, so no file ftlaunch did not write is ever replaced.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launcher.checkpoint.commit import present_files
from launcher.durable import write_atomic
from launcher.errors import UserInputError
from launcher.report.history import (
    EMA_WEIGHT, ema, eval_keys, nonfinite_stretches, read_history, require_run_dir, series,
)

PLOTS_MARK = "ftlaunch_plots.json"
# figure name -> (title, [(metric key, y-axis label)]): one panel per key
PANELS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "lr": ("Learning rate", [("lr", "lr")]),
    "throughput": ("Throughput", [("tokens_per_s", "tokens/s"), ("mfu", "MFU (fraction of peak)")]),
    "memory": ("Peak memory per rank", [("peak_memory_gb", "GB (10^9 bytes)")]),
}


def need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserInputError(
            "ftlaunch plot", "needs matplotlib: pip install 'ftlaunch[plot]'"
        ) from None


def run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Legend names: each directory's name, with its parent when two names clash."""
    names = [p.name for p in run_dirs]
    if len(set(names)) == len(names):
        return names
    longer = [f"{p.parent.name}/{p.name}" for p in run_dirs]
    return longer if len(set(longer)) == len(longer) else [str(p) for p in run_dirs]


def figures(run_dirs: Sequence[Path]) -> dict[str, Any]:
    """name -> matplotlib Figure, for the metrics at least one run logged."""
    need_matplotlib()
    runs = [(name, read_history(require_run_dir(p))) for name, p in zip(run_names(run_dirs), run_dirs)]
    if not any(records for _, records in runs):
        raise UserInputError(
            ", ".join(str(p / "metrics.jsonl") for p in run_dirs), "no metrics logged yet"
        )
    out = {"loss": loss_figure(runs)}
    keys = sorted({k for _, records in runs for k in eval_keys(records)} - {"eval_loss"})
    for key in keys:
        out[key] = panel_figure(runs, key, [(key, key)])
    for name, (title, panels) in PANELS.items():
        present = [(k, label) for k, label in panels if any(series(r, k)[0] for _, r in runs)]
        if present:
            out[name] = panel_figure(runs, title, present)
    return out


def _figure(rows: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]


def loss_figure(runs: Sequence[tuple[str, list[dict[str, Any]]]]) -> Any:
    """Training loss as logged (faint) and smoothed (EMA), with the evaluations' loss."""
    fig, (ax,) = _figure()
    for i, (name, records) in enumerate(runs):
        color = f"C{i % 10}"
        steps, loss = series(records, "loss")
        if steps:
            ax.plot(steps, loss, color=color, alpha=0.3, linewidth=1, label=f"{name}: loss")
            ax.plot(steps, ema(loss), color=color, linewidth=2,
                    label=f"{name}: loss (EMA {EMA_WEIGHT})")
        steps, evals = series(records, "eval_loss")
        if steps:
            ax.plot(steps, evals, color=color, linestyle="--", marker="o", markersize=4,
                    label=f"{name}: eval_loss")
        for n, (first, last) in enumerate(nonfinite_stretches(records, "loss")):
            ax.axvspan(first - 0.5, last + 0.5, color="red", alpha=0.2,
                       label=f"{name}: loss not finite" if n == 0 else None)
    _finish(fig, ax, "Loss", "loss")
    return fig


def panel_figure(
    runs: Sequence[tuple[str, list[dict[str, Any]]]], title: str, panels: list[tuple[str, str]]
) -> Any:
    fig, axes = _figure(len(panels))
    for ax, (key, label) in zip(axes, panels):
        marker = "o" if key.startswith("eval_") else None
        for i, (name, records) in enumerate(runs):
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, color=f"C{i % 10}", marker=marker, markersize=4,
                        label=f"{name}: {key}")
        _finish(fig, ax, title if ax is axes[0] else None, label)
    return fig


def _finish(fig: Any, ax: Any, title: str | None, ylabel: str) -> None:
    if title:
        ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_lines() or ax.patches:
        ax.legend(fontsize="small")


def default_out(run_dirs: Sequence[Path], out: Path | None) -> Path:
    if out is not None:
        return out
    if len(run_dirs) > 1:
        raise UserInputError("--out", "required when plotting several runs")
    return run_dirs[0] / "plots"


def save(figs: dict[str, Any], out: Path) -> list[Path]:
    """Write ``NAME.png`` for each figure into ``out`` (created, or one ftlaunch wrote)."""
    listed = _owned(out)
    names = [f"{name}.png" for name in figs]
    out.mkdir(parents=True, exist_ok=True)
    _mark(out, sorted(set(listed) | set(names)))  # a crash below leaves nothing unlisted
    written = []
    for name, fig in figs.items():
        path = out / f"{name}.png"
        tmp = out / f".{name}.png.tmp"
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
        written.append(path)
    for stale in set(listed) - set(names):  # plots of metrics no longer logged, torn writes
        (out / stale).unlink(missing_ok=True)
    _mark(out, names)
    return written


def _owned(out: Path) -> list[str]:
    """What an earlier ``ftlaunch plot`` wrote into ``out``; refuses anything else there."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise UserInputError("--out", f"{out} exists and is not a directory")
    try:
        listed = json.loads((out / PLOTS_MARK).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        listed = []
    names = [f for f in listed if isinstance(f, str)] if isinstance(listed, list) else []
    owned = {*names, PLOTS_MARK}
    owned |= {f".{name}.tmp" for name in owned}  # left by a write cut short
    foreign = [f for f in present_files(out) if f not in owned]
    if foreign:
        raise UserInputError(
            "--out", f"{out} holds files ftlaunch did not write ({', '.join(foreign[:3])}); "
            "choose another --out, or move them away",
        )
    return sorted(f for f in owned - {PLOTS_MARK} if isinstance(f, str) and "/" not in f)


def _mark(out: Path, files: list[str]) -> None:
    write_atomic(out / PLOTS_MARK, json.dumps({"files": files}, indent=1))
