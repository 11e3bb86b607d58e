"""The per-rank training program: a plain function of the recipe and the rank environment.

Ray Train calls :func:`train_loop_per_worker`; without Ray, ``torchrun -m launcher.worker
RUN_DIR`` (or the ``deepspeed`` launcher) runs the same loop on a run directory that
``ftlaunch check --write RUN_DIR`` or a previous launch prepared.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from launcher import checkpoint as ckpt
from launcher import classification, distill, early_stop, engine_state, stop, task_eval
from launcher.data import (
    IGNORE_INDEX,
    PackedSplit,
    PreparedData,
    StepPlan,
    TokenizedSplit,
    block_diagonal_mask,
    collate_packed,
    collate_padded,
    flatten_packed,
    pack_examples,
    prepare_data,
    total_steps,
)
from launcher.ds_config import offloads_optimizer, zero_stage
from launcher.faults import fault_point
from launcher.flops import device_peak_flops, flops_per_token, mfu, model_shape
from launcher.kernels import KernelPlan, apply_kernels, plan_kernels
from launcher.losses import LossConfig, causal_lm, model_loss_sum, token_loss_sum
from launcher.metrics import JsonlSink, PhaseTimer, peak_memory_gb, read_metrics
from launcher.plan.command import predicted_peak_gb
from launcher.modeling import (
    DTYPES,
    apply_adapter,
    build_model,
    enable_gradient_checkpointing,
    load_task_config,
    load_tokenizer,
    resolve_attention,
    zero3_init_context,
)
from launcher.ranks import Rank, all_reduce, current_rank, gather
from launcher.recipe import EarlyStoppingSection, Recipe, TrainSection
from launcher.schedule import lr_lambda
from launcher.train.hang import StepWatch
from launcher.trainable import apply_trainable, optimizer_groups

# ---------------------------------------------------------------- entry points


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: Ray has already initialised torch.distributed for this worker."""
    import ray.train

    os.environ.setdefault("LOCAL_RANK", str(ray.train.get_context().get_local_rank()))
    recipe = Recipe.model_validate(config["recipe"])
    run(recipe, config["ds_config"], Path(config["run_dir"]))


def main(argv: list[str] | None = None) -> None:
    """torchrun / deepspeed-launcher entry: ``python -m launcher.worker RUN_DIR``."""
    import yaml

    run_dir = Path((argv or sys.argv[1:])[0]).resolve()
    recipe = Recipe.model_validate(yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text()))
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    run(recipe, ds_config, run_dir)


# ---------------------------------------------------------------- construction


def build_optimizer(model: torch.nn.Module, train: TrainSection, offload: bool) -> Any:
    """AdamW with no weight decay on biases and norm weights (parameters of rank < 2), and
    per-group learning rates from train.lr_groups."""
    groups = optimizer_groups(model.named_parameters(), train)
    kwargs = {"lr": train.lr, "betas": train.betas, "eps": train.eps}
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=torch.cuda.is_available(), **kwargs)


def node_local_first(rank: Rank, fn: Callable[[], Any]) -> Any:
    """Local rank 0 runs ``fn`` first (filling node-local caches); the others then reuse it."""
    if rank.local_rank == 0:
        result = fn()
        dist.barrier()
        return result
    dist.barrier()
    return fn()


# ---------------------------------------------------------------- batches and loss


@dataclass(frozen=True)
class Batches:
    split: TokenizedSplit
    packed: PackedSplit | None
    pad_id: int
    dtype: torch.dtype
    attention: str
    pad_left: bool = False

    def units(self) -> int:
        return len(self.packed) if self.packed else len(self.split)

    def make(self, indices: np.ndarray, device: torch.device) -> dict[str, Any]:
        """Packed rows keep attention inside each example: flash-attn gets one padding-free row
        with varlen boundaries; other kernels a block-diagonal mask, needed only when some row
        holds two or more examples. Otherwise padding only trails each row's one example, and
        plain causal attention (the fast path) is exact for every real token."""
        if self.packed is None:
            batch = collate_padded(self.split, indices, self.pad_id, self.pad_left)
        else:
            batch = collate_packed(self.split, self.packed, indices, self.pad_id)
            segments = batch.pop("segment_ids")
            if self.attention == "flash_attention_2":
                batch = flatten_packed(batch, segments)
            elif int(segments.max()) > 1:
                batch["attention_mask"] = block_diagonal_mask(segments, self.dtype)
            else:
                del batch["position_ids"]
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def tokens(self, indices: np.ndarray) -> int:
        """Real (non-padding) tokens in these units."""
        lengths = self.split.lengths()
        if self.packed is None:
            return int(lengths[indices].sum())
        return int(sum(lengths[list(self.packed.rows[int(r)])].sum() for r in indices))


