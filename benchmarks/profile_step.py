"""Forward + backward of one micro batch per batch layout, on one thread, in one process:
where ftlaunch's step time goes on sdpa, and what the layouts cost per real token.

    python benchmarks/profile_step.py            # median of --repeats, alternating layouts
    python benchmarks/profile_step.py --trace    # also torch.profiler's top operators

The model is vs_hf_trainer.py's CPU job (4-layer Llama, hidden 192, sdpa, fp32) and the
examples its long-tailed lengths. Layouts, each holding about 2 x 256 real tokens:

- ``rows_mask``: ftlaunch's packed rows with a block-diagonal 4-D mask (``packing_layout:
  rows`` on sdpa), chunked loss on targets only;
- ``length_group``: ftlaunch's length group (``packing_layout: length_groups``, the sdpa
  default): similar lengths, right-padded, no mask, chunked loss;
- ``grouped_padded``: what the Trainer with group_by_length runs: similar lengths, padded,
  a 2-D padding mask, full logits and the mean loss over them;
- ``flat_position_ids``: what TRL's padding-free/bfd runs on sdpa: one row, positions
  restarting per example, transformers' own block mask from position_ids, full logits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.synthetic_sft import LengthSpec, sample_lengths
from benchmarks.vs_hf_trainer import CPU_JOB
from launcher.data.pack import block_diagonal_mask, group_by_length, pack_examples
from launcher.model.losses import LossConfig, model_loss_sum


def rows_of(lengths: np.ndarray, rows: list[tuple[int, ...]], vocab: int, concat: bool):
    """input_ids, labels, positions, segments for ``rows`` (concatenated, or padded per row)."""
    g = torch.Generator().manual_seed(0)
    if concat:
        width = max(int(sum(lengths[i] for i in r)) for r in rows)
        layout = [[int(lengths[i]) for i in r] for r in rows]
    else:  # one example per row
        flat = [i for r in rows for i in r]
        width = int(max(lengths[flat]))
        layout = [[int(lengths[i])] for i in flat]
    ids = torch.randint(5, vocab, (len(layout), width), generator=g)
    seg = torch.zeros_like(ids)
    pos = torch.zeros_like(ids)
    for k, parts in enumerate(layout):
        at = 0
        for s, n in enumerate(parts, 1):
            seg[k, at : at + n], pos[k, at : at + n] = s, torch.arange(n)
            at += n
    labels = ids.masked_fill(seg == 0, -100)
    labels[:, 0] = -100
    return ids, labels, pos, seg


def layouts(lengths: np.ndarray, vocab: int) -> dict[str, tuple[dict, str, int]]:
    packed = pack_examples(lengths, 256)
    two = [packed.rows[i] for i in range(len(packed.rows) // 2, len(packed.rows) // 2 + 2)]
    ids, labels, pos, seg = rows_of(lengths, two, vocab, concat=True)
    real = int((seg > 0).sum())
    out = {
        "rows_mask": ({"input_ids": ids, "labels": labels, "position_ids": pos,
                       "attention_mask": block_diagonal_mask(seg, torch.float32)}, "chunked", real),
        "flat_position_ids": ({"input_ids": ids[seg > 0][None], "labels": labels[seg > 0][None],
                               "position_ids": pos[seg > 0][None]}, "plain", real),
    }
    groups = group_by_length(lengths, 512).rows
    middle = groups[len(groups) // 2]
    ids, labels, _, seg = rows_of(lengths, [middle], vocab, concat=False)
    real = int((seg > 0).sum())
    out["length_group"] = ({"input_ids": ids, "labels": labels}, "chunked", real)
    out["grouped_padded"] = (
        {"input_ids": ids, "labels": labels, "attention_mask": (seg > 0).long()}, "plain", real
    )
    return out


def step(model: torch.nn.Module, batch: dict, loss: str) -> None:
    model.zero_grad(set_to_none=True)
    total = model_loss_sum(model, batch, LossConfig(loss, 1024))
    if loss == "plain":  # the peers' mean over their targets
        total = total / (batch["labels"][:, 1:] != -100).sum()
    total.backward()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(1)
    arch = dict(CPU_JOB.architecture)
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    lengths = sample_lengths(LengthSpec("long_tailed", 256, 48), 4000, np.random.default_rng(0))
    cases = layouts(lengths, config.vocab_size)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for name, (batch, loss, _) in cases.items():
        step(model, batch, loss)  # warm-up
    for _ in range(args.repeats):
        for name, (batch, loss, _) in cases.items():
            began = time.perf_counter()
            step(model, batch, loss)
            times[name].append(time.perf_counter() - began)
    print(f"{'layout':<18} {'shape':>10} {'real':>5} {'ms':>8} {'us/real token':>14}")
    for name, (batch, _, real) in cases.items():
        ms = 1000 * statistics.median(times[name])
        shape = "x".join(map(str, batch["input_ids"].shape))
        print(f"{name:<18} {shape:>10} {real:>5} {ms:>8.1f} {1000 * ms / real:>14.1f}")
    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        for name in ("rows_mask", "length_group"):
            batch, loss, _ = cases[name]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(model, batch, loss)
            print(f"\n# {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
