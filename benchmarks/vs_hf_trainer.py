"""ftlaunch vs the trainers people pick instead, on the same job, in one command.

    python benchmarks/vs_hf_trainer.py --mode cpu            # some minutes on 2 CPU cores
    python benchmarks/vs_hf_trainer.py --mode cpu --quick    # a smoke test (seconds of training)
    python benchmarks/vs_hf_trainer.py --mode gpu            # Llama-3.2-1B full, Llama-3-8B LoRA

The peers (benchmarks/hf_peer.py): the Hugging Face Trainer with ``group_by_length`` sampling,
TRL's SFTTrainer with ``bfd`` packing (padding-free) and with padding-free batches of unpacked
examples, and, as a labelled reference only, the untuned Trainer (random batches padded to
their longest). Every system trains the same model shape (randomly initialised from the same
seed), on the same synthetic instruction data (a long-tailed and a fixed-length set, written
here), at the same sequence length, for the same number of steps with the same constant
learning rate, the same DeepSpeed ZeRO-2 dict config and the same attention kernel, on the same
number of processes. The peers run under torchrun; ftlaunch under its default embedded Ray
(``--backend torchrun`` to compare without Ray). A step holds about the same number of real
tokens everywhere: ftlaunch's packed rows (or length groups of that many rows' tokens) per
micro batch are sized from the data's mean length to hold about as many tokens as the job's
``micro_batch_size`` examples, TRL bfd takes the same rows, and the unpacked peers take as many
examples per micro batch as hold the real tokens ftlaunch's units hold on average (its
layout's fill, computed from the training lengths with ftlaunch's own grouping).

Throughput counts real (non-padding) tokens on every rank, over the steps after the first
tenth (warm-up excluded): ``tokens/s`` is the median over steps of the step's tokens over its
wall time, which other processes on a shared machine disturb far less than the mean
(``mean tok/s``: all tokens over all time, also printed). Each system runs ``--repeats`` times
(CPU: 2), the order rotating between rounds so that load from other processes falls on all;
every run is printed and each system's fastest run goes into the table. ``first step s`` is
the time from launching the command to the end of its first step, ``after s`` from the end of
the last step to the command's exit (it includes the held-out evaluation). Peak memory is
rank 0's (GPU: max allocated; CPU: max resident set). The final loss of each system is its
token-weighted loss on the same held-out examples. The last line printed is ``ratio
long_tailed=<x> fixed=<y>``: ftlaunch tokens/s over the strongest peer's (the reference
included), named on the lines above it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.synthetic_sft import (
    PROMPT_TEMPLATE,
    LengthSpec,
    build_tokenizer,
    write_dataset,
)

DATASETS = ("long_tailed", "fixed")


@dataclass(frozen=True)
class Job:
    """One training job, run by both systems on both datasets."""

    name: str
    architecture: dict[str, Any]
    seq_len: int
    median_len: int
    micro_batch_size: int  # Trainer examples per rank per micro step; ftlaunch's rows follow
    grad_accum: int
    steps: int
    lr: float
    dtype: str = "fp32"
    method: str = "full"
    lora: dict[str, Any] | None = None
    gradient_checkpointing: bool = False
    use_gpu: bool = False
    workers: int = 2
    seed: int = 7

    @property
    def vocab_size(self) -> int:
        return self.architecture["vocab_size"]

    def train_examples(self) -> int:
        """Enough for every step of both systems without a second epoch."""
        return math.ceil(1.5 * self.steps * self.micro_batch_size * self.grad_accum * self.workers)


def llama(
    hidden: int,
    layers: int,
    heads: int,
    kv: int,
    mlp: int,
    vocab: int,
    positions: int,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": mlp,
        "vocab_size": vocab,
        "max_position_embeddings": positions,
        **extra,
    }


CPU_JOB = Job(
    name="llama-4L-192",
    architecture=llama(192, 4, 4, 4, 512, 2048, 256),
    seq_len=256,
    median_len=48,
    micro_batch_size=8,
    grad_accum=1,
    steps=16,
    lr=1e-3,
)
QUICK_JOB = replace(
    CPU_JOB,
    name="llama-2L-64",
    architecture=llama(64, 2, 4, 4, 128, 512, 128),
    seq_len=128,
    median_len=24,
    micro_batch_size=4,
    steps=4,
    workers=1,
)
GPU_JOBS = (
    Job(
        name="llama-3.2-1b-full",
        architecture=llama(
            2048,
            16,
            32,
            8,
            8192,
            128256,
            131072,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            head_dim=64,
        ),
        seq_len=2048,
        median_len=300,
        micro_batch_size=8,
        grad_accum=4,
        steps=60,
        lr=2e-4,
        dtype="bf16",
        gradient_checkpointing=True,
        use_gpu=True,
        workers=1,
    ),
    Job(
        name="llama-3-8b-lora",
        architecture=llama(4096, 32, 32, 8, 14336, 128256, 8192, rope_theta=500000.0),
        seq_len=4096,
        median_len=300,
        micro_batch_size=4,
        grad_accum=8,
        steps=30,
        lr=2e-4,
        dtype="bf16",
        method="lora",
        gradient_checkpointing=True,
        use_gpu=True,
        workers=1,
        lora={"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    ),
)


PEERS = ("hf_grouped", "trl_bfd", "trl_padding_free", "hf_random")
LABELS = {
    "ftlaunch": "ftlaunch",
    "hf_grouped": "HF Trainer, group_by_length",
    "trl_bfd": "TRL SFTTrainer, packing bfd",
    "trl_padding_free": "TRL SFTTrainer, padding_free",
    "hf_random": "HF Trainer, untuned (reference)",
}


@dataclass(frozen=True)
class Result:
    system: str
    dataset: str
    tokens_per_s: float  # median over steps
    mean_tokens_per_s: float
    tokens_per_step: float
    peak_memory_gb: float
    eval_loss: float
    train_loss: float
    first_step_s: float  # command launched -> end of the first step
    after_s: float  # end of the last step -> command exited
    step_fit: tuple[float, float] | None  # (a, b): a step of n real tokens takes a + b * n s
    step_range: tuple[float, float]  # fewest and most real tokens in a step

    def tokens_per_s_at(self, tokens: float) -> float:
        """Real tokens/s of a step of ``tokens`` real tokens: from the fitted step time where
        the run's own steps span that size, else its mean rate (no extrapolation)."""
        low, high = self.step_range
        if self.step_fit is None or not low <= tokens <= high:
            return self.mean_tokens_per_s
        a, b = self.step_fit
        return tokens / (a + b * tokens)