def target_count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def forward_loss(
    engine: Any, batch: dict[str, Any], loss: LossConfig = LossConfig()
) -> torch.Tensor:
    """Summed next-token cross-entropy over real targets (normalised by the caller)."""
    return model_loss_sum(engine, batch, loss)


@dataclass(frozen=True)
class Objective:
    """What a micro batch contributes: its summed loss, and the targets it is normalised by."""

    loss_sum: Callable[[Any, dict[str, Any]], torch.Tensor]
    targets: Callable[[dict[str, torch.Tensor]], int]


def prompt_tuned_loss(engine: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Next-token loss under prompt tuning, which prepends virtual tokens to the input: taken
    from full logits on the real positions only (the hidden-state losses assume none)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = engine(**inputs, use_cache=False).logits
    return token_loss_sum(logits[:, -batch["input_ids"].shape[1] :], batch["labels"])


def objective_for(
    recipe: Recipe, loss: LossConfig, teacher: torch.nn.Module | None = None
) -> Objective:
    if teacher is not None:
        count = target_count if recipe.task == "causal_lm" else (
            lambda batch: classification.target_count(batch["labels"], "single_label")
        )
        return Objective(
            lambda engine, batch: distill.batch_distill_loss(
                engine, teacher, batch, recipe.task, recipe.distill
            ),
            count,
        )
    if recipe.task == "causal_lm" and recipe.method == "prompt_tuning":
        return Objective(prompt_tuned_loss, target_count)
    if recipe.task == "causal_lm":
        return Objective(lambda engine, batch: forward_loss(engine, batch, loss), target_count)
    problem = recipe.labels.problem_type
    return Objective(
        lambda engine, batch: classification.batch_loss_sum(engine, batch, problem),
        lambda batch: classification.target_count(batch["labels"], problem),
    )


# ---------------------------------------------------------------- evaluation


def evaluate(
    engine: Any, batches: Batches, rank: Rank, micro: int, max_batches: int | None,
    loss_sum: Callable[[Any, dict[str, Any]], torch.Tensor] = forward_loss,
) -> dict[str, float]:
    """Loss over the whole validation split, every example counted exactly once."""
    order = np.arange(batches.units())[rank.rank :: rank.world]
    chunks = [order[i : i + micro] for i in range(0, len(order), micro)]
    steps = all_reduce(torch.tensor(len(chunks), device=rank.device), dist.ReduceOp.MAX).item()
    steps = min(steps, max_batches or steps)
    totals = torch.zeros(2, dtype=torch.float64, device=rank.device)
    engine.eval()
    with torch.no_grad():
        for i in range(steps):
            if i < len(chunks):
                batch = batches.make(chunks[i], rank.device)
            else:  # keep ZeRO-3 collectives in step on ranks with fewer batches
                batch = batches.make(order[:1] if len(order) else np.array([0]), rank.device)
                batch["labels"].fill_(IGNORE_INDEX)
            totals[0] += loss_sum(engine, batch).double()
            totals[1] += target_count(batch)
    engine.train()
    loss_sum, count = all_reduce(totals).tolist()
    loss = loss_sum / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def prompt_and_target(ids: np.ndarray, labels: np.ndarray) -> tuple[list[int], list[int]]:
    """The prompt before the first trained token, and the first trained span as the target."""
    trained = np.flatnonzero(labels != IGNORE_INDEX)
    start = int(trained[0])
    end = start
    while end < len(labels) and labels[end] != IGNORE_INDEX:
        end += 1
    return ids[:start].tolist(), ids[start:end].tolist()


def exact_match(
    engine: Any, split: TokenizedSplit, rank: Rank, num: int, max_new: int, pad_id: int, sync: bool
) -> float:
    """Greedy-decode validation prompts; a hit reproduces the whole target, stop token included.

    Of the first ``num`` examples, those whose first token is trained have no prompt to
    decode from and are left out (the recipe check refuses the settings that make them)."""
    candidates = range(min(num, len(split)))
    prompted = [i for i in candidates if split.example(i)[1][0] == IGNORE_INDEX]
    mine = prompted[rank.rank :: rank.world]
    size = 16
    rounds = all_reduce(torch.tensor(math.ceil(len(mine) / size), device=rank.device), dist.ReduceOp.MAX)
    hits = torch.zeros(2, dtype=torch.float64, device=rank.device)
    model = engine.module
    model.eval()
    with torch.no_grad():
        for r in range(int(rounds)):
            chunk = mine[r * size : (r + 1) * size]
            pairs = [prompt_and_target(*split.example(i)) for i in (chunk or [0])]
            width = max(len(p) for p, _ in pairs)
            ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, (prompt, _) in enumerate(pairs):
                ids[row, width - len(prompt) :] = torch.tensor(prompt)
                mask[row, width - len(prompt) :] = 1
            out = model.generate(
                input_ids=ids.to(rank.device),
                attention_mask=mask.to(rank.device),
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=pad_id,
                synced_gpus=sync,
            )
            if not chunk:
                continue
            for row, (_, target) in enumerate(pairs):
                generated = out[row, width : width + len(target)].tolist()
                hits[0] += float(generated == target)
                hits[1] += 1
    model.train()
    correct, total = all_reduce(hits).tolist()
    return correct / max(total, 1)


@dataclass(frozen=True)
class Inputs:
    """The tokenized data as this run consumes it: batches, validation, and the step plan."""

    data: PreparedData
    batches: Batches
    validation: Batches | None
    plan: StepPlan
    steps: int


def prepare_inputs(
    recipe: Recipe, tokenizer: Any, model_type: str, attention: str, rank: Rank
) -> Inputs:
    train = recipe.train
    data = node_local_first(
        rank, lambda: prepare_data(recipe.data, tokenizer, train.seed, recipe.labels)
    )
    dtype = DTYPES[recipe.model.dtype]
    left = classification.pads_left(recipe.task, recipe.method, model_type)
    pad_id = tokenizer.pad_token_id
    packed = None
    if recipe.data.packing:
        packed = pack_examples(data.train.lengths(), recipe.data.max_length)
    batches = Batches(data.train, packed, pad_id, dtype, attention, left)
    validation = None
    if data.validation is not None:
        validation = Batches(data.validation, None, pad_id, dtype, attention, left)
    plan = StepPlan(
        batches.units(), train.micro_batch_size, train.grad_accum, rank.world, train.seed,
        recipe.data.shuffle,
    )
    return Inputs(data, batches, validation, plan, total_steps(plan, train.max_steps, train.epochs))


@dataclass(frozen=True)
class Trainee:
    engine: Any
    model: torch.nn.Module
    schedule: Any
    kernels: KernelPlan


def build_engine(
    recipe: Recipe, ds_config: dict[str, Any], config: Any, attention: str, steps: int
) -> Trainee:
    """Model, adapter or trainable subset, optimizer and schedule in a DeepSpeed engine, all
    built while the ZeRO-3 context lives, so no rank materialises the whole model."""
    import deepspeed

    with zero3_init_context(ds_config):
        model = build_model(recipe.model, config, attention, recipe.task)
        kernels = plan_kernels(
            recipe.model, recipe.lora, model.config.model_type, recipe.resources.use_gpu,
            zero_stage(ds_config),
        )
        apply_kernels(model, kernels)
        if recipe.model.gradient_checkpointing:
            enable_gradient_checkpointing(model, recipe.model.checkpoint_every)
        if recipe.uses_adapter:
            model = apply_adapter(model, recipe)
        else:
            head = classification.head_module_names(model) if recipe.task != "causal_lm" else []
            apply_trainable(model, recipe.method, recipe.train.freeze, head)
        optimizer = build_optimizer(model, recipe.train, offloads_optimizer(ds_config))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe.train, steps))
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
        )
    if recipe.model.compile:
        engine.compile()
    return Trainee(engine, model, schedule, kernels)


