"""Each rank's random-number state, saved beside its checkpoint shards and restored on resume."""

from __future__ import annotations

from pathlib import Path

import torch

from launcher.checkpoint.commit import rng_name


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng(ckpt: Path, rank: int) -> None:
    from safetensors.torch import save_file

    save_file(rng_state(), str(ckpt / rng_name(rank)))


def load_rng(ckpt: Path, rank: int, saved_world: int) -> bool:
    """Restore this rank's RNG state; False for a rank the checkpoint's run did not have (it
    keeps the stream it was seeded with). The file is required otherwise: verification
    refuses a checkpoint that lacks one."""
    from safetensors.torch import load_file

    if rank >= saved_world:
        return False
    restore_rng(load_file(str(ckpt / rng_name(rank))))
    return True
