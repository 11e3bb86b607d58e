"""The FLOP count and MFU against numbers worked out by hand."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from launcher.model.flops import (
    ModelShape,
    device_peak_flops,
    flops_per_token,
    mfu,
    model_shape,
    table_peak_flops,
)
from tests.conftest import TINY_LLAMA


def tiny(**overrides) -> torch.nn.Module:
    spec = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"} | overrides
    return AutoModelForCausalLM.from_config(LlamaConfig(**spec))


def test_tiny_llama_by_hand():
    # hidden 32, 4 heads of 8, 2 kv heads (k/v 32 -> 16), mlp 64, 2 layers, vocab 66.
    # per layer: q 32*32 + k 32*16 + v 32*16 + o 32*32 = 3072; mlp 3 * 32*64 = 6144;
    #            two RMSNorm weights 2*32 = 64                              -> 9280
    # non-embedding: 2 * 9280 + final norm 32 + lm_head 66*32 = 2112      -> 20704
    shape = model_shape(tiny())
    assert shape == ModelShape(params=20704, layers=2, heads=4, head_dim=8)
    # 6N = 124224; attention 12 * L2 * H4 * Q8 * T64 = 49152
    assert flops_per_token(shape, seq_len=64, lora=False) == 124224 + 49152
    # LoRA: 4N = 82816 plus the same attention
    assert flops_per_token(shape, seq_len=64, lora=True) == 82816 + 49152


def test_tied_output_projection_counts_once():
    # tied: the 66x32 matrix is both the lookup and the output projection; it counts once
    assert model_shape(tiny(tie_word_embeddings=True)).params == 20704


def test_peft_model_shape_is_the_base_model_plus_adapters():
    from launcher.model.losses import causal_lm

    lora = get_peft_model(tiny(), LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, target_modules=["q_proj"]))
    # q_proj A (2x32) + B (32x2) = 128 per layer
    assert model_shape(causal_lm(lora)).params == 20704 + 2 * 128


def test_llama_3_8b_matches_its_published_size():
    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8,
    )
    with torch.device("meta"):
        shape = model_shape(AutoModelForCausalLM.from_config(config))
    total = shape.params + 128256 * 4096  # add back the input embedding
    assert total == 8_030_261_248  # the 8.03B of Meta-Llama-3-8B
    per_token = flops_per_token(shape, seq_len=8192, lora=False)
    assert per_token == pytest.approx(6 * shape.params + 12 * 32 * 32 * 128 * 8192)


def test_mfu_by_hand():
    # 1e9 FLOPs/token at 400,000 tokens/s on 4 devices of 500 TFLOP/s: 4e14 / 2e15 = 0.2
    assert mfu(1e9, 400_000, devices=4, peak_flops=500e12) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA A10G", None),
        ("Tesla T4", None),
    ],
)
def test_peak_table(name, peak):
    assert table_peak_flops(name) == peak


def test_cpu_reports_peak_only_when_given():
    cpu = torch.device("cpu")
    assert device_peak_flops(cpu, None, "bf16") is None
    assert device_peak_flops(cpu, 2.5, "fp32") == 2.5e12