def train_step(
    engine: Any, objective: Objective, batches: Batches, plan: StepPlan, step: int, rank: Rank
) -> dict[str, float]:
    """One optimizer step over this rank's micro batches. Each micro batch's summed loss is
    divided by the real targets of the whole global batch (and scaled back up by the
    accumulation x world averaging DeepSpeed applies), so the objective does not depend on
    how the global batch is split."""
    began = time.perf_counter()
    timer = PhaseTimer(rank.device)
    indices = plan.micro_batches(step, rank.rank)
    micro = [batches.make(ix, rank.device) for ix in indices]
    counts = torch.tensor(
        [sum(objective.targets(b) for b in micro), sum(batches.tokens(ix) for ix in indices)],
        dtype=torch.float64, device=rank.device,
    )
    targets, real_tokens = all_reduce(counts).tolist()
    timer.lap("data")
    scale = len(micro) * rank.world
    loss_total = torch.zeros((), dtype=torch.float64, device=rank.device)
    for batch in micro:
        loss = objective.loss_sum(engine, batch)
        engine.backward(loss * scale / targets)
        timer.lap("fwd_bwd")
        engine.step()
        timer.lap("optim")
        loss_total += loss.detach().double()
    loss_value = all_reduce(loss_total).item() / targets
    seconds = time.perf_counter() - began
    return {
        "loss": loss_value, "tokens": int(real_tokens), "tokens_per_s": real_tokens / seconds,
        **timer.seconds(),
    }


