"""Start-up and wind-down: ftlaunch on embedded Ray, ftlaunch on torchrun, and a bare
hand-written Ray Train + DeepSpeed script (benchmarks/bare_ray_deepspeed.py), same job.

    python benchmarks/startup.py                 # 3 rounds, alternating, on this machine
    python benchmarks/startup.py --rounds 1

The job is vs_hf_trainer.py's CPU job (4-layer Llama, hidden 192) on its long-tailed data,
``--steps`` optimizer steps on 2 CPU workers, ZeRO-2, no evaluation. ``first step s``: from
launching the command to the end of the first optimizer step (as seen in the file rank 0
appends to after each step); ``after s``: from the end of the last step to the command's exit
(ftlaunch's includes exporting and verifying final/). The systems alternate round by round and
every run is printed, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.synthetic_sft import PROMPT_TEMPLATE, LengthSpec, build_tokenizer, write_dataset
from benchmarks.vs_hf_trainer import CPU_JOB, ftlaunch_recipe, packed_batch, run

SYSTEMS = ("ftlaunch_ray", "bare_ray", "ftlaunch_torchrun")


def timings(steps_file: Path, timeline, steps: int) -> tuple[float, float]:
    """(launch -> end of step 1, end of the last step -> exit)."""
    if timeline.seen:  # ftlaunch: when each step's metrics record appeared
        return timeline.seen[1] - timeline.launched, timeline.exited - timeline.seen[steps]
    records = [json.loads(line) for line in steps_file.read_text().splitlines()]
    ends = {r["step"]: r["time"] for r in records}
    return ends[1] - timeline.launched, timeline.exited - ends[steps]


def run_system(system: str, job, data: dict[str, Path], batch, out: Path, env) -> tuple[float, float]:
    out.mkdir(parents=True)
    if system == "bare_ray":
        ds_config = {  # what a user writes by hand: ZeRO-2, fp32, clipping at 1
            "train_micro_batch_size_per_gpu": job.micro_batch_size,
            "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
        }
        spec = {
            "out_dir": str(out), "tokenizer": str(data["tokenizer"]), "train": str(data["train"]),
            "prompt_template": PROMPT_TEMPLATE, "architecture": job.architecture, "seed": job.seed,
            "lr": job.lr, "micro_batch_size": job.micro_batch_size, "steps": job.steps,
            "workers": job.workers, "ds_config": ds_config,
        }
        (out / "spec.json").write_text(json.dumps(spec))
        command = [sys.executable, str(ROOT / "benchmarks" / "bare_ray_deepspeed.py"),
                   str(out / "spec.json")]
        timeline = run(command, out / "log.txt", env)
        return timings(out / "steps.jsonl", timeline, job.steps)
    recipe = ftlaunch_recipe(job, "long_tailed", data, batch, out)
    recipe["data"].pop("validation")
    recipe["eval"] = {"at_end": False}
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    backend = "ray" if system == "ftlaunch_ray" else "torchrun"
    run_dir = Path(recipe["output_dir"])
    command = [sys.executable, "-m", "launcher.cli", str(out / "recipe.yaml"), "--backend", backend]
    timeline = run(command, out / "log.txt", env, follow=run_dir / "metrics.jsonl")
    return timings(run_dir / "metrics.jsonl", timeline, job.steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "startup")
    args = parser.parse_args(argv)
    job = replace(CPU_JOB, steps=args.steps)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    env = os.environ | {"FTLAUNCH_CACHE": str(args.workdir / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    train, validation, lengths = write_dataset(
        LengthSpec("long_tailed", job.seq_len, job.median_len), job.train_examples(), 64,
        job.vocab_size, job.seed, args.workdir,
    )
    data = {"tokenizer": build_tokenizer(job.vocab_size, args.workdir / "tokenizer"),
            "train": train, "validation": validation, "cache": args.workdir / "cache"}
    batch = packed_batch(job, float(lengths.mean()))
    results: dict[str, list[tuple[float, float]]] = {s: [] for s in args.systems}
    for round_ in range(args.rounds):
        order = args.systems if round_ % 2 == 0 else list(reversed(args.systems))
        for system in order:
            load = os.getloadavg()[0]
            first, after = run_system(system, job, data, batch, args.workdir / f"r{round_}_{system}", env)
            results[system].append((first, after))
            print(f"round {round_} {system:<18} first step s {first:6.1f}  after s {after:5.1f}  "
                  f"load {load:.1f}", flush=True)
    print(f"\n{'system':<18} {'first step s (median)':>22} {'after s (median)':>17}")
    for system, rs in results.items():
        print(f"{system:<18} {statistics.median(r[0] for r in rs):>22.1f} "
              f"{statistics.median(r[1] for r in rs):>17.1f}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()}")


if __name__ == "__main__":
    main()
