"""A bare, hand-written Ray Train + DeepSpeed fine-tuning script: the yardstick for ftlaunch's
start-up and wind-down on embedded Ray (benchmarks/startup.py runs both).

    python benchmarks/bare_ray_deepspeed.py SPEC.json

What a user writes without ftlaunch: ``ray.init()`` on this machine, a TorchTrainer whose
workers read and tokenize the JSON Lines data, build the model from its config, wrap it with
``deepspeed.initialize`` and run ``steps`` optimizer steps over right-padded batches of
``micro_batch_size`` examples (no packing, no evaluation, no checkpoint, no export). Rank 0
appends ``{"step": n, "time": unix time}`` to SPEC's ``out_dir``/steps.jsonl after every step.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def train_loop(spec: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    rows = [json.loads(line) for line in Path(spec["train"]).read_text().splitlines()]
    examples = []
    for row in rows:
        prompt = tokenizer(spec["prompt_template"].format(instruction=row["instruction"]))
        answer = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        ids = prompt["input_ids"] + answer + [tokenizer.eos_token_id]
        examples.append((ids, [-100] * len(prompt["input_ids"]) + ids[len(prompt["input_ids"]):]))
    arch = dict(spec["architecture"])
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(arch.pop("model_type"), **arch), attn_implementation="sdpa"
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=spec["ds_config"])
    micro = spec["micro_batch_size"]
    log = Path(spec["out_dir"]) / "steps.jsonl"
    for step in range(spec["steps"]):
        at = (step * world + rank) * micro
        chunk = [examples[i % len(examples)] for i in range(at, at + micro)]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((micro, width), tokenizer.pad_token_id)
        labels = torch.full((micro, width), -100)
        mask = torch.zeros((micro, width), dtype=torch.long)
        for j, (x, y) in enumerate(chunk):
            ids[j, : len(x)], labels[j, : len(y)], mask[j, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        loss = engine(input_ids=ids, attention_mask=mask, labels=labels).loss
        engine.backward(loss)
        engine.step()
        if rank == 0:
            with log.open("a") as out:
                out.write(json.dumps({"step": step + 1, "time": time.time(), "loss": loss.item()}) + "\n")


def main(spec_path: str) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    spec = json.loads(Path(spec_path).read_text())
    ray.init()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=spec,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=spec["workers"], use_gpu=False),
        run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="bare-ray-")),
    )
    trainer.fit()
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