def fit_step_time(tokens: list[float], seconds: list[float]) -> tuple[float, float] | None:
    """Least-squares line of step time on real tokens per step, for a run whose steps span
    sizes at least 1.5x apart (a Trainer's length-grouped batches range over 10x), so runs are
    compared at one step size; None for steps of about one size (the slope would be noise)."""
    if min(tokens) * 1.5 > max(tokens):
        return None
    b, a = np.polyfit(np.asarray(tokens, float), np.asarray(seconds, float), 1)
    return float(a), float(b)


@dataclass(frozen=True)
class Timeline:
    launched: float
    exited: float
    seen: dict[int, float]  # step -> when its metrics record appeared (ftlaunch)


# ---------------------------------------------------------------- running the systems


def run(command: list[str], log: Path, env: dict[str, str], follow: Path | None = None) -> Timeline:
    """Run ``command``; when ``follow`` is a metrics.jsonl, note when each step's record
    appears in it (polled every 20 ms)."""
    seen: dict[int, float] = {}
    launched = time.time()
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if follow is not None and follow.exists():
                now = time.time()
                for line in follow.read_text().splitlines():
                    if line.endswith("}") and '"tokens"' in line:
                        seen.setdefault(json.loads(line)["step"], now)
            time.sleep(0.02)
    exited = time.time()
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise SystemExit(f"{command[:4]}... failed with exit code {proc.returncode}; log {log}:\n{tail}")
    return Timeline(launched, exited, seen)


