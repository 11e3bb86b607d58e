"""The per-rank training program: set up once, then a flat loop of steps, evaluations,
checkpoints and stop checks, then the probe export verifies against."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launcher.checkpoint import commit as ckpt
from launcher.checkpoint import engine_state
from launcher.data.batch import Batches
from launcher.data.tokenized import PreparedData
from launcher.model.build import DTYPES, load_model_config, load_tokenizer, resolve_attention
from launcher.model.losses import causal_lm
from launcher.ranks import Rank, all_reduce, current_rank, gather, gather_rows
from launcher.recipe.run_sections import EarlyStoppingSection
from launcher.recipe import Recipe
from launcher.recipe.ds_config import zero_stage
from launcher.run.probe import write_probe
from launcher.run.rundir import RunDir
from launcher.run.store import store_for
from launcher.run.sync import push_from_worker
from launcher.tasks import distill
from launcher.tasks.base import EvalContext, Objective, Task, task_for
from launcher.train import early_stop
from launcher.train.divergence import NonFiniteLoss
from launcher.train.faults import fault_point, nan_loss, slow_step
from launcher.train.hang import StepWatch
from launcher.model.flops import device_peak_flops, flops_per_token, mfu, model_shape
from launcher.plan.predict import predicted_peak_gb
from launcher.train.metrics import JsonlSink, PhaseTimer, peak_memory_gb, read_metrics
from launcher.train.preempt import PreemptState
from launcher.train.setup import Inputs, Trainee, batch_layout, build_engine, prepare_inputs


@dataclass
class Session:
    """What the loop works with, built once by :func:`open_session`."""

    recipe: Recipe
    task: Task
    rank: Rank
    run_dir: Path
    inputs: Inputs
    trainee: Trainee
    objective: Objective
    eval_ctx: EvalContext | None
    sink: JsonlSink | None
    start: int
    per_token: float
    peak: float | None
    tokenizer: Any


def run(recipe: Recipe, ds_config: dict[str, Any], run_dir: Path) -> None:
    s = open_session(recipe, ds_config, run_dir)
    if s.start == 0 and recipe.eval.at_start and s.eval_ctx is not None:
        initial = evaluate_now(s)
        if s.sink:
            s.sink.write({"step": 0} | initial)
    done, preempt = train(s)
    if not preempt.stopped:
        write_probe(s.trainee.engine, run_dir, s.rank, s.tokenizer, done)
    if s.rank.rank == 0:
        record_measured_peak(run_dir, peak_memory_gb(s.rank.device))
    if s.sink:
        s.sink.close()
    if s.rank.rank == 0:
        push_from_worker(recipe.output_dir, run_dir)  # an object-store run's metrics and probe


def open_session(recipe: Recipe, ds_config: dict[str, Any], run_dir: Path) -> Session:
    import deepspeed

    # Adopts the process group Ray Train (or torchrun) set up; ZeRO-3 construction needs it.
    deepspeed.init_distributed(dist_backend="nccl" if recipe.resources.use_gpu else "gloo")
    rank = current_rank(recipe.resources.use_gpu)
    task = task_for(recipe)
    torch.manual_seed(recipe.train.seed)
    tokenizer = load_tokenizer(recipe.model)
    config = task.configure(load_model_config(recipe.model), tokenizer.pad_token_id)
    attention = resolve_attention(recipe.model.attention, recipe.resources.use_gpu)
    layout = batch_layout(recipe, task, tokenizer, config.model_type, attention)
    inputs = prepare_inputs(recipe.data, recipe.labels, recipe.train, tokenizer, layout, rank)
    store = store_for(recipe.output_dir)
    resume_point = engine_state.find_resume_point(run_dir, recipe.checkpoint, rank, store)
    ds_config = engine_state.config_for(ds_config, resume_point)
    torch.manual_seed(recipe.train.seed)
    trainee = build_engine(recipe, task, ds_config, config, attention, inputs.steps)
    objective = task.objective(trainee.kernels.loss)
    teacher = None
    if recipe.distill:
        dtype = DTYPES[recipe.model.dtype]
        teacher = distill.load_teacher(recipe, ds_config, rank.device, dtype)
        objective = task.distill_objective(teacher, recipe.distill)
    start = engine_state.restore(trainee.engine, resume_point, rank)
    engine_state.record_attempt(run_dir, start, resume_point, rank, store)
    eval_ctx = None
    if inputs.validation is not None:
        stage3 = zero_stage(ds_config) == 3
        eval_ctx = EvalContext(
            inputs.validation, inputs.data.validation, rank, recipe.train.micro_batch_size,
            tokenizer.pad_token_id, stage3,
        )
    lora = recipe.uses_adapter
    per_token = flops_per_token(model_shape(causal_lm(trainee.model)), recipe.data.max_length, lora)
    peak = device_peak_flops(rank.device, recipe.logging.peak_tflops, recipe.model.dtype)
    sink = JsonlSink(RunDir(run_dir).metrics, start) if rank.rank == 0 else None
    s = Session(recipe, task, rank, run_dir, inputs, trainee, objective, eval_ctx, sink, start,
                per_token, peak, tokenizer)
    nodes = gather(socket.gethostname(), rank)  # every rank takes part
    if rank.rank == 0:
        log_start(s, attention, teacher, nodes)
    return s


def log_start(
    s: Session, attention: str, teacher: torch.nn.Module | None, nodes: list[str]
) -> None:
    kernels, inputs, steps = s.trainee.kernels, s.inputs, s.inputs.steps
    trainable = [p for p in s.trainee.model.parameters() if p.requires_grad]
    info = {
        "total_steps": steps, "steps_per_epoch": inputs.plan.steps_per_epoch,
        "world_size": s.rank.world, "attention": attention, "kernels": kernels.kernels,
        "loss": kernels.loss.kind, "flops_per_token": s.per_token, "peak_flops": s.peak,
        "packed_rows": inputs.batches.units() if s.recipe.data.packing else None,
        "packing_layout": (
            ("length_groups" if inputs.batches.grouped else "rows") if s.recipe.data.packing
            else None
        ),
        "trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in trainable),
        "teacher_parameters": distill.held_parameters(teacher) if teacher else None,
        "predicted_peak_memory_gb": predicted_peak_gb(s.recipe, s.rank.world),
        "rank_nodes": nodes,
    }
    write_run_info(s.run_dir, info, inputs.data, s.rank)
    s.rank.log(
        f"attention kernel: {attention}; kernels: {kernels.kernels}; loss: "
        f"{kernels.loss.kind}; {steps} steps; resuming at step {s.start}"
    )


def evaluate_now(s: Session) -> dict[str, float]:
    return s.task.evaluate(s.trainee.engine, s.eval_ctx, s.recipe.eval)


def train(s: Session) -> tuple[int, PreemptState]:
    """The loop: returns the last step done and the stop state."""
    recipe, rank, run_dir = s.recipe, s.rank, s.run_dir
    steps, stopping = s.inputs.steps, recipe.eval.early_stopping
    saves = engine_state.SaveSchedule(recipe.checkpoint, steps)
    history = eval_history(run_dir, stopping, s.start, rank)
    stopped = stopping is not None and early_stop.judge(history, stopping).stop
    done = s.start
    preempt = PreemptState(s.start, lambda step: save(s, step))
    watch = StepWatch(run_dir, rank.rank, recipe.resources.hang_dump_s)
    nonfinite = NonFiniteLoss(recipe.train.nonfinite_loss_steps, steps)
    for step in range(s.start, s.start if stopped else steps):
        watch.arm()
        if preempt.stop_here(run_dir, step, rank):
            break
        for kind in ("crash", "hang", "sleep_step"):
            fault_point(kind, step, run_dir, rank)
        done = step + 1
        record = step_record(s, step)
        preempt.saveable = nonfinite.observe(done, record["loss"])  # the same on every rank
        due = eval_due(s, done)
        if due:
            record |= evaluate_now(s)
        log_step(s, record, due or done % recipe.logging.every_steps == 0 or done == steps)
        verdict = None
        if due and stopping is not None:
            history, verdict = early_stop.observe(history, stopping, done, record)
        nonfinite.check(preempt.saved, ending=bool(verdict and verdict.stop))
        if preempt.saveable and (
            saves.due(done, rank) or (verdict and (verdict.improved or verdict.stop))
        ):
            preempt.timed_save(done)
        if verdict and verdict.improved and rank.rank == 0:
            ckpt.write_best(run_dir, done, stopping.metric, verdict.best_value)
        if verdict and verdict.stop:
            rank.log(early_stop.stop_message(done, stopping, verdict))
            break
    watch.close()
    return done, preempt


def log_step(s: Session, record: dict[str, Any], logged: bool) -> None:
    """Rank 0 writes a logged step's record."""
    if logged and s.sink:
        s.sink.write(record)


