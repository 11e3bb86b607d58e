"""One full fp32 state dict of the model from a committed checkpoint, at any ZeRO stage.

What DeepSpeed writes (0.19) decides where each weight comes from:

* ZeRO 0-2 keep every weight whole on every rank, and rank 0's ``mp_rank_00_model_states.pt``
  holds the module's complete ``state_dict()`` -- trainable and frozen parameters and buffers.
  DeepSpeed's ``zero_to_fp32`` cannot be used there: it rebuilds only the optimizer's
  parameters, plus the frozen ones only when ZeRO partitions gradients (stage 2 and up), so a
  ZeRO-1 run with anything frozen (LoRA, BitFit, ``train.freeze``) would lose its base weights.
* ZeRO-3 partitions every weight; the module state holds empty placeholders, and the weights
  are merged from each rank's optimizer shards and frozen fragments by ``zero_to_fp32``.

Only files the checkpoint's manifest lists are read; ``choose_checkpoint`` has already checked
their checksums and scanned their pickles for code-running globals.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from launcher.checkpoint import commit as ckpt
from launcher.errors import ExportError

MODULE_STATES = "mp_rank_00_model_states.pt"
ZERO_TO_FP32_GLOBS = ("*_model_states.pt", "*_optim_states.pt")


def consolidated_state(path: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The trained model's tensors by parameter (and buffer) name, in fp32 on CPU."""
    if _zero_stage(path, manifest) < 3:
        state = module_state(path, manifest)
    else:
        state = zero3_state(path, manifest)
    return {name: _fp32(value) for name, value in state.items()}


def _fp32(value: Any) -> Any:
    is_float = isinstance(value, torch.Tensor) and value.is_floating_point()
    return value.float() if is_float else value


def _zero_stage(path: Path, manifest: dict[str, Any]) -> int:
    stage = manifest.get("zero_stage")
    if not isinstance(stage, int) or isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ExportError(f"{path / ckpt.MARKER} does not say which ZeRO stage wrote it "
                          f"(zero_stage: {stage!r})")
    return stage


def module_state(path: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """ZeRO 0-2: the module's whole state dict as rank 0 saved it."""
    if MODULE_STATES not in manifest["files"]:
        raise ExportError(f"{path} has no {MODULE_STATES} in its manifest")
    saved = load_tensors(path / MODULE_STATES)
    module = saved.get("module") if isinstance(saved, dict) else None
    if not isinstance(module, dict) or not module:
        raise ExportError(f"{path / MODULE_STATES} holds no module state dict")
    return dict(module)


def zero3_state(path: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """ZeRO-3: every rank's partitions merged by DeepSpeed's own reader, which globs the
    checkpoint directory -- so first make sure everything it would read is in the manifest."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    unlisted = sorted(
        p.name for pattern in ZERO_TO_FP32_GLOBS for p in path.glob(pattern)
        if p.name not in manifest["files"]
    )
    if unlisted:
        raise ExportError(f"{path} holds files its manifest does not list, refusing to load "
                          f"them: {unlisted}")
    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)


def load_tensors(path: Path) -> Any:
    """A torch pickle loaded by the restricted (tensors-only) unpickler; DeepSpeed's own
    allowlisted state classes are the only other objects it may build."""
    with torch.serialization.safe_globals(_allowed_classes()):
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # the restricted unpickler names what it refused
            raise ExportError(f"cannot load {path} safely: {e}") from None


def _allowed_classes() -> list[type]:
    classes = []
    for qualified in sorted(ckpt.ALLOWED_GLOBALS):
        module, _, name = qualified.rpartition(".")
        classes.append(getattr(importlib.import_module(module), name))
    return classes