def warm(steps: int) -> int:
    """Steps left out of throughput as warm-up: the first tenth, at least one."""
    return max(1, steps // 10)


def packed_batch(job: Job, mean_len: float) -> tuple[int, int]:
    """Packed rows per micro step and micro steps per optimizer step such that a step holds
    about as many real tokens as the unpacked systems' examples per step."""
    step_tokens = job.micro_batch_size * job.grad_accum * mean_len
    rows = max(1, round(job.micro_batch_size * mean_len / job.seq_len))
    return rows, max(1, round(step_tokens / (rows * job.seq_len)))


def peer_examples(job: Job, lengths: np.ndarray, packed: tuple[int, int]) -> int:
    """Examples per micro batch that give the unpacked peers the real tokens per step that
    ftlaunch's units hold on average: packed rows on flash-attn, length groups otherwise
    (a group holds less than its token budget: examples are padded to its longest)."""
    from launcher.data.batch import packing_layout, training_units
    from launcher.model.build import resolve_attention

    rows, accum = packed
    layout = packing_layout("auto", resolve_attention("auto", job.use_gpu))
    units, per_micro = training_units(lengths, job.seq_len, rows, layout)
    unit_tokens = float(np.mean([lengths[units.row(r)].sum() for r in range(len(units))]))
    step_tokens = unit_tokens * per_micro * accum
    return max(1, round(step_tokens / (job.grad_accum * float(lengths.mean()))))


def ftlaunch_recipe(
    job: Job, dataset: str, data: dict[str, Path], batch: tuple[int, int], work: Path
) -> dict[str, Any]:
    recipe = {
        "output_dir": str(work / f"ftlaunch_{dataset}"),
        "method": job.method,
        "model": {
            "architecture": job.architecture,
            "tokenizer": str(data["tokenizer"]),
            "dtype": job.dtype,
            "gradient_checkpointing": job.gradient_checkpointing,
        },
        "data": {
            "train": str(data["train"]),
            "validation": str(data["validation"]),
            "format": "instruction",
            "prompt_template": PROMPT_TEMPLATE,
            "max_length": job.seq_len,
            "packing": True,
            "cache_dir": str(data["cache"]),
        },
        "train": {
            "max_steps": job.steps,
            "micro_batch_size": batch[0],
            "grad_accum": batch[1],
            "lr": job.lr,
            "lr_schedule": "constant",
            "weight_decay": 0.0,
            "seed": job.seed,
        },
        "deepspeed": {"config": "zero2"},
        "resources": {"num_workers": job.workers, "use_gpu": job.use_gpu},
        "eval": {"at_end": True},
        "logging": {"progress": False},
    }
    if job.lora:
        recipe["lora"] = {
            "r": job.lora["r"],
            "alpha": job.lora["lora_alpha"],
            "target_modules": job.lora["target_modules"],
        }
    return recipe


def run_ftlaunch(
    job: Job, dataset: str, data: dict[str, Path], batch: tuple[int, int], work: Path,
    env: dict[str, str], backend: str,
) -> tuple[Result, dict[str, Any], str]:
    recipe_path = work / f"ftlaunch_{dataset}.yaml"
    recipe_path.write_text(yaml.safe_dump(ftlaunch_recipe(job, dataset, data, batch, work)))
    run_dir = work / f"ftlaunch_{dataset}"
    timeline = run(
        [sys.executable, "-m", "launcher.cli", str(recipe_path), "--backend", backend],
        work / f"ftlaunch_{dataset}.log",
        env,
        follow=run_dir / "metrics.jsonl",
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens" in r][warm(job.steps) :]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in steps)
    tokens = sum(r["tokens"] for r in steps)
    last = timeline.seen.get(job.steps, timeline.exited)
    step_tokens = [r["tokens"] for r in steps]
    fit = fit_step_time(step_tokens, [r["tokens"] / r["tokens_per_s"] for r in steps])
    result = Result(
        "ftlaunch",
        dataset,
        statistics.median(r["tokens_per_s"] for r in steps),
        tokens / seconds,
        tokens / len(steps),
        steps[-1]["peak_memory_gb"],
        records[-1]["eval_loss"],
        sum(r["loss"] for r in steps[-5:]) / len(steps[-5:]),
        timeline.seen.get(1, math.nan) - timeline.launched,
        timeline.exited - last,
        fit,
        (min(step_tokens), max(step_tokens)),
    )
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    attention = json.loads((run_dir / "run_info.json").read_text())["attention"]
    return result, ds_config, attention


def peer_spec(
    job: Job, peer: str, data: dict[str, Path], packed: tuple[int, int], examples: int,
    ds_config: dict[str, Any], attention: str, out: Path,
) -> dict[str, Any]:
    batch_keys = (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
    )
    micro, accum = packed if peer == "trl_bfd" else (examples, job.grad_accum)
    return {
        "peer": peer,
        "out_dir": str(out),
        "use_gpu": job.use_gpu,
        "tokenizer": str(data["tokenizer"]),
        "train": str(data["train"]),
        "validation": str(data["validation"]),
        "prompt_template": PROMPT_TEMPLATE,
        "seed": job.seed,
        "architecture": job.architecture,
        "dtype": job.dtype,
        "attention": attention,
        "lora": job.lora,
        "seq_len": job.seq_len,
        "micro_batch_size": micro,
        "grad_accum": accum,
        "steps": job.steps,
        "lr": job.lr,
        "gradient_checkpointing": job.gradient_checkpointing,
        "ds_config": ds_config | dict.fromkeys(batch_keys, "auto"),
    }


def run_peer(
    job: Job, peer: str, dataset: str, spec: dict[str, Any], work: Path, env: dict[str, str]
) -> Result:
    out = Path(spec["out_dir"])
    out.mkdir(exist_ok=True)
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    timeline = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={job.workers}",
            str(ROOT / "benchmarks" / "hf_peer.py"),
            str(spec_path),
        ],
        work / f"{peer}_{dataset}.log",
        env,
    )
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(job.workers)]
    first = warm(job.steps)
    ends = ranks[0]["step_ends"]  # [train begin, end of step 1, ..., end of step N]
    per_step = [sum(r["tokens_per_step"][i] for r in ranks) for i in range(first, job.steps)]
    rates = [n / (ends[i + 1] - ends[i]) for i, n in zip(range(first, job.steps), per_step)]
    losses = ranks[0]["losses"][-5:]
    return Result(
        peer,
        dataset,
        statistics.median(rates),
        sum(per_step) / (ends[-1] - ends[first]),
        sum(per_step) / len(per_step),
        ranks[0]["peak_memory_gb"],
        ranks[0]["eval_loss"],
        sum(losses) / len(losses),
        ends[1] - timeline.launched,
        timeline.exited - ends[-1],
        fit_step_time(per_step, [ends[i + 1] - ends[i] for i in range(first, job.steps)]),
        (min(per_step), max(per_step)),
    )


