"""Chat templates with ``{% generation %}`` blocks: the labels ftlaunch builds from the
rendered spans are exactly transformers' ``return_assistant_tokens_mask``, for any text, on a
word-level and a byte-level BPE tokenizer (offsets of different kinds: words split at spaces,
and bytes of multi-byte characters that share one character's offsets)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from launcher.data.encode import make_encoder
from launcher.data.marked_chat import trained_labels
from launcher.data.tokenized import IGNORE_INDEX
from launcher.recipe.sections import DataSection
from tests import test_contract_fuzz  # noqa: F401  (registers and loads the hypothesis profile)
from tests.conftest import DATA


TEMPLATES = {
    "spaced": (
        "{{ bos_token }} {% for m in messages %}<|{{ m['role'] }}|> "
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} {{ eos_token }}"
        "{% endgeneration %}{% else %}{{ m['content'] }} {{ eos_token }}{% endif %} {% endfor %}"
    ),
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
        "{%- generation -%}{{ m['content'] }}<|im_end|>{%- endgeneration -%}"
        "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    ),
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    texts = ["add one two three four", "the sum of ten and five is fifteen",
             "héllo wörld 日本語 🙂"]
    bpe.train_from_iterator(texts * 50, vocab_size=400,
                            special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    byte_level = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                         pad_token="<pad>")
    return {"word": AutoTokenizer.from_pretrained(str(DATA / "tokenizer")),
            "byte-bpe": byte_level}


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40) | (
    st.sampled_from(
    ["", " ", "  two  ", "</s>", "<|im_end|>", "a</s>b", "\n\n", "🙂🙂", "e\u0301", "add 1 2"]))
TURN = st.tuples(TEXT, TEXT)  # a user turn and the assistant's answer


@given(system=st.none() | TEXT, turns=st.lists(TURN, min_size=1, max_size=4),
       template=st.sampled_from(sorted(TEMPLATES)), kind=st.sampled_from(["word", "byte-bpe"]))
def test_labels_are_transformers_assistant_mask(tokenizers, system, turns, template, kind):
    tok, chat_template = tokenizers[kind], TEMPLATES[template]
    messages = [{"role": "system", "content": system}] if system is not None else []
    for question, answer in turns:
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": answer}]
    cfg = DataSection.model_validate({"train": "unused.jsonl", "format": "chat",
                                      "chat_template": chat_template, "max_length": 100_000})
    encoder = make_encoder(cfg, tok, None)
    assert encoder.marked
    (enc,) = encoder.encode([{"messages": messages}], ["row 1"])
    want = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                   return_assistant_tokens_mask=True, chat_template=chat_template)
    assert enc.input_ids == list(want["input_ids"])
    assert enc.labels == [t if m else IGNORE_INDEX
                          for t, m in zip(want["input_ids"], want["assistant_masks"])]


def test_a_token_across_two_spans_and_an_empty_span_are_handled():
    """Offsets as a tokenizer gives them: a token that straddles the end of one span and the
    start of the next is trained once; an empty span trains only a token that covers it."""
    ids = [10, 11, 12, 13, 14]
    offsets = [(0, 2), (2, 5), (5, 9), (9, 9), (9, 12)]
    assert trained_labels(ids, offsets, [(3, 4), (4, 6)]) == [-100, 11, 12, -100, -100]
    assert trained_labels(ids, offsets, [(7, 7)]) == [-100, -100, 12, -100, -100]
    assert trained_labels(ids, offsets, [(9, 9)]) == [-100] * 5
    assert trained_labels(ids, offsets, [(0, 12)]) == ids
    assert trained_labels(ids, offsets, []) == [-100] * 5


def test_a_slow_tokenizer_is_refused_by_name():
    """The blocks are found through token offsets, which only a fast tokenizer gives."""
    from transformers import ByT5Tokenizer  # a tokenizer with no Rust backend: no offsets

    from launcher.errors import UserInputError

    cfg = DataSection.model_validate({"train": "unused.jsonl", "format": "chat",
                                      "chat_template": TEMPLATES["spaced"]})
    encoder = make_encoder(cfg, ByT5Tokenizer(), None)
    messages = [{"role": "user", "content": "add one two"},
                {"role": "assistant", "content": "three"}]
    with pytest.raises(UserInputError, match="model.tokenizer.*fast tokenizer"):
        encoder.encode([{"messages": messages}], ["row 1"])


def test_train_on_prompt_trains_every_token_of_a_marked_conversation(tokenizers):
    cfg = DataSection.model_validate({"train": "unused.jsonl", "format": "chat",
                                      "chat_template": TEMPLATES["chatml"],
                                      "train_on_prompt": True})
    messages = [{"role": "user", "content": "add one two"},
                {"role": "assistant", "content": "three"}]
    (enc,) = make_encoder(cfg, tokenizers["byte-bpe"], None).encode([{"messages": messages}],
                                                                    ["row 1"])
    assert enc.labels == enc.input_ids and len(enc.input_ids) > 5
