"""How close is ``ftlaunch plan``'s activation estimate to the memory a forward and backward
pass really takes? CPU, tiny Llama models built the way training builds them.

Each configuration runs in a fresh process with glibc's mmap threshold pinned at 64 KiB, so
every large tensor is its own mapping and the resident set follows live memory. The process
builds the model, runs one small warm-up step (so gradients exist), and then a thread samples
/proc/self/statm every millisecond while one forward and backward pass of the configured micro
batch runs through the project's loss (launcher.model.losses.model_loss_sum). Measured: the peak
resident set during that pass minus the resident set just before it. Predicted: the planner's
activations for the same recipe (launcher.plan.estimate.activation_spec, memory.activations).

    python benchmarks/plan_accuracy.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCH = {
    "model_type": "llama", "vocab_size": 8000, "hidden_size": 256, "intermediate_size": 688,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}
CASES = {
    "fp32 chunked": {},
    "fp32 plain": {"model": {"loss": "plain"}},
    "fp32 chunked ckpt": {"model": {"gradient_checkpointing": True}},
    "fp32 chunked ckpt/2": {"model": {"gradient_checkpointing": True, "checkpoint_every": 2}},
    "bf16 chunked": {"model": {"dtype": "bf16"}},
    "bf16 plain ckpt": {
        "model": {"dtype": "bf16", "loss": "plain", "gradient_checkpointing": True}
    },
    "fp32 eager": {"model": {"attention": "eager"}},
    "fp32 lora": {"method": "lora", "lora": {"r": 8, "target_modules": "all-linear"}},
}
MICRO, SEQ = 4, 512


def recipe_for(changes: dict) -> object:
    from launcher.recipe.ds_config import deep_merge
    from launcher.recipe import validate_recipe

    base = {
        "output_dir": "/tmp/plan-accuracy", "method": "full",
        "model": {"architecture": ARCH, "tokenizer": str(ROOT / "recipes/data/tokenizer"),
                  "dtype": "fp32", "attention": "sdpa", "loss_chunk_size": 1024},
        "data": {"train": str(ROOT / "recipes/data/digits_train.jsonl"),
                 "format": "instruction", "max_length": SEQ},
        "train": {"micro_batch_size": MICRO, "max_steps": 1},
        "resources": {"num_workers": 1, "use_gpu": False},
    }
    return validate_recipe(deep_merge(base, changes))


def predicted(recipe) -> int:
    from launcher.plan.estimate import activation_spec, kernels_for, loss_for
    from launcher.plan.memory import activations
    from launcher.plan.model import model_facts

    facts = model_facts(recipe)
    kernels = kernels_for(recipe, facts.model_type)
    spec = activation_spec(recipe, facts, kernels, loss_for(recipe, kernels, 2))
    return activations(facts.shape, spec)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = rss(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)


def build(recipe):
    import torch

    from launcher.model.adapters import apply_adapter
    from launcher.model.build import build_model, enable_gradient_checkpointing
    from launcher.model.build import load_model_config

    torch.manual_seed(0)
    model = build_model(recipe.model, load_model_config(recipe.model), "sdpa"
                        if recipe.model.attention == "sdpa" else recipe.model.attention)
    if recipe.model.gradient_checkpointing:
        enable_gradient_checkpointing(model, recipe.model.checkpoint_every)
    if recipe.uses_adapter:
        model = apply_adapter(model, recipe)
    return model.train()


def measure(name: str) -> dict:
    """In this (fresh) process: the measured and predicted bytes of one configuration."""
    import torch

    from launcher.model.losses import LossConfig, model_loss_sum

    recipe = recipe_for(CASES[name])
    model = build(recipe)
    loss = LossConfig(recipe.model.loss if recipe.model.loss != "auto" else "chunked",
                      recipe.model.loss_chunk_size)

    def step(seq: int) -> None:
        ids = torch.randint(0, ARCH["vocab_size"], (MICRO, seq))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        model_loss_sum(model, batch, loss).backward()

    step(8)  # gradients now exist; what follows is activations and transients
    before = rss()
    sampler = PeakSampler()
    sampler.start()
    step(SEQ)
    sampler.running = False
    sampler.join()
    return {"case": name, "measured": sampler.peak - before, "predicted": predicted(recipe)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case)))
        return
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    results = []
    print(f"micro batch {MICRO} x {SEQ} tokens, {ARCH}")
    print(f"{'case':22} {'predicted MiB':>14} {'measured MiB':>13} {'error':>7}")
    for name in CASES:
        out = subprocess.run([sys.executable, __file__, "--case", name], env=env, check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        r["error"] = (r["predicted"] - r["measured"]) / r["measured"]
        results.append(r)
        print(f"{name:22} {r['predicted'] / 2**20:14.1f} {r['measured'] / 2**20:13.1f} "
              f"{r['error']:+7.1%}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
