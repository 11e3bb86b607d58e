"""A plan as a table for people and as JSON for programs; both carry the same figures (the
table in GiB to two decimals, the JSON in bytes)."""

from __future__ import annotations

from typing import Any

from launcher.plan.estimate import Plan, Row
from launcher.plan.model import ModelFacts
from launcher.recipe import Recipe

GIB = 2**30
COLUMNS = ("choice", "loss", "states", "activations", "reserve", "total/GPU", "host/node", "fits")


def gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f}"


def count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3f} {suffix}"
    return str(n)


def _row_cells(row: Row, plan: Plan) -> list[str]:
    mark = "yes" if row.fits(plan.budget) else "no"
    if row is plan.recommended:
        mark += " <- recommended"
    name = row.option.name + (" (recipe)" if row.option == plan.current else "")
    return [
        name, row.loss, gib(row.states), gib(row.activations), gib(row.reserve), gib(row.total),
        gib(row.host), mark,
    ]


def table(cells: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i in (0, 1, 7) else c.rjust(w) for i, (c, w) in
                  enumerate(zip(r, widths))).rstrip()
        for r in cells
    )


def header(recipe: Recipe, facts: ModelFacts, plan: Plan) -> list[str]:
    c, hw, b = facts.counts, plan.hardware, plan.budget
    m = recipe.model
    ckpt = f"every {m.checkpoint_every} layer(s)" if m.gradient_checkpointing else "off"
    host = f"{gib(b.host_bytes)} GiB host memory per node" if b.host_bytes else (
        "host memory unknown (--address reads it)"
    )
    gpu = f"{b.gpu_name}, " if b.gpu_name else ""
    return [
        f"model: {facts.model_type}, {count(c.total)} parameters, {count(c.trainable)} "
        f"trainable ({c.trainable / c.total:.2%}, method {recipe.method}); largest layer "
        f"{count(c.largest_layer)}",
        f"hardware: {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s), {gpu}{gib(b.gpu_bytes)} GiB "
        f"per GPU; {host}",
        f"per GPU: micro batch {recipe.train.micro_batch_size} x {recipe.data.max_length} tokens, "
        f"{m.dtype}, AdamW, gradient checkpointing {ckpt}, attention {m.attention}",
    ]


def footer(plan: Plan) -> list[str]:
    b = plan.budget
    lines = [
        f"fits: total/GPU at most {1 - b.headroom:.0%} of {gib(b.gpu_bytes)} GiB ({b.headroom:.0%} "
        "headroom for fragmentation and buffers)"
        + ("" if b.host_bytes is None else ", and host/node within the same share of host memory"),
    ]
    best = plan.recommended
    lines.append(
        f"recommended: {best.option.name} (the fastest choice that fits)" if best else
        "recommended: none: no ZeRO stage or offload fits; use more GPUs, a smaller micro "
        "batch or sequence length, gradient checkpointing, or LoRA"
    )
    t = plan.timing
    if best and t:
        run = "" if t.run_s is None else f"; run: {t.steps} steps ~ {t.run_s / 3600:.2f} h"
        lines.append(
            f"time: {t.flops_per_token:.3g} FLOPs/token x {t.tokens_per_step} tokens/step at an "
            f"ASSUMED MFU of {b.mfu:.0%} (--mfu) of {t.peak_flops / 1e12:.0f} TFLOP/s per GPU "
            f"({t.peak_source}): step ~ {t.step_s:.2f} s{run} "
            f"({'steps unknown: ' + t.steps_note if t.steps is None else t.steps_note})"
        )
        if best.option.offload_optimizer:
            lines.append("  offloaded optimizer steps run on the CPUs: expect a slower step")
    return lines


def render(recipe: Recipe, facts: ModelFacts, plan: Plan) -> str:
    cells = [list(COLUMNS)] + [_row_cells(r, plan) for r in plan.rows]
    return "\n".join(
        [*header(recipe, facts, plan), "", table(cells), "", *footer(plan)]
    ) + "\n"


def to_json(recipe: Recipe, facts: ModelFacts, plan: Plan) -> dict[str, Any]:
    c, b, t = facts.counts, plan.budget, plan.timing
    return {
        "model": {
            "model_type": facts.model_type, "parameters": c.total, "trainable": c.trainable,
            "largest_layer": c.largest_layer, "quantized": c.quantized,
        },
        "hardware": {
            "nodes": plan.hardware.nodes, "gpus_per_node": plan.hardware.gpus_per_node,
            "gpu_bytes": b.gpu_bytes, "gpu_name": b.gpu_name, "host_bytes": b.host_bytes,
        },
        "headroom": b.headroom,
        "rows": [
            {
                "choice": r.option.name, "stage": r.option.stage,
                "offload_optimizer": r.option.offload_optimizer,
                "offload_param": r.option.offload_param, "loss": r.loss,
                "states_bytes": r.states, "activations_bytes": r.activations,
                "reserve_bytes": r.reserve, "total_bytes": r.total, "host_bytes": r.host,
                "fits": r.fits(b),
            }
            for r in plan.rows
        ],
        "recipe_choice": plan.current.name,
        "recommended": plan.recommended.option.name if plan.recommended else None,
        "timing": None if t is None else {
            "flops_per_token": t.flops_per_token, "tokens_per_step": t.tokens_per_step,
            "peak_flops": t.peak_flops, "peak_source": t.peak_source, "assumed_mfu": b.mfu,
            "step_s": t.step_s, "steps": t.steps, "steps_note": t.steps_note, "run_s": t.run_s,
        },
    }
