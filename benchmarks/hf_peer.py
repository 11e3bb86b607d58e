"""The Hugging Face Trainer side of the benchmark, as fine-tuning stacks usually run it:
examples padded per batch by DataCollatorForSeq2Seq, Trainer + DeepSpeed ZeRO (the same dict
config as ftlaunch, batch sizes left to "auto"), no packing.

Run by vs_hf_trainer.py as ``torchrun --nproc_per_node N benchmarks/hf_peer.py SPEC.json``;
writes OUT_DIR/rank<r>.json with per-step real-token counts, step end times (rank 0), peak
memory at the last step, training losses and a token-weighted validation loss.
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
    """DataCollatorForSeq2Seq that also records each batch's real (non-padding) tokens."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.tokens: list[int] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.inner(features)
        self.tokens.append(int(batch["attention_mask"].sum()))
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
            self.ends.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if on_gpu:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
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


def main(spec_path: str) -> None:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

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
    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=spec["grad_accum"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=spec["dtype"] == "bf16",
        use_cpu=not on_gpu,
        deepspeed=spec["ds_config"],
        gradient_checkpointing=spec["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=spec["seed"],
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    collator = CountingCollator(
        DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    )
    clock = make_clock(on_gpu)
    trainer = Trainer(
        model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[clock]
    )
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    per_step = [
        sum(
            collator.tokens[
                s * args.gradient_accumulation_steps : (s + 1) * args.gradient_accumulation_steps
            ]
        )
        for s in range(spec["steps"])
    ]
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