def write_run_info(run_dir: Path, info: dict[str, Any], data: PreparedData, rank: Rank) -> None:
    (run_dir / "run_info.json").write_text(
        json.dumps(info | {"data": {k: v.__dict__ for k, v in data.stats.items()}}, indent=1)
    )
    for name, stats in data.stats.items():
        rank.log(stats.summary(name))


def record_measured_peak(run_dir: Path, peak_gb: float) -> None:
    """run_info.json gains rank 0's measured peak beside the planner's prediction."""
    path = run_dir / "run_info.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps(info | {"measured_peak_memory_gb": peak_gb}, indent=1))


# ---------------------------------------------------------------- the loop


def run(recipe: Recipe, ds_config: dict[str, Any], run_dir: Path) -> None:
    import deepspeed

    # Adopts the process group Ray Train (or torchrun) set up; ZeRO-3 construction needs it.
    deepspeed.init_distributed(dist_backend="nccl" if recipe.resources.use_gpu else "gloo")
    rank = current_rank(recipe.resources.use_gpu)
    train = recipe.train
    torch.manual_seed(train.seed)
    tokenizer = load_tokenizer(recipe.model)
    config = load_task_config(recipe, tokenizer.pad_token_id)
    attention = resolve_attention(recipe.model.attention, recipe.resources.use_gpu)
    inputs = prepare_inputs(recipe, tokenizer, config.model_type, attention, rank)
    steps, plan = inputs.steps, inputs.plan

    resume_point = engine_state.find_resume_point(run_dir, recipe.checkpoint, rank)
    ds_config = engine_state.config_for(ds_config, resume_point)
    torch.manual_seed(train.seed)
    trainee = build_engine(recipe, ds_config, config, attention, steps)
    engine, kernels = trainee.engine, trainee.kernels
    lora = recipe.uses_adapter
    per_token = flops_per_token(model_shape(causal_lm(trainee.model)), recipe.data.max_length, lora)
    peak = device_peak_flops(rank.device, recipe.logging.peak_tflops, recipe.model.dtype)
    teacher = None
    if recipe.distill:
        teacher = distill.load_teacher(recipe, ds_config, rank.device, DTYPES[recipe.model.dtype])

    start = engine_state.restore(engine, resume_point, rank)
    engine_state.record_attempt(run_dir, start, resume_point, rank)
    sink = JsonlSink(run_dir / "metrics.jsonl", start) if rank.rank == 0 else None
    if rank.rank == 0:
        trainable = [p for p in trainee.model.parameters() if p.requires_grad]
        info = {
            "total_steps": steps, "steps_per_epoch": plan.steps_per_epoch, "world_size": rank.world,
            "attention": attention, "kernels": kernels.kernels, "loss": kernels.loss.kind,
            "flops_per_token": per_token, "peak_flops": peak,
            "packed_rows": inputs.batches.units() if recipe.data.packing else None,
            "trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in trainable),
            "teacher_parameters": distill.held_parameters(teacher) if teacher else None,
            "predicted_peak_memory_gb": predicted_peak_gb(recipe, rank.world),
        }
        write_run_info(run_dir, info, inputs.data, rank)
        rank.log(
            f"attention kernel: {attention}; kernels: {kernels.kernels}; loss: "
            f"{kernels.loss.kind}; {steps} steps; resuming at step {start}"
        )
    stage3 = zero_stage(ds_config) == 3

    def evaluate_now() -> dict[str, float]:
        return run_eval(
            engine, recipe, inputs.validation, inputs.data.validation, rank,
            tokenizer.pad_token_id, stage3,
        )

    if start == 0 and recipe.eval.at_start and inputs.validation is not None:
        initial = evaluate_now()
        if sink:
            sink.write({"step": 0} | initial)
    objective = objective_for(recipe, kernels.loss, teacher)
    saves = engine_state.SaveSchedule(recipe.checkpoint, steps)
    stopping = recipe.eval.early_stopping
    history = eval_history(run_dir, stopping, start, rank)
    stopped = stopping is not None and early_stop.judge(history, stopping).stop
    done = start
    preempt = PreemptState(start)
    watch = StepWatch(run_dir, rank.rank, recipe.resources.hang_dump_s)
    for step in range(start, start if stopped else steps):
        watch.arm()
        if preempt.stop_here(engine, run_dir, step, rank, recipe):
            break
        fault_point("crash", step, run_dir, rank)
        fault_point("hang", step, run_dir, rank)
        fault_point("sleep_step", step, run_dir, rank)
        done = step + 1
        lr = trainee.schedule.get_last_lr()[0]  # the rate this step's update uses
        record = {"step": done} | train_step(engine, objective, inputs.batches, plan, step, rank)
        record |= {
            "lr": lr,
            "grad_norm": _float(engine.get_global_grad_norm()),
            "peak_memory_gb": peak_memory_gb(rank.device),
            "epoch": done / max(plan.steps_per_epoch, 1),  # passes over the data completed
        }
        if peak:
            record["mfu"] = mfu(per_token, record["tokens_per_s"], rank.world, peak)
            record["mfu_basis"] = "lora" if lora else "full"
        eval_due = inputs.validation is not None and (
            (recipe.eval.every_steps and done % recipe.eval.every_steps == 0)
            or (done == steps and recipe.eval.at_end)
        )
        if eval_due:
            record |= evaluate_now()
        if sink and (done % recipe.logging.every_steps == 0 or eval_due or done == steps):
            sink.write(record)
        verdict = None
        if eval_due and stopping is not None:
            history, verdict = early_stop.observe(history, stopping, done, record)
        if saves.due(done, rank) or (verdict and (verdict.improved or verdict.stop)):
            preempt.timed_save(engine, run_dir, done, rank, recipe)
        if verdict and verdict.improved and rank.rank == 0:
            ckpt.write_best(run_dir, done, stopping.metric, verdict.best_value)
        if verdict and verdict.stop:
            rank.log(
                f"early stopping at step {done}: {stopping.metric} has not improved for "
                f"{verdict.stale} evaluations (best {verdict.best_value:.4g} at step {verdict.best_step})"
            )
            break
    watch.close()
    if not preempt.stopped:
        write_probe(engine, run_dir, rank, tokenizer, done)
    if rank.rank == 0:
        record_measured_peak(run_dir, peak_memory_gb(rank.device))
    if sink:
        sink.close()


