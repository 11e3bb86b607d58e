"""The peers of the benchmark: what a user would run instead of ftlaunch, each in its ordinary
best configuration, on the same DeepSpeed ZeRO dict config as ftlaunch (batch sizes "auto").

``PEER`` (the spec's ``peer``):

- ``hf_grouped``: the Hugging Face Trainer with ``train_sampling_strategy="group_by_length"``
  (transformers 5's name for the former ``group_by_length=True``): examples of similar length
  share a batch, padded per batch by DataCollatorForSeq2Seq.
- ``trl_bfd``: TRL's SFTTrainer with ``packing=True`` and its default ``packing_strategy="bfd"``
  (best-fit decreasing), which TRL runs padding-free: each micro batch of packed rows becomes
  one row with positions restarting per example.
- ``trl_padding_free``: SFTTrainer with ``padding_free=True`` and no packing: each micro batch
  of examples becomes one row.
- ``hf_random``: the untuned Trainer (random batches padded to their longest), kept as a
  labelled reference only.

Every peer gets the same pre-tokenized examples (prompt masked, response plus end-of-sequence
trained) that ftlaunch tokenizes itself. Run by vs_hf_trainer.py as ``torchrun
--nproc_per_node N benchmarks/hf_peer.py SPEC.json``; writes OUT_DIR/rank<r>.json with
per-step real-token counts, step end times (``time.time()``, rank 0), peak memory at the last
step, training losses and a token-weighted validation loss.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


def encode(rows: list[dict[str, str]], tokenizer: Any, template: str) -> list[dict[str, list[int]]]:
    """Prompt tokens masked from the loss, response plus end-of-sequence trained."""
    out = []
    for row in rows:
        prompt = tokenizer(template.format(instruction=row["instruction"]))["input_ids"]
        answer = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        ids = prompt + answer + [tokenizer.eos_token_id]
        out.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": [-100] * len(prompt) + answer + [tokenizer.eos_token_id],
            }
        )
    return out


def read_jsonl(path: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class CountingCollator:
    """A peer's collator that also records each batch's real (non-padding) tokens: the
    attention mask's ones, or every token of a padding-free row (which has no mask)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.tokens: list[int] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        self.tokens.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        return batch


def peak_memory_gb(on_gpu: bool) -> float:
    if on_gpu:
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def make_clock(on_gpu: bool) -> Any:
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall time at the end of every optimizer step, and peak memory at the last one."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.losses: list[float] = []
            self.peak_memory_gb = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.ends.append(time.time())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if on_gpu:
                torch.cuda.synchronize()
            self.ends.append(time.time())
            self.peak_memory_gb = peak_memory_gb(on_gpu)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepClock()


@torch.no_grad()
def validation_loss(model: torch.nn.Module, rows: list[dict[str, list[int]]], pad_id: int) -> float:
    """Summed cross-entropy over every target token, divided by their number."""
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), 8):
        chunk = rows[i : i + 8]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, r in enumerate(chunk):
            n = len(r["input_ids"])
            ids[j, :n], labels[j, :n], mask[j, :n] = (
                torch.tensor(r["input_ids"]),
                torch.tensor(r["labels"]),
                1,
            )
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        targets = labels[:, 1:].to(device)
        total += F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum"
        ).item()
        count += int((targets != -100).sum())
    return total / max(count, 1)


def common_args(spec: dict[str, Any], on_gpu: bool) -> dict[str, Any]:
    """TrainingArguments shared by every peer: the job's batch, steps, schedule and precision
    (set explicitly, since SFTConfig's defaults differ: bf16, checkpointing, learning rate)."""
    return {
        "output_dir": str(Path(spec["out_dir"]) / "trainer"),
        "per_device_train_batch_size": spec["micro_batch_size"],
        "gradient_accumulation_steps": spec["grad_accum"],
        "max_steps": spec["steps"],
        "learning_rate": spec["lr"],
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "bf16": spec["dtype"] == "bf16",
        "use_cpu": not on_gpu,
        "deepspeed": spec["ds_config"],
        "gradient_checkpointing": spec["gradient_checkpointing"],
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": spec["seed"],
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


def make_trainer(
    spec: dict[str, Any], model: Any, tokenizer: Any, train: list[dict[str, Any]], clock: Any
) -> Any:
    """The peer's trainer, its collator wrapped to count real tokens."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    peer, on_gpu = spec["peer"], spec["use_gpu"]
    if peer in ("hf_random", "hf_grouped"):
        sampling = "group_by_length" if peer == "hf_grouped" else "random"
        args = TrainingArguments(
            **common_args(spec, on_gpu), train_sampling_strategy=sampling,
            remove_unused_columns=False,
        )
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        trainer = Trainer(
            model=model, args=args, train_dataset=train, data_collator=collator,
            processing_class=tokenizer, callbacks=[clock],
        )
    else:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in train]
        packing = peer == "trl_bfd"
        args = SFTConfig(  # unpacked rows are at most seq_len already: TRL wants no max_length
            **common_args(spec, on_gpu), max_length=spec["seq_len"] if packing else None,
            packing=packing, packing_strategy="bfd", padding_free=True,
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer, callbacks=[clock],
        )
    trainer.data_collator = CountingCollator(trainer.data_collator)
    return trainer


def main(spec_path: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed

    spec = json.loads(Path(spec_path).read_text())
    out_dir = Path(spec["out_dir"])
    on_gpu = spec["use_gpu"]
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    train = encode(read_jsonl(spec["train"]), tokenizer, spec["prompt_template"])
    validation = encode(read_jsonl(spec["validation"]), tokenizer, spec["prompt_template"])
    set_seed(spec["seed"])
    arch = dict(spec["architecture"])
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["dtype"]]
    with torch.device("cuda" if on_gpu else "cpu"):  # initialise where it trains
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=spec["attention"], dtype=dtype
        )
    if spec["lora"]:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, **spec["lora"]))
    clock = make_clock(on_gpu)
    trainer = make_trainer(spec, model, tokenizer, train, clock)
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    counts, accum = trainer.data_collator.tokens, spec["grad_accum"]
    per_step = [sum(counts[s * accum : (s + 1) * accum]) for s in range(spec["steps"])]
    result = {
        "tokens_per_step": per_step,
        "step_ends": clock.ends,
        "losses": clock.losses,
        "peak_memory_gb": clock.peak_memory_gb,
    }
    if rank == 0:
        result["eval_loss"] = validation_loss(trainer.model, validation, tokenizer.pad_token_id)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