def save(s: Session, step: int) -> None:
    engine_state.save(
        s.trainee.engine, s.run_dir, step, s.rank, s.recipe.checkpoint,
        s.recipe.model_dump(mode="json"),
        before_commit=lambda: [
            fault_point(kind, step, s.run_dir, s.rank) for kind in ("save", "slow_save")
        ],
        store=store_for(s.recipe.output_dir),
    )


def eval_due(s: Session, done: int) -> bool:
    ev = s.recipe.eval
    return s.eval_ctx is not None and bool(
        (ev.every_steps and done % ev.every_steps == 0) or (done == s.inputs.steps and ev.at_end)
    )


def step_record(s: Session, step: int) -> dict[str, Any]:
    engine, plan, rank = s.trainee.engine, s.inputs.plan, s.rank
    done = step + 1
    lr = s.trainee.schedule.get_last_lr()[0]  # the rate this step's update uses
    record = {"step": done} | train_step(engine, s.objective, s.inputs.batches, plan, step, rank)
    record |= {
        "lr": lr,
        "grad_norm": _float(engine.get_global_grad_norm()),
        "peak_memory_gb": peak_memory_gb(rank.device),
        "epoch": done / max(plan.steps_per_epoch, 1),  # passes over the data completed
    }
    if s.peak:
        record["mfu"] = mfu(s.per_token, record["tokens_per_s"], rank.world, s.peak)
        record["mfu_basis"] = "lora" if s.recipe.uses_adapter else "full"
    return record


