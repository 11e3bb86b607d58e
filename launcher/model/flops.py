"""Training FLOPs per token, device peak FLOP/s, and model FLOPs utilisation (MFU).

Per token, training costs 6N FLOPs for the matrix products with the weights (2N forward, 4N
backward: gradients of activations and of weights) plus 12·L·H·Q·T for attention scores and
their weighted sum over a context of T tokens (PaLM, appendix B; torchtitan counts the same).
N is the non-embedding parameter count: the token-embedding lookup is not a matrix product,
the output projection is (so a tied output projection counts). With LoRA the frozen weights
get no weight gradients: 4N. Recomputation under activation checkpointing is not counted;
that would be hardware FLOPs, not model FLOPs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# Dense (no sparsity) bf16/fp16 tensor-core peaks, from the vendors' datasheets. Matched
# against the words of torch.cuda.get_device_name(); the first entry whose words are all
# present wins. GPUs not listed (e.g. AWS's A10G, whose peak NVIDIA does not publish) need
# logging.peak_tflops.
PEAK_FLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "NVL"), 835e12),
    (("H100", "PCIe"), 756e12),
    (("H100",), 989e12),  # SXM
    (("GH200",), 989e12),
    (("H200",), 989e12),
    (("B200",), 2250e12),
    (("A100",), 312e12),
    (("L40S",), 362e12),
    (("L4",), 121e12),
    (("A10",), 125e12),
    (("MI300X",), 1307e12),
)


@dataclass(frozen=True)
class ModelShape:
    params: int  # non-embedding
    layers: int
    heads: int
    head_dim: int


def flops_per_token(shape: ModelShape, seq_len: int, lora: bool) -> float:
    dense = (4 if lora else 6) * shape.params
    attention = 12 * shape.layers * shape.heads * shape.head_dim * seq_len
    return float(dense + attention)


def model_shape(model: torch.nn.Module) -> ModelShape:
    """The shape of a Hugging Face causal LM; counts ZeRO-3 partitioned parameters in full."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    total = sum(_numel(p) for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is embedding
    params = total if tied else total - _numel(embedding)
    return ModelShape(params, config.num_hidden_layers, heads, head_dim)


def _numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())


def table_peak_flops(device_name: str) -> float | None:
    words = set(re.split(r"[\s\-_]+", device_name))
    for needed, flops in PEAK_FLOPS:
        if words.issuperset(needed):
            return flops
    return None


def device_peak_flops(device: torch.device, peak_tflops: float | None, dtype: str) -> float | None:
    """Peak FLOP/s of one device: the recipe's value, else the table (bf16/fp16 on a GPU)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda" or dtype not in ("bf16", "fp16"):
        return None
    return table_peak_flops(torch.cuda.get_device_name(device))


def mfu(flops_per_token: float, tokens_per_s: float, devices: int, peak_flops: float) -> float:
    """Fraction of the devices' peak spent on the model's own FLOPs."""
    return flops_per_token * tokens_per_s / (devices * peak_flops)
