"""Per-GPU memory of a training run: model states for each ZeRO stage and offload choice, and
activations for one micro batch. Pure arithmetic on small frozen dataclasses, in bytes.

Model states follow DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs`` and
``estimate_zero3_model_states_mem_needs``, zero_init=True) and equal them for a full
fine-tune in bf16/fp16 with AdamW. Their accounting, per parameter:

* 16-bit weights, 2 bytes, held whole on every GPU below ZeRO-3, partitioned by ZeRO-3;
* 16-bit gradients, 2 bytes, partitioned from ZeRO-2 on (ZeRO-3 keeps none whole: they are
  reduced in buckets straight into the fp32 partition);
* 16 bytes of optimizer state: fp32 gradients, fp32 master weights, Adam's two moments (4 each),
  partitioned from ZeRO-1 on;
* ZeRO-3 also holds the largest layer gathered in 16 bits plus its 16-bit gradient: 4 bytes
  per parameter of the largest module (counting its own parameters, not its children's).

Two generalisations DeepSpeed's estimators do not cover: only *trainable* parameters (LoRA and
other adapters, train.freeze, BitFit) carry gradients and optimizer state; and fp32 training
keeps no master copy (4-byte weights, 4-byte gradients, 8 bytes of Adam moments). ZeRO-0 and
ZeRO-1 have no DeepSpeed estimator; they use the same per-parameter bytes, unpartitioned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALL_COLD_BUFFER = 1.5  # DeepSpeed's additional_buffer_factor for host memory


@dataclass(frozen=True)
class Counts:
    """Parameter counts of the model as it trains."""

    total: int
    trainable: int
    largest_layer: int  # parameters of the largest module, its own only
    quantized: int = 0  # frozen parameters stored in 4 bits (QLoRA's base linears)


@dataclass(frozen=True)
class Precision:
    param_bytes: int  # a weight as the model holds it
    grad_bytes: int  # its gradient, in the same precision
    optim_bytes: int  # optimizer state per trainable parameter

    @staticmethod
    def of(dtype: str) -> Precision:
        return Precision(4, 4, 8) if dtype == "fp32" else Precision(2, 2, 16)


@dataclass(frozen=True)
class Option:
    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False

    @property
    def name(self) -> str:
        if self.offload_param:
            return f"zero{self.stage}+offload_opt+param"
        return f"zero{self.stage}+offload_opt" if self.offload_optimizer else f"zero{self.stage}"


# Fastest first. Below ZeRO-3 every GPU holds the whole 16-bit model and the collectives are
# those of data parallelism (stage 2 adds a reduce-scatter in place of the all-reduce); ZeRO-3
# all-gathers the weights once more in the backward pass, over the GPU interconnect. Offload
# moves the optimizer step onto the CPUs and every gradient over PCIe, which is slower than
# ZeRO-3's extra all-gather on NVLink-class nodes; offloading the parameters too is slowest.
OPTIONS: tuple[Option, ...] = (
    Option(0),
    Option(1),
    Option(2),
    Option(3),
    Option(2, offload_optimizer=True),
    Option(3, offload_optimizer=True),
    Option(3, offload_optimizer=True, offload_param=True),
)


@dataclass(frozen=True)
class Hardware:
    gpus_per_node: int
    nodes: int

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class StateBytes:
    gpu: int  # per GPU
    cpu: int  # per node (host memory)


NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit block scales + fp32 scales


def weight_bytes(counts: Counts, precision: Precision) -> int:
    """All weights at the model's precision; QLoRA's quantized base at ~4.1 bits each."""
    plain = counts.total - counts.quantized
    return int(plain * precision.param_bytes + counts.quantized * NF4_BYTES)


def model_states(counts: Counts, precision: Precision, option: Option, hw: Hardware) -> StateBytes:
    """Per-GPU and per-node host bytes of weights, gradients and optimizer states."""
    n, t, p = hw.gpus, counts.trainable, precision
    weights = weight_bytes(counts, precision)
    if option.stage < 3:
        return _below_zero3(weights, counts, p, option, hw)
    gathered = 2 * p.param_bytes * counts.largest_layer
    if option.offload_param:
        cpu = (p.optim_bytes * t + p.param_bytes * counts.total) * ALL_COLD_BUFFER / hw.nodes
        return StateBytes(gathered, int(cpu))
    if option.offload_optimizer:
        cpu = p.optim_bytes * t * ALL_COLD_BUFFER / hw.nodes
        return StateBytes(gathered + int(weights / n), int(cpu))
    cpu = counts.largest_layer * 4 * hw.gpus_per_node * ALL_COLD_BUFFER
    return StateBytes(gathered + int((weights + p.optim_bytes * t) / n), int(cpu))


def _below_zero3(
    weights: int, counts: Counts, p: Precision, option: Option, hw: Hardware
) -> StateBytes:
    n, t = hw.gpus, counts.trainable
    load = counts.total * 4 * hw.gpus_per_node * ALL_COLD_BUFFER  # fp32 weights at load time
    if option.offload_optimizer:  # DeepSpeed: max(4 x GPUs, 16) bytes per parameter
        cpu = max(counts.total * 4 * n, t * p.optim_bytes) * ALL_COLD_BUFFER
        return StateBytes(weights, int(cpu))
    if option.stage == 2:
        return StateBytes(weights + int((p.grad_bytes + p.optim_bytes) * t / n), int(load))
    if option.stage == 1:
        return StateBytes(weights + p.grad_bytes * t + int(p.optim_bytes * t / n), int(load))
    return StateBytes(weights + (p.grad_bytes + p.optim_bytes) * t, int(load))


# ---------------------------------------------------------------- activations


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's sizes, from its config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class ActivationSpec:
    micro_batch: int
    seq_len: int
    act_bytes: int  # 2 for bf16/fp16, 4 for fp32
    attention: str  # eager materialises the score matrix; sdpa, flash and flex do not
    checkpointing: bool
    checkpoint_every: int
    kernels: str  # liger or none
    loss: str  # plain, chunked or fused
    loss_chunk: int
    adapter_inputs: int = 0  # per layer: input features of LoRA-adapted linears with dropout
    lora_rank: int = 0
    adapted_per_layer: int = 0


def layer_bytes_per_token(shape: Shape, spec: ActivationSpec) -> int:
    """Bytes one decoder layer saves for its backward pass, per token (HF Llama-style layer:
    RMSNorm, attention with RoPE, RMSNorm, SwiGLU MLP, residuals)."""
    d, h, f = spec.act_bytes, shape.hidden, shape.intermediate
    q = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    # RMSNorm in eager PyTorch: the fp32 input (pow, mul), the normalised value (scale by the
    # weight) and the output (the next linear's input). Liger's kernel saves input and rstd.
    norm = 2 * d * h if spec.kernels == "liger" else 4 * h + 2 * d * h
    # Attention: q, k, v after RoPE and the output (all saved by the kernel), the output made
    # contiguous for o_proj, and the fp32 log-sum-exp per head.
    attention = d * (q + 2 * kv) + 2 * d * q + 4 * shape.heads
    if spec.attention == "eager":  # fp32 softmax and its cast, per head, over the whole row
        attention += (4 + d) * shape.heads * spec.seq_len
    # SwiGLU: gate output (silu's input), silu output, up output, their product (down's input);
    # Liger's fused SwiGLU keeps gate and up only.
    mlp = (3 if spec.kernels == "liger" else 4) * d * f
    adapter = (d + 1) * spec.adapter_inputs + d * spec.lora_rank * spec.adapted_per_layer
    return 2 * norm + attention + mlp + adapter


def loss_bytes(shape: Shape, spec: ActivationSpec, tokens: int) -> int:
    """Peak bytes of the output projection and cross-entropy for ``tokens`` targets."""
    d, v, h = spec.act_bytes, shape.vocab, shape.hidden
    # Per target: the logits, their fp32 log-softmax and its gradient, and the logits' own
    # gradient in the model's precision (an fp32 model's logits need no fp32 copy).
    per_target = v * (12 if d == 4 else 2 * d + 8)
    if spec.loss == "plain":
        return tokens * per_target
    if spec.loss == "chunked":  # the gathered target hidden states and one chunk's logits
        return tokens * d * h + min(spec.loss_chunk, tokens) * per_target
    # fused (Liger): the input gradient computed in the forward pass, one chunk of logits
    chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(v / h)))))
    return tokens * d * h + 2 * min(chunk, tokens) * v * d


def activations(shape: Shape, spec: ActivationSpec) -> int:
    """Peak activation bytes of one micro batch on one GPU."""
    tokens = spec.micro_batch * spec.seq_len
    full = layer_bytes_per_token(shape, spec) * tokens
    boundary = spec.act_bytes * shape.hidden * tokens  # a checkpointed layer keeps its input
    checkpointed = (
        math.ceil(shape.layers / spec.checkpoint_every) if spec.checkpointing else 0
    )
    layers = checkpointed * boundary + (shape.layers - checkpointed) * full
    if checkpointed:
        layers += full  # one checkpointed layer is recomputed at a time in the backward pass
    final_norm = (2 * spec.act_bytes * shape.hidden + 4 * shape.hidden) * tokens
    return layers + final_norm + loss_bytes(shape, spec, tokens)
