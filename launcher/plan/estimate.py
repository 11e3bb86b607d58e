"""One row per ZeRO stage and offload choice for a recipe on given hardware, the fastest row
that fits with headroom, and the step and run time that row would take at an assumed MFU."""

from __future__ import annotations

import math
from dataclasses import dataclass
from launcher.recipe.ds_config import deep_merge, load_base_config
from launcher.errors import UserInputError
from launcher.model.flops import ModelShape, flops_per_token, table_peak_flops
from launcher.model.kernels import fused_obstacle, liger_families
from launcher.plan.memory import (
    OPTIONS,
    ActivationSpec,
    Hardware,
    Option,
    Precision,
    activations,
    model_states,
)
from launcher.plan.model import ModelFacts
from launcher.recipe import Recipe

HEADROOM = 0.10  # a choice fits when it needs at most 90% of a GPU's memory
CUDA_RESERVE = 1 << 30  # CUDA context, NCCL and communication buckets, outside PyTorch's count
DEFAULT_MFU = 0.40
ASSUMED_GPU = "H100"  # the device peak when neither the recipe nor the cluster names one


@dataclass(frozen=True)
class Budget:
    """What one GPU and one node offer, and the assumptions the estimate rests on."""

    gpu_bytes: int
    host_bytes: int | None  # per node; None: unknown (no --address)
    gpu_name: str | None
    headroom: float = HEADROOM
    mfu: float = DEFAULT_MFU


@dataclass(frozen=True)
class Row:
    option: Option
    loss: str
    states: int
    activations: int
    reserve: int
    host: int

    @property
    def total(self) -> int:
        return self.states + self.activations + self.reserve

    def fits(self, budget: Budget) -> bool:
        gpu_ok = self.total <= budget.gpu_bytes * (1 - budget.headroom)
        host = budget.host_bytes
        host_ok = host is None or self.host <= host * (1 - budget.headroom)
        return gpu_ok and host_ok


@dataclass(frozen=True)
class Timing:
    flops_per_token: float
    tokens_per_step: int
    peak_flops: float
    peak_source: str
    step_s: float
    steps: int | None
    steps_note: str

    @property
    def run_s(self) -> float | None:
        return None if self.steps is None else self.steps * self.step_s


@dataclass(frozen=True)
class Plan:
    rows: tuple[Row, ...]
    recommended: Row | None
    current: Option  # what the recipe's deepspeed.config asks for
    hardware: Hardware
    budget: Budget
    timing: Timing | None


def kernels_for(recipe: Recipe, model_type: str) -> str:
    """The kernels the run would get on its GPUs: auto means Liger where it is installed and
    has kernels for the model family (decided here from the package, not from a GPU)."""
    requested = recipe.model.kernels
    if requested != "auto":
        return requested
    usable = recipe.resources.use_gpu and model_type in liger_families()
    return "liger" if usable else "none"


def loss_for(recipe: Recipe, kernels: str, stage: int) -> str:
    requested = recipe.model.loss
    if requested in ("plain", "chunked"):
        return requested
    fused_ok = fused_obstacle(kernels, recipe.lora, stage) is None
    return "fused" if fused_ok else "chunked"


def activation_spec(recipe: Recipe, facts: ModelFacts, kernels: str, loss: str) -> ActivationSpec:
    m = recipe.model
    rank = recipe.lora.r if recipe.lora is not None else 0
    return ActivationSpec(
        micro_batch=recipe.train.micro_batch_size,
        seq_len=recipe.data.max_length,
        act_bytes=4 if m.dtype == "fp32" else 2,
        attention=m.attention,
        checkpointing=m.gradient_checkpointing,
        checkpoint_every=m.checkpoint_every,
        kernels=kernels,
        loss=loss,
        loss_chunk=m.loss_chunk_size,
        adapter_inputs=facts.adapter_inputs,
        lora_rank=rank,
        adapted_per_layer=facts.adapted_per_layer,
    )


def rows_for(recipe: Recipe, facts: ModelFacts, hw: Hardware) -> tuple[Row, ...]:
    precision = Precision.of(recipe.model.dtype)
    kernels = kernels_for(recipe, facts.model_type)
    reserve = CUDA_RESERVE if recipe.resources.use_gpu else 0
    rows = []
    for option in OPTIONS:
        if recipe.model.quantization != "none" and option.stage == 3:
            continue  # ZeRO-3 cannot partition 4-bit weights (launcher.driver.prepare refuses it)
        states = model_states(facts.counts, precision, option, hw)
        loss = loss_for(recipe, kernels, option.stage)
        acts = activations(facts.shape, activation_spec(recipe, facts, kernels, loss))
        rows.append(Row(option, loss, states.gpu, acts, reserve, states.cpu))
    return tuple(rows)