class PreemptState:
    """The loop's side of a stop request (launcher.stop): the newest saved step and how long
    the last save took, to decide at a step boundary whether a checkpoint still fits."""

    def __init__(self, start: int):
        self.saved = start
        self.save_seconds: float | None = None
        self.stopped = False

    def timed_save(self, engine: Any, run_dir: Path, step: int, rank: Rank, recipe: Recipe) -> None:
        began = time.monotonic()
        engine_state.save(engine, run_dir, step, rank, recipe)
        self.saved, self.save_seconds = step, time.monotonic() - began

    def stop_here(self, engine: Any, run_dir: Path, step: int, rank: Rank, recipe: Recipe) -> bool:
        """True when the driver asked to stop; first commits step ``step`` if asked and it fits."""
        req = stop.agreed(run_dir, rank)
        if req is None:
            return False
        self.stopped = True
        if step > self.saved and stop.save_fits(req, self.save_seconds):
            rank.log(f"{req.signal}: committing a checkpoint at step {step} before stopping")
            self.timed_save(engine, run_dir, step, rank, recipe)
        elif step > self.saved and req.save:
            rank.log(f"{req.signal}: no checkpoint at step {step}: the last save took "
                     f"{self.save_seconds:.1f} s, {max(req.seconds_left(), 0):.1f} s are left")
        newest = f"step {self.saved}" if self.saved else "none"
        rank.log(f"{req.signal}: stopping at step {step}; newest checkpoint: {newest}")
        return True