# ---------------------------------------------------------------- reporting


def mfu_of(job: Job, tokens_per_s: float, peak_flops: float | None) -> float | None:
    """MFU from the model's shape (LoRA adapters' own FLOPs, well under 1%, left out)."""
    if peak_flops is None:
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.model.flops import flops_per_token, mfu, model_shape

    arch = dict(job.architecture)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(arch.pop("model_type"), **arch)
        )
    per_token = flops_per_token(model_shape(model), job.seq_len, lora=job.method == "lora")
    return mfu(per_token, tokens_per_s, job.workers, peak_flops)


def peak_flops(job: Job, peak_tflops: float | None) -> float | None:
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if not job.use_gpu:
        return None
    import torch

    from launcher.model.flops import table_peak_flops

    return table_peak_flops(torch.cuda.get_device_name())


def report(
    job: Job, results: list[Result], peak: float | None, datasets: list[str]
) -> dict[str, float]:
    print(
        f"\n# {job.name}: seq {job.seq_len}, {job.steps} steps, {job.workers} processes, "
        f"{job.dtype}, {job.method}"
    )
    print(
        f"{'system':<16} {'dataset':<12} {'tokens/s':>10} {'mean tok/s':>10} {'tokens/step':>11} "
        f"{'peak_mem_GB':>11} {'eval_loss':>9} {'train_loss':>10} {'first_step_s':>12} "
        f"{'after_s':>7} {'MFU':>6}"
    )
    for r in results:
        m = mfu_of(job, r.tokens_per_s, peak)
        print(
            f"{r.system:<16} {r.dataset:<12} {r.tokens_per_s:>10,.0f} {r.mean_tokens_per_s:>10,.0f} "
            f"{r.tokens_per_step:>11,.0f} {r.peak_memory_gb:>11.2f} {r.eval_loss:>9.4f} "
            f"{r.train_loss:>10.4f} {r.first_step_s:>12.1f} {r.after_s:>7.1f} "
            f"{'-' if m is None else f'{100 * m:.1f}%':>6}"
        )
    ratios = {}
    for dataset in datasets:
        ours = next(r for r in results if r.system == "ftlaunch" and r.dataset == dataset)
        peers = [r for r in results if r.system != "ftlaunch" and r.dataset == dataset]
        strongest = max(peers, key=lambda r: r.tokens_per_s)
        ratios[dataset] = ours.tokens_per_s / strongest.tokens_per_s
        for r in sorted(peers, key=lambda r: -r.tokens_per_s):
            print(
                f"{dataset}: vs {r.system} ({LABELS[r.system]}): tokens/s "
                f"x{ours.tokens_per_s / r.tokens_per_s:.2f} (mean tok/s "
                f"x{ours.mean_tokens_per_s / r.mean_tokens_per_s:.2f}), peak memory "
                f"x{ours.peak_memory_gb / r.peak_memory_gb:.2f}, eval loss "
                f"{ours.eval_loss:.4f} vs {r.eval_loss:.4f}"
            )
        print(f"{dataset}: strongest peer {strongest.system}")
        size = ours.tokens_per_step
        at = {r.system: r.tokens_per_s_at(size) for r in (ours, *peers)}
        best_at = max(peers, key=lambda r: at[r.system])
        rates = ", ".join(f"{k} {v:,.0f}" for k, v in at.items())
        print(
            f"{dataset}: at {size:,.0f} real tokens per step (step time fitted on step tokens "
            f"where a run's steps span that size, else its mean tok/s): {rates}; "
            f"x{at['ftlaunch'] / at[best_at.system]:.2f} vs {best_at.system}"
        )
    return ratios


