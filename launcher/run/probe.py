"""The probe: the trained model's logits on a few fixed tokens, written by rank 0 at the end
of training and checked by export against what the exported model computes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from launcher.run.rundir import RunDir


def probe_ids(tokenizer: Any) -> list[int]:
    vocab = len(tokenizer)
    return [(7 * i + 3) % vocab for i in range(16)]


def write_probe(engine: Any, run_dir: Path, rank: Any, tokenizer: Any, step: int) -> None:
    """Record the trained model's logits on a few tokens, and the step they were taken at;
    export checks an export of that step's checkpoint against them. Written atomically."""
    from safetensors.torch import save_file

    ids = torch.tensor([probe_ids(tokenizer)], device=rank.device)
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=ids, use_cache=False).logits.float().cpu()
    engine.train()
    if rank.rank == 0:
        path = RunDir(run_dir).probe
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"input_ids": ids.cpu(), "logits": logits}, str(tmp), metadata={"step": str(step)})
        os.replace(tmp, path)
