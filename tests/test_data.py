"""Data formats, prompt masking, overflow, the token cache, the step plan and packing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from launcher.data.tokenized import IGNORE_INDEX, TokenizedSplit
from launcher.data.batch import StepPlan, collate_padded
from launcher.data.pack import block_diagonal_mask, collate_packed, pack_examples
from launcher.data.cache import cache_key
from launcher.data.encode import encode_rows
from launcher.data.pipeline import prepare_data
from launcher.data.read import read_rows
from launcher.errors import UserInputError
from launcher.recipe.sections import DataSection
from tests.conftest import DATA, TINY_LLAMA


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(DATA / "tokenizer"))


def section(**kw) -> DataSection:
    return DataSection.model_validate({"train": str(DATA / "digits_train.jsonl"), "format": "instruction", **kw})


def decode_trained(tok, enc) -> str:
    return tok.decode([t for t, l in zip(enc.input_ids, enc.labels) if l != IGNORE_INDEX])


def test_instruction_masks_prompt(tok):
    rows = read_rows(section().train)[:3]
    encoded, _ = encode_rows(rows, section(), tok)
    for row, enc in zip(rows, encoded):
        assert decode_trained(tok, enc) == f"{row.data['output']} </s>"
        assert enc.labels[0] == IGNORE_INDEX


def test_train_on_prompt_keeps_everything(tok):
    rows = read_rows(section().train)[:2]
    encoded, _ = encode_rows(rows, section(train_on_prompt=True), tok)
    assert all(enc.labels == enc.input_ids for enc in encoded)


@pytest.mark.parametrize("file", ["digits_chat_train.jsonl", "digits_sharegpt_train.jsonl"])
def test_chat_uses_template_and_trains_assistant_only(tok, file):
    cfg = section(format="chat", train=str(DATA / file))
    row = read_rows(cfg.train)[0]
    (enc,), _ = encode_rows([row], cfg, tok)
    turns = row.data.get("messages") or row.data["conversations"]
    answer = (turns[-1].get("content") or turns[-1].get("value"))
    messages = [{"role": {"human": "user", "gpt": "assistant"}.get(t.get("role", t.get("from")), t.get("role", t.get("from"))),
                 "content": t.get("content", t.get("value"))} for t in turns]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert enc.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert decode_trained(tok, enc) == f"{answer} </s>"


def test_multi_turn_trains_every_assistant_turn(tok, tmp_path):
    convo = {"messages": [
        {"role": "system", "content": "you are a helpful calculator"},
        {"role": "user", "content": "add 1 2"}, {"role": "assistant", "content": "three"},
        {"role": "user", "content": "add 2 2"}, {"role": "assistant", "content": "four"},
    ]}
    path = tmp_path / "multi.jsonl"
    path.write_text(json.dumps(convo) + "\n")
    cfg = section(format="chat", train=str(path))
    (enc,), _ = encode_rows(read_rows(cfg.train), cfg, tok)
    assert decode_trained(tok, enc) == "three </s> four </s>"


MARKED_TEMPLATE = (
    "{{ bos_token }} {% for m in messages %}<|{{ m['role'] }}|> {% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] }} {{ eos_token }}{% endgeneration %}"
    "{% else %}{{ m['content'] }} {{ eos_token }}{% endif %} {% endfor %}"
)


def test_a_template_that_marks_generation_trains_what_it_marks(tok, tmp_path):
    """A template with {% generation %} blocks: the trained tokens are transformers'
    assistant mask, the same tokens the prefix rendering finds with the unmarked template;
    in tokenizing processes too; a conversation it cannot render still names its line."""
    convo = {"messages": [
        {"role": "system", "content": "you are a helpful calculator"},
        {"role": "user", "content": "add 1 2"}, {"role": "assistant", "content": "three"},
        {"role": "user", "content": "add 2 2"}, {"role": "assistant", "content": "four"},
    ]}
    path = tmp_path / "multi.jsonl"
    path.write_text(json.dumps(convo) + "\n" + (DATA / "digits_chat_train.jsonl").read_text())
    marked = section(format="chat", train=str(path), chat_template=MARKED_TEMPLATE)
    rows = read_rows(marked.train)
    encoded, _ = encode_rows(rows, marked, tok)
    assert decode_trained(tok, encoded[0]) == "three </s> four </s>"
    mask = tok.apply_chat_template(convo["messages"], tokenize=True, return_dict=True,
                                   return_assistant_tokens_mask=True,
                                   chat_template=MARKED_TEMPLATE)
    assert encoded[0].input_ids == list(mask["input_ids"])
    assert encoded[0].labels == [i if m else IGNORE_INDEX
                                 for i, m in zip(mask["input_ids"], mask["assistant_masks"])]
    unmarked, _ = encode_rows(rows, section(format="chat", train=str(path),
                                            chat_template=MARKED_TEMPLATE.replace(
                                                "{% generation %}", "").replace(
                                                "{% endgeneration %}", "")), tok)
    assert [e.labels for e in encoded] == [e.labels for e in unmarked]
    data = prepare_data(section(format="chat", train=str(path), chat_template=MARKED_TEMPLATE,
                                num_proc=2, cache_dir=str(tmp_path / "c"), validation=None),
                        tok, seed=0)
    assert data.train.labels.tolist() == [t for e in encoded for t in e.labels]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(convo) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]})
        + "\n")
    raising = MARKED_TEMPLATE.replace(
        "{% for m in messages %}",
        "{% for m in messages %}{% if m['content'] == 'x' %}{{ raise_exception('no x') }}{% endif %}")
    with pytest.raises(UserInputError, match=f"{bad}:2: .*no x"):
        encode_rows(read_rows(section(format="chat", train=str(bad)).train),
                    section(format="chat", train=str(bad), chat_template=raising), tok)


def test_named_chat_template_is_used(tok, tmp_path):
    template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"
    cfg = section(format="chat", train=str(DATA / "digits_chat_train.jsonl"), chat_template=template)
    (enc,), _ = encode_rows(read_rows(cfg.train)[:1], cfg, tok)
    assert tok.convert_ids_to_tokens(enc.input_ids[:2]) == ["system", ":"]


def test_overflow_truncate_and_drop_are_counted(tok):
    rows = read_rows(section().train)[:50]
    lengths = [len(e.input_ids) for e in encode_rows(rows, section(), tok)[0]]
    limit = sorted(lengths)[len(lengths) // 2]
    _, dropped = encode_rows(rows, section(max_length=limit, overflow="drop"), tok)
    assert dropped.dropped_too_long == sum(n > limit for n in lengths)
    kept, truncated = encode_rows(rows, section(max_length=limit), tok)
    assert truncated.truncated + truncated.dropped_no_target == sum(n > limit for n in lengths)
    assert max(len(e.input_ids) for e in kept) <= limit


def test_cache_key_tracks_data_and_settings(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text((DATA / "digits_train.jsonl").read_text())
    cfg = section(train=str(path))
    key = cache_key(cfg, tok)
    assert cache_key(section(train=str(path), packing=True), tok) == key
    assert cache_key(section(train=str(path), max_length=32), tok) != key
    path.write_text(path.read_text() + json.dumps({"instruction": "add", "input": "1 1", "output": "two"}) + "\n")
    assert cache_key(cfg, tok) != key


def test_prepare_data_reuses_cache(tok, tmp_path):
    cfg = section(cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    first = prepare_data(cfg, tok, seed=0)
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and len(first.validation) == 400 and len(first.train) == 3600
    second = prepare_data(cfg, tok, seed=0)
    assert np.array_equal(first.train.input_ids, second.train.input_ids)
    assert list((tmp_path / "cache").iterdir()) == entries


def test_step_plan_partitions_global_batches():
    plan = StepPlan(num_units=50, micro_batch_size=2, grad_accum=3, world_size=2, seed=5, shuffle=True)
    assert plan.steps_per_epoch == 4
    seen = []
    for step in range(plan.steps_per_epoch):
        for rank in range(2):
            for micro in plan.micro_batches(step, rank):
                seen.extend(micro.tolist())
    assert len(seen) == len(set(seen)) == 48
    again = StepPlan(50, 2, 3, 2, 5, True)
    assert [m.tolist() for m in again.micro_batches(2, 1)] == [m.tolist() for m in plan.micro_batches(2, 1)]
    assert plan.micro_batches(4, 0)[0].tolist() != plan.micro_batches(0, 0)[0].tolist()


def test_packing_keeps_documents_apart_and_losses_equal():
    """Packed rows give the same per-token losses as the examples run one by one."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}), attn_implementation="sdpa").eval()
    rng = np.random.default_rng(0)
    examples = []
    for n in (5, 9, 3, 7, 11):
        ids = rng.integers(4, 60, n).tolist()
        labels = [IGNORE_INDEX] * 2 + ids[2:]
        examples.append(type("E", (), {"input_ids": ids, "labels": labels})())
    split = TokenizedSplit.from_examples(examples)
    packed = pack_examples(split.lengths(), max_length=20)
    assert all(sum(int(split.lengths()[i]) for i in row) <= 20 for row in packed.rows)
    batch = collate_packed(split, packed, range(len(packed)), pad_id=0)
    mask = block_diagonal_mask(batch.pop("segment_ids"), torch.float32)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask).logits
        packed_losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="none", ignore_index=IGNORE_INDEX)
        plain = collate_padded(split, range(len(split)), pad_id=0)
        plain_logits = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits
        plain_losses = torch.nn.functional.cross_entropy(
            plain_logits[:, :-1].flatten(0, 1), plain["labels"][:, 1:].flatten(), reduction="none", ignore_index=IGNORE_INDEX)
    a = packed_losses[batch["labels"][:, 1:].flatten() != IGNORE_INDEX].sort().values
    b = plain_losses[plain["labels"][:, 1:].flatten() != IGNORE_INDEX].sort().values
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    # perturbing one document leaves every other document's logits unchanged
    changed = batch["input_ids"].clone()
    row0 = packed.rows[0]
    changed[0, 0] = (changed[0, 0] + 1) % 60
    with torch.no_grad():
        after = model(input_ids=changed, position_ids=batch["position_ids"], attention_mask=mask).logits
    first_len = int(split.lengths()[row0[0]])
    assert torch.allclose(after[0, first_len:], logits[0, first_len:], atol=1e-5)
    assert not torch.allclose(after[0, :first_len], logits[0, :first_len])


def test_shipped_tokenizer_is_what_the_generator_writes(tmp_path):
    """recipes/data/tokenizer is regenerated by `python -m launcher.data.synthetic recipes/data`."""
    from launcher.data.synthetic import build_tokenizer

    built = build_tokenizer(tmp_path / "tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (built / name).read_bytes() == (DATA / "tokenizer" / name).read_bytes(), name
