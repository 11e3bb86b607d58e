"""Padding-free packing for flash-attn: the worker's batch layout and transformers' plumbing of
the varlen boundaries, checked on CPU with an attention function that computes what
flash_attn_varlen_func computes (causal attention inside each [cu[i], cu[i+1]) span)."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    AutoModelForCausalLM,
    LlamaConfig,
)

from launcher.data.tokenized import IGNORE_INDEX, Encoded, TokenizedSplit
from launcher.data.pack import (
    PackedSplit, collate_packed, flatten_packed, group_by_length, pack_examples,
)
from launcher.data.batch import collate_padded, packing_layout, training_units
from launcher.model.losses import LossConfig, model_loss_sum
from launcher.data.batch import Batches
from tests.conftest import TINY_LLAMA

CALLS: list[torch.Tensor] = []


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, **kwargs):
    assert attention_mask is None and query.shape[0] == 1
    CALLS.append(cu_seq_lens_q)
    out = torch.empty_like(query)
    bounds = cu_seq_lens_q.tolist()
    for a, b in pairwise(bounds):
        out[:, :, a:b] = F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling,
            enable_gqa=True,
        )
    return out.transpose(1, 2), None


AttentionInterface.register("varlen_probe", varlen_attention)
AttentionMaskInterface.register("varlen_probe", lambda *args, **kwargs: None)


@pytest.fixture(scope="module")
def split() -> TokenizedSplit:
    rng = np.random.default_rng(3)
    examples = []
    for n in (5, 9, 3, 7, 11, 4, 6):
        ids = rng.integers(4, 60, n).tolist()
        examples.append(Encoded(ids, [IGNORE_INDEX] * 2 + ids[2:]))
    return TokenizedSplit.from_examples(examples)


def model(attention: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"})
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()


def test_flatten_keeps_every_example_whole(split):
    packed = pack_examples(split.lengths(), max_length=16)
    batch = collate_packed(split, packed, range(len(packed)), pad_id=0)
    flat = flatten_packed(batch, batch.pop("segment_ids"))
    assert flat["input_ids"].shape == (1, int(split.lengths().sum()))
    bounds = flat["cu_seq_lens_q"].tolist()
    assert flat["cu_seq_lens_q"].dtype == torch.int32 and flat["cu_seq_lens_k"] is flat["cu_seq_lens_q"]
    assert flat["max_length_q"] == flat["max_length_k"] == int(split.lengths().max())
    order = [i for row in packed.rows for i in row]
    assert len(bounds) == len(order) + 1
    for i, a, b in zip(order, bounds[:-1], bounds[1:]):
        ids, _ = split.example(i)
        assert flat["input_ids"][0, a:b].tolist() == ids.tolist()
        assert flat["position_ids"][0, a:b].tolist() == list(range(b - a))
        assert flat["labels"][0, a] == IGNORE_INDEX  # no target across the boundary


def test_varlen_batches_reach_attention_and_match_unpacked_losses(split):
    """Batches.make for flash_attention_2 -> model -> attention sees the boundaries; the summed
    loss equals the examples run one by one, padded."""
    packed = pack_examples(split.lengths(), max_length=16)
    batches = Batches(split, packed, 0, torch.float32, "flash_attention_2")
    batch = batches.make(np.arange(len(packed)), torch.device("cpu"))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    CALLS.clear()
    with torch.no_grad():
        packed_loss = model_loss_sum(model("varlen_probe"), batch, LossConfig("chunked", 4))
        plain = collate_padded(split, range(len(split)), pad_id=0)
        reference = model_loss_sum(model("sdpa"), plain, LossConfig("plain"))
    assert len(CALLS) == TINY_LLAMA["num_hidden_layers"]
    assert CALLS[0].tolist() == batch["cu_seq_lens_q"].tolist()
    torch.testing.assert_close(packed_loss, reference, rtol=1e-5, atol=1e-5)
    assert batches.tokens(np.arange(len(packed))) == int(split.lengths().sum())


def test_sdpa_rows_mask_only_when_they_hold_several_examples(split):
    one_each = PackedSplit.from_rows(tuple((i,) for i in range(len(split))))
    single = Batches(split, one_each, 0, torch.float32, "sdpa").make(np.arange(3), torch.device("cpu"))
    assert set(single) == {"input_ids", "labels"}  # plain causal attention
    several = pack_examples(split.lengths(), max_length=16)
    mixed = Batches(split, several, 0, torch.float32, "sdpa").make(np.arange(2), torch.device("cpu"))
    assert mixed["attention_mask"].dim() == 4 and "position_ids" in mixed


def test_length_groups_fit_their_budget_and_hold_every_example_once(split):
    lengths = split.lengths()
    groups = group_by_length(lengths, budget=20)
    assert sorted(i for g in groups.rows for i in g) == list(range(len(split)))
    for g in groups.rows:
        assert len(g) * max(int(lengths[i]) for i in g) <= 20 or len(g) == 1
    # longest first: each group's examples are no longer than the previous group's
    firsts = [int(lengths[g[0]]) for g in groups.rows]
    assert firsts == sorted(firsts, reverse=True)


def test_auto_layout_is_rows_only_for_flash_attention():
    assert packing_layout("auto", "flash_attention_2") == "rows"
    assert packing_layout("auto", "sdpa") == "length_groups"
    assert packing_layout("auto", "eager") == "length_groups"
    assert packing_layout("rows", "sdpa") == "rows"


def test_sdpa_length_groups_need_no_mask_and_match_unpacked_losses(split):
    """A length group is one right-padded micro batch without any attention mask (sdpa's
    causal fast path); its summed loss equals the examples run one by one with their masks,
    and equals the packed rows with a block-diagonal mask."""
    groups, micro = training_units(split.lengths(), 8, 2, "length_groups")
    assert micro == 1
    batches = Batches(split, groups, 0, torch.float32, "sdpa", grouped=True)
    sdpa = model("sdpa")
    with torch.no_grad():
        grouped = sum(
            model_loss_sum(sdpa, batches.make(np.array([g]), torch.device("cpu")),
                           LossConfig("chunked", 4))
            for g in range(len(groups))
        )
        one_by_one = sum(
            model_loss_sum(sdpa, collate_padded(split, [i], pad_id=0), LossConfig("plain"))
            for i in range(len(split))
        )
        rows = pack_examples(split.lengths(), max_length=16)
        masked = Batches(split, rows, 0, torch.float32, "sdpa").make(
            np.arange(len(rows)), torch.device("cpu"))
        with_mask = model_loss_sum(sdpa, masked, LossConfig("plain"))
    first = batches.make(np.array([0]), torch.device("cpu"))
    assert set(first) == {"input_ids", "labels"}
    torch.testing.assert_close(grouped, one_by_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped, with_mask, rtol=1e-5, atol=1e-5)
    assert sum(batches.tokens(np.array([g])) for g in range(len(groups))) == int(
        split.lengths().sum())
