"""The planner's figures for one recipe on given GPUs, without any cluster access: what the
training loop records as its predicted peak and what the fit warning compares against."""

from __future__ import annotations

from launcher.errors import UserInputError
from launcher.plan.estimate import Budget, Plan, make_plan, predicted_peak_bytes
from launcher.plan.memory import Hardware
from launcher.plan.model import model_facts
from launcher.recipe import Recipe

DEFAULT_GPU_BYTES = 80 * 2**30


def plan_on(recipe: Recipe, gpu_bytes: int, gpus_per_node: int, nodes: int) -> Plan:
    facts = model_facts(recipe)
    return make_plan(recipe, facts, Hardware(gpus_per_node, nodes), Budget(gpu_bytes, None, None))


def predicted_peak_gb(recipe: Recipe, world: int) -> float | None:
    """The planner's figure for PyTorch's peak allocated memory of one rank (10^9 bytes, as
    peak_memory_gb reads it), for the recipe's own ZeRO choice on ``world`` ranks."""
    try:
        plan = plan_on(recipe, DEFAULT_GPU_BYTES, world, 1)
    except (UserInputError, ValueError, TypeError, AttributeError):
        return None
    peak = predicted_peak_bytes(plan)
    return None if peak is None else round(peak / 1e9, 4)