# ---------------------------------------------------------------- main


def best(results: list[Result]) -> Result:
    """The least disturbed of repeated runs: the one with the highest throughput."""
    return max(results, key=lambda r: r.tokens_per_s)


def run_round(
    job: Job, dataset: str, data: dict[str, Path], packed: tuple[int, int], examples: int,
    out: Path, env: dict[str, str], backend: str, order: list[str], setup: tuple[dict, str] | None,
) -> tuple[list[Result], tuple[dict, str] | None]:
    """Every system once, in ``order``. The peers take ftlaunch's DeepSpeed config and
    attention kernel (``setup``, from an earlier round, or from this round's ftlaunch run)."""
    results = []
    for system in order:
        if system == "ftlaunch":
            ours, ds_config, attention = run_ftlaunch(job, dataset, data, packed, out, env, backend)
            results.append(ours)
            setup = (ds_config, attention)
        else:
            assert setup is not None
            spec = peer_spec(
                job, system, data, packed, examples, *setup, out / f"{system}_{dataset}"
            )
            results.append(run_peer(job, system, dataset, spec, out, env))
    return results, setup


def run_job(
    job: Job, work: Path, repeats: int, peak_tflops: float | None, backend: str,
    datasets: list[str], peers: tuple[str, ...] = PEERS,
) -> dict[str, float]:
    """Every system on both datasets, ``repeats`` rounds; ftlaunch opens round 0 and the peers'
    order turns round by round (round 1 runs them in reverse, ftlaunch last), so that load from
    other processes falls on all; each system's best run is reported."""
    shutil.rmtree(work, ignore_errors=True)  # a leftover run directory would only be resumed
    work.mkdir(parents=True)
    env = os.environ | {
        "FTLAUNCH_CACHE": str(work / "cache"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    inputs = {
        "tokenizer": build_tokenizer(job.vocab_size, work / "tokenizer"),
        "cache": work / "cache",
    }
    results = []
    for dataset in datasets:
        spec = LengthSpec(dataset, job.seq_len, job.median_len)
        train, validation, lengths = write_dataset(
            spec, job.train_examples(), 64, job.vocab_size, job.seed, work
        )
        data = inputs | {"train": train, "validation": validation}
        packed = packed_batch(job, float(lengths.mean()))
        examples = peer_examples(job, lengths, packed)
        print(
            f"# {dataset}: ftlaunch {packed[0]} row(s) x {packed[1]} micro step(s), TRL bfd the "
            f"same, the unpacked peers {examples} examples x {job.grad_accum} (real tokens per "
            "step matched)"
        )
        runs: dict[str, list[Result]] = {s: [] for s in ("ftlaunch", *peers)}
        setup = None
        for repeat in range(repeats):
            out = work / f"round{repeat}"
            out.mkdir(exist_ok=True)
            order = [*reversed(peers), "ftlaunch"] if repeat % 2 else ["ftlaunch", *peers]
            done, setup = run_round(
                job, dataset, data, packed, examples, out, env, backend, order, setup
            )
            for r in done:
                runs[r.system].append(r)
        for system, rs in runs.items():
            rates = ", ".join(f"{r.tokens_per_s:,.0f}" for r in rs)
            firsts = ", ".join(f"{r.first_step_s:.1f}" for r in rs)
            print(f"# {system} {dataset}: tokens/s per run {rates}; first step s {firsts}")
            results.append(best(rs))
    return report(job, results, peak_flops(job, peak_tflops), datasets)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("cpu", "gpu"), required=True)
    parser.add_argument("--quick", action="store_true", help="tiny model and a few steps (CPU)")
    parser.add_argument("--steps", type=int, help="override the number of optimizer steps")
    parser.add_argument(
        "--repeats", type=int, help="rounds per dataset, best run reported (CPU: 2, else 1)"
    )
    parser.add_argument(
        "--backend", choices=("ray", "torchrun"), default="ray", help="ftlaunch's backend"
    )
    parser.add_argument(
        "--datasets", nargs="+", choices=DATASETS, default=list(DATASETS), help="default: both"
    )
    parser.add_argument(
        "--peers", nargs="+", choices=PEERS, default=list(PEERS), help="default: all four"
    )
    parser.add_argument("--jobs", nargs="*", help="GPU mode: job names to run (default: all)")
    parser.add_argument(
        "--peak-tflops", type=float, help="device peak for MFU (default: GPU table)"
    )
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench")
    args = parser.parse_args(argv)
    if args.mode == "cpu":
        jobs = [QUICK_JOB if args.quick else CPU_JOB]
    else:
        import torch

        jobs = [
            replace(j, workers=torch.cuda.device_count())
            for j in GPU_JOBS
            if not args.jobs or j.name in args.jobs
        ]
    if args.steps:
        jobs = [replace(j, steps=args.steps) for j in jobs]
    started = time.time()
    print(f"# ftlaunch vs its peers, mode {args.mode}, workdir {args.workdir}")
    print(f"# load at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    repeats = args.repeats or (2 if args.mode == "cpu" and not args.quick else 1)
    ratios = [
        run_job(job, args.workdir / job.name, repeats, args.peak_tflops, args.backend,
                args.datasets, tuple(args.peers))
        for job in jobs
    ]
    print(f"# load at end: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    print(f"\n# wall time {time.time() - started:.0f} s; ratio line: {jobs[0].name}")
    print("ratio " + " ".join(f"{d}={r:.2f}" for d, r in ratios[0].items()))


if __name__ == "__main__":
    main()