def train_step(
    engine: Any, objective: Objective, batches: Batches, plan: Any, step: int, rank: Rank
) -> dict[str, Any]:
    """One optimizer step over this rank's micro batches. Each micro batch's summed loss is
    divided by the real targets of the whole global batch (and scaled back up by the
    accumulation x world averaging DeepSpeed applies), so the objective does not depend on
    how the global batch is split. ``rank_step_s`` holds each rank's own work in the step:
    building its micro batches and their forward passes (host time), no collective waits
    (backward is left out, as gradient reductions overlap it): what tells a straggler from the
    ranks it holds up. It travels with the loss, in one gather at the end of the step."""
    began = time.perf_counter()
    timer = PhaseTimer(rank.device)
    slow_step(step, rank)
    indices = plan.micro_batches(step, rank.rank)
    micro = [batches.make(ix, rank.device) for ix in indices]
    counts = torch.tensor(
        [sum(objective.targets(b) for b in micro), sum(batches.tokens(ix) for ix in indices)],
        dtype=torch.float64, device=rank.device,
    )
    own = time.perf_counter() - began  # this rank's work so far, no waiting on the others
    targets, real_tokens = all_reduce(counts).tolist()
    timer.lap("data")
    scale = len(micro) * rank.world
    loss_total = torch.zeros((), dtype=torch.float64, device=rank.device)
    for batch in micro:
        forward = time.perf_counter()
        loss = nan_loss(objective.loss_sum(engine, batch), step, rank)
        own += time.perf_counter() - forward
        engine.backward(loss * scale / targets)
        timer.lap("fwd_bwd")
        engine.step()
        timer.lap("optim")
        loss_total += loss.detach().double()
    mine = torch.stack([loss_total, loss_total.new_tensor(own)])
    rows = gather_rows(mine, rank)  # [[loss sum, own seconds] of each rank]
    seconds = time.perf_counter() - began
    return {
        "loss": sum(row[0] for row in rows) / targets, "tokens": int(real_tokens),
        "tokens_per_s": real_tokens / seconds, "rank_step_s": [row[1] for row in rows],
        **timer.seconds(),
    }


def write_run_info(run_dir: Path, info: dict[str, Any], data: PreparedData, rank: Rank) -> None:
    RunDir(run_dir).run_info.write_text(
        json.dumps(info | {"data": {k: v.__dict__ for k, v in data.stats.items()}}, indent=1)
    )
    for name, stats in data.stats.items():
        rank.log(stats.summary(name))


def record_measured_peak(run_dir: Path, peak_gb: float) -> None:
    """run_info.json gains rank 0's measured peak beside the planner's prediction."""
    path = RunDir(run_dir).run_info
    info = json.loads(path.read_text())
    path.write_text(json.dumps(info | {"measured_peak_memory_gb": peak_gb}, indent=1))


def eval_history(
    run_dir: Path, stopping: EarlyStoppingSection | None, start: int, rank: Rank
) -> list[tuple[int, float]]:
    """The evaluations logged before ``start`` (a resumed run continues judging them)."""
    if stopping is None:
        return []
    records = read_metrics(RunDir(run_dir).metrics) if rank.rank == 0 else None
    return early_stop.history_from(gather(records, rank)[0], stopping.metric, start)


def _float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)