def recipe_option(recipe: Recipe) -> Option:
    """The stage and offload the recipe's DeepSpeed config (preset plus overrides) asks for."""
    base, _ = load_base_config(recipe.deepspeed.config)
    zero = deep_merge(base, recipe.deepspeed.overrides).get("zero_optimization", {})
    offloaded = {"cpu", "nvme"}
    return Option(
        int(zero.get("stage", 0)),
        (zero.get("offload_optimizer") or {}).get("device") in offloaded,
        (zero.get("offload_param") or {}).get("device") in offloaded,
    )


def peak_of(recipe: Recipe, gpu_name: str | None) -> tuple[float, str]:
    if recipe.logging.peak_tflops is not None:
        return recipe.logging.peak_tflops * 1e12, "logging.peak_tflops"
    found = table_peak_flops(gpu_name) if gpu_name else None
    if found is not None:
        return found, f"{gpu_name} (bf16 dense datasheet peak)"
    return table_peak_flops(ASSUMED_GPU), f"assumed {ASSUMED_GPU} SXM bf16 dense peak"


def training_steps(recipe: Recipe, hw: Hardware) -> tuple[int | None, str]:
    """train.max_steps, else epochs over a local unpacked training set; else unknown."""
    if recipe.train.max_steps is not None:
        return recipe.train.max_steps, "train.max_steps"
    if recipe.data.packing:
        return None, "packed rows are known only after tokenizing; set train.max_steps"
    from launcher.data.read import iter_rows, numeric_fields

    try:
        rows = sum(1 for _ in iter_rows(recipe.data.train, numeric_fields(recipe.data)))
    except (UserInputError, OSError, ValueError) as e:
        return None, f"the training data cannot be read here ({e})"
    held_out = 0.0 if recipe.data.validation else recipe.data.val_fraction
    train_rows = math.floor(rows * (1 - held_out))
    batch = recipe.train.micro_batch_size * recipe.train.grad_accum * hw.gpus
    return math.ceil(train_rows * recipe.train.epochs / batch), f"{train_rows} examples"


def timing(recipe: Recipe, facts: ModelFacts, hw: Hardware, budget: Budget) -> Timing:
    shape = facts.shape
    per_token = flops_per_token(
        ModelShape(facts.non_embedding, shape.layers, shape.heads, shape.head_dim),
        recipe.data.max_length, recipe.uses_adapter,
    )
    t = recipe.train
    tokens = t.micro_batch_size * t.grad_accum * hw.gpus * recipe.data.max_length
    peak, source = peak_of(recipe, budget.gpu_name)
    step_s = tokens * per_token / (hw.gpus * peak * budget.mfu)
    steps, note = training_steps(recipe, hw)
    return Timing(per_token, tokens, peak, source, step_s, steps, note)


def make_plan(recipe: Recipe, facts: ModelFacts, hw: Hardware, budget: Budget) -> Plan:
    rows = rows_for(recipe, facts, hw)
    best = next((r for r in rows if r.fits(budget)), None)
    return Plan(rows, best, recipe_option(recipe), hw, budget, timing(recipe, facts, hw, budget))


def row_of(plan: Plan, option: Option) -> Row | None:
    return next((r for r in plan.rows if r.option == option), None)


def fit_warning(plan: Plan) -> str | None:
    """A one-line warning when the recipe's own choice does not fit, naming one that does."""
    mine = row_of(plan, plan.current)
    if mine is None or mine.fits(plan.budget):
        return None
    need, have = mine.total / 2**30, plan.budget.gpu_bytes / 2**30
    better = plan.recommended
    advice = f"{better.option.name} would fit" if better else "no ZeRO stage or offload fits"
    return (
        f"{plan.current.name} needs ~{need:.1f} GiB per GPU (model states and activations), "
        f"more than {1 - plan.budget.headroom:.0%} of the {have:.1f} GiB each GPU has; {advice} "
        "(see ftlaunch plan)"
    )


def predicted_peak_bytes(plan: Plan) -> int | None:
    """What PyTorch's peak allocated memory should read for the recipe's own choice."""
    mine = row_of(plan, plan.current)
    return None if mine is None else mine.states + mine.activations
