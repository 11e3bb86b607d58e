"""Next-token cross-entropy summed over real targets, without materialising full logits.

The model is always called as a whole (through the DeepSpeed engine, the peft wrapper and
the Hugging Face forward), so every framework hook runs as usual; it is asked for its final
hidden state and for no logits (``logits_to_keep`` selects none). The output projection and
the cross-entropy then run only on target positions, either in chunks that are recomputed in
the backward pass, all but the last (``chunked``: peak memory holds one chunk's logits, never
``[tokens, vocab]``), or in Liger's fused linear cross-entropy (``fused``, GPU). The
projection is applied by calling the ``lm_head`` module, so ZeRO-3 gathers its weight
through its own hooks.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from launcher.data.tokenized import IGNORE_INDEX

LossKind = Literal["fused", "chunked", "plain"]
# Config fields of families whose forward changes the logits after the output projection;
# for those only the plain loss reproduces the model's own logits.
LOGIT_TRANSFORMS = (
    "final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
)


@dataclass(frozen=True)
class LossConfig:
    kind: LossKind = "chunked"
    chunk_size: int = 4096


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over real targets, from full logits (the reference)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a DeepSpeed engine (or DDP) and a peft wrapper."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


@functools.cache
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def hidden_state_loss_supported(hf_model: torch.nn.Module) -> bool:
    """Whether the model can return its final hidden state without logits, and its logits are
    exactly ``lm_head(hidden)``."""
    config = getattr(hf_model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return False
    return _takes_logits_to_keep(type(hf_model)) and hf_model.get_output_embeddings() is not None


def model_loss_sum(
    model: torch.nn.Module, batch: dict[str, Any], config: LossConfig = LossConfig()
) -> torch.Tensor:
    """Summed next-token cross-entropy of one micro batch (the caller normalises it)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    hf_model = causal_lm(model)
    if config.kind == "plain" or not hidden_state_loss_supported(hf_model):
        return token_loss_sum(model(**inputs, use_cache=False).logits, labels)
    no_logits = torch.empty(0, dtype=torch.long, device=labels.device)
    out = model(**inputs, use_cache=False, output_hidden_states=-1, logits_to_keep=no_logits)
    hidden, targets = shifted_targets(out.hidden_states[-1], labels)
    head = hf_model.get_output_embeddings()
    if config.kind == "fused":
        return fused_loss_sum(head, hidden, targets)
    return chunked_loss_sum(head, hidden, targets, config.chunk_size)


def shifted_targets(
    hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of the positions that predict a real target, and those targets."""
    hidden = hidden[:, :-1].flatten(0, 1)
    targets = labels[:, 1:].flatten()
    keep = targets != IGNORE_INDEX
    return hidden[keep], targets[keep]


def chunked_loss_sum(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Cross-entropy of ``head(hidden)`` chunk by chunk; in training each chunk's logits but
    the last are recomputed in the backward pass instead of being kept."""
    chunks = math.ceil(len(targets) / chunk_size)
    if _partitioned(head) and dist.is_initialized():
        # Under ZeRO-3 every call of the head gathers its weight collectively, so all ranks
        # must call it equally often.
        count = torch.tensor(chunks, device=hidden.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        chunks = int(count.item())
    spans = [slice(i * chunk_size, (i + 1) * chunk_size) for i in range(chunks)]
    zero = hidden.new_zeros((), dtype=torch.float32)
    if not (torch.is_grad_enabled() and hidden.requires_grad):
        return sum((_chunk_loss(head, hidden[s], targets[s]) for s in spans), zero)
    if not any(p.requires_grad for p in head.parameters()):
        return _FrozenHeadLoss.apply(hidden, targets, head, spans)
    total = zero + hidden.sum() * 0.0  # a graph even when there is no chunk
    if not spans:
        return total
    *recomputed, last = spans
    for s in recomputed:
        total = total + checkpoint(_chunk_loss, head, hidden[s], targets[s], use_reentrant=False)
    # The backward pass starts with the last chunk: its logits, kept from the forward pass,
    # are used at once, so keeping them costs no more memory than recomputing them would.
    return total + _chunk_loss(head, hidden[last], targets[last])


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class _FrozenHeadLoss(torch.autograd.Function):
    """Chunked cross-entropy through a frozen head (LoRA): each chunk's gradient for the hidden
    states is taken as soon as its loss is, so the backward pass needs neither logits nor a
    second call of the head. (Recomputing a frozen ZeRO-3 head inside a checkpoint is what
    DeepSpeed cannot attribute to a module in backward.)"""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                spans: list[slice]) -> torch.Tensor:
        total = hidden.new_zeros((), dtype=torch.float32)
        grad = torch.zeros_like(hidden)
        for s in spans:
            with torch.enable_grad():
                h = hidden[s].detach().requires_grad_()
                loss = _chunk_loss(head, h, targets[s])
                (grad[s],) = torch.autograd.grad(loss, h)
            total += loss.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None


def _partitioned(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def fused_loss_sum(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Liger's fused linear cross-entropy: logits are produced and consumed block by block in
    one Triton kernel. Needs the head's whole weight on this rank (not ZeRO-3)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    out = loss(head.weight, hidden, targets, getattr(head, "bias", None))
    return out if isinstance(out, torch.Tensor) else out.loss  # newer Liger: an output record