def eval_history(
    run_dir: Path, stopping: EarlyStoppingSection | None, start: int, rank: Rank
) -> list[tuple[int, float]]:
    """The evaluations logged before ``start`` (a resumed run continues judging them)."""
    if stopping is None:
        return []
    records = read_metrics(run_dir / "metrics.jsonl") if rank.rank == 0 else None
    return early_stop.history_from(gather(records, rank)[0], stopping.metric, start)


def run_eval(
    engine: Any, recipe: Recipe, batches: Batches, split: TokenizedSplit, rank: Rank,
    pad_id: int, stage3: bool,
) -> dict[str, float]:
    if recipe.task != "causal_lm":
        return task_eval.evaluate(
            engine, lambda ix: batches.make(ix, rank.device), split, rank,
            recipe.train.micro_batch_size, recipe.eval.max_batches, recipe.task, recipe.labels,
        )
    loss_sum = prompt_tuned_loss if recipe.method == "prompt_tuning" else forward_loss
    metrics = evaluate(
        engine, batches, rank, recipe.train.micro_batch_size, recipe.eval.max_batches, loss_sum
    )
    em = recipe.eval.exact_match
    if em is not None:
        metrics["eval_exact_match"] = exact_match(
            engine, split, rank, em.num_examples, em.max_new_tokens, pad_id, stage3
        )
    return metrics


def write_probe(engine: Any, run_dir: Path, rank: Rank, tokenizer: Any, step: int) -> None:
    """Record the trained model's logits on a few tokens, and the step they were taken at;
    export checks an export of that step's checkpoint against them. Written atomically."""
    from safetensors.torch import save_file

    ids = torch.tensor([probe_ids(tokenizer)], device=rank.device)
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=ids, use_cache=False).logits.float().cpu()
    engine.train()
    if rank.rank == 0:
        tmp = run_dir / f".{PROBE}.tmp"
        tensors = {"input_ids": ids.cpu(), "logits": logits}
        save_file(tensors, str(tmp), metadata={"step": str(step)})
        os.replace(tmp, run_dir / PROBE)


PROBE = "probe.safetensors"


def probe_ids(tokenizer: Any) -> list[int]:
    vocab = len(tokenizer)
    return [(7 * i + 3) % vocab for i in range(16)]


def _float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


if __name__ == "__main__":
    main()
