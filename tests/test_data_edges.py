"""Data at the edges: odd files through `ftlaunch check`, the token cache key and its
integrity, refused setting combinations, and chat masking under real chat templates."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

from launcher.data.tokenized import IGNORE_INDEX, Row
from launcher.data.cache import cache_key
from launcher.data.encode import encode_rows
from launcher.data.pipeline import prepare_data
from launcher.recipe.sections import DataSection, LabelsSection
from launcher.data.synthetic import save_word_level_tokenizer
from tests.conftest import DATA, tiny_recipe, write_recipe

ROW = {"instruction": "add", "input": "1 2", "output": "three"}
LINE = json.dumps(ROW)


def check(cli, tmp_path, **changes):
    return cli("check", write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tmp_path / "run", **changes)))


def with_train(path: Path, **data) -> dict:
    return {"data": {"train": str(path), "validation": None, "val_fraction": 0.25,
                     "max_length": 64, **data},
            "train": {"micro_batch_size": 1}}


# ---------------------------------------------------------------- files through ftlaunch check


REFUSED_JSONL = {
    "latin1.jsonl": (LINE.encode() + b"\n" + '{"instruction": "caf\xe9"}'.encode("latin-1") + b"\n", ":2: not UTF-8"),
    "array.jsonl": (LINE.encode() + b"\n[1, 2]\n", ":2: each line must be a JSON object, got an array"),
    "number.jsonl": (b"3\n", ":1: each line must be a JSON object, got a number"),
    "null.jsonl": (LINE.encode() + b"\n" * 3 + b"null\n", ":4: each line must be a JSON object, got null"),
    "empty.jsonl": (b"", "no usable training examples"),
}


@pytest.mark.parametrize("name", sorted(REFUSED_JSONL))
def test_bad_jsonl_exits_2_with_file_line(cli, tmp_path, name):
    content, expected = REFUSED_JSONL[name]
    path = tmp_path / name
    path.write_bytes(content)
    code, _, err = check(cli, tmp_path, **with_train(path))
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert str(path) in err


ACCEPTED_JSONL = {
    "bom.jsonl": codecs.BOM_UTF8 + ((LINE + "\n") * 8).encode(),
    "crlf.jsonl": (LINE + "\r\n") * 8 + "\r\n",
    "trailing blank.jsonl": (LINE + "\n") * 8 + "\n\n",
}


@pytest.mark.parametrize("name", sorted(ACCEPTED_JSONL))
def test_valid_jsonl_variants_are_read(cli, tmp_path, name):
    content = ACCEPTED_JSONL[name]
    folder = tmp_path / "my data #1"
    folder.mkdir()
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = check(cli, tmp_path, **with_train(path))
    assert code == 0, err
    assert "train: 6 examples kept of 6 read" in err


def test_a_directory_named_like_a_file_is_refused(cli, tmp_path):
    (tmp_path / "train.jsonl").mkdir()
    code, _, err = check(cli, tmp_path, **with_train(tmp_path / "train.jsonl"))
    assert code == 2 and "directory holds no" in err


TINY_BERT = {"model_type": "bert", "vocab_size": 66, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64}


def csv_check(cli, tmp_path, content: bytes):
    path = tmp_path / "train #1.csv"
    path.write_bytes(content)
    recipe = {
        "task": "sequence_classification",
        "model": {"architecture": TINY_BERT},
        "data": {"train": str(path), "validation": None, "val_fraction": 0.25,
                 "format": "classification", "fields": {"text": "sentence"}, "max_length": 32},
        "train": {"micro_batch_size": 1},
    }
    return path, check(cli, tmp_path, **recipe)


def test_csv_numeric_text_and_class_indices(cli, tmp_path):
    """A text column of numbers is text (it was refused as "got int"); integer labels are
    class indices; a BOM, CRLF and a trailing blank line are fine."""
    rows = ["123,1", "4.5,0", "007,1", "9,0", "10,1", "11,0", "12,1", "13,0"]
    text = "sentence,label\r\n" + "\r\n".join(rows) + "\r\n\r\n"
    _, (code, out, err) = csv_check(cli, tmp_path, codecs.BOM_UTF8 + text.encode())
    assert code == 0, err
    assert "names:\n  - '0'\n  - '1'\n" in out  # labels.names resolved from class indices
    assert "train: 6 examples kept of 6 read" in err


@pytest.mark.parametrize("content, expected", [
    (b'sentence,label\n"add\none",pos\n"two",neg\nthree,pos,extra\n',
     ":5: 3 fields, but the header line has 2"),
    (b'sentence,label\none,pos\n"two"x,neg\n', ":3: malformed CSV"),
    (b'sentence,label\none,pos\n"two,neg\n', ":3: malformed CSV"),
    (b"", "empty CSV file"),
    (b"sentence,label\none,pos\ncaf\xe9,neg\n", ":3: not UTF-8"),
])
def test_bad_csv_exits_2_with_the_line(cli, tmp_path, content, expected):
    path, (code, _, err) = csv_check(cli, tmp_path, content)
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert str(path) in err


def test_long_inline_chat_template_and_literal_braces_in_prompt(cli, tmp_path):
    template = ("{{ bos_token }} {% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
                "{{ eos_token }} {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
                "{# a comment long enough to exceed a file name's 255 bytes " + "x" * 200 + " #}")
    code, _, err = check(cli, tmp_path, data={
        "train": str(DATA / "digits_chat_train.jsonl"), "validation": str(DATA / "digits_chat_val.jsonl"),
        "format": "chat", "chat_template": template})
    assert code == 0, err
    code, _, err = check(cli, tmp_path, data={"prompt_template": 'answer as {"sum": ...} : {instruction} {input}'})
    assert code == 0, err


def test_mistyped_chat_template_path_is_refused(cli, tmp_path):
    code, _, err = check(cli, tmp_path, data={
        "train": str(DATA / "digits_chat_train.jsonl"), "format": "chat",
        "chat_template": str(tmp_path / "templates" / "chat.jinja")})
    assert code == 2 and "data.chat_template" in err and "neither an existing file" in err


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_packing_with_virtual_tokens_is_refused(cli, tmp_path, method):
    code, _, err = check(cli, tmp_path, method=method, data={"packing": True})
    assert code == 2 and "data.packing" in err and method in err, err


@pytest.mark.parametrize("data", [
    {"train_on_prompt": True},
    {"format": "text", "train": str(DATA / "digits_text_train.jsonl"), "validation": None,
     "val_fraction": 0.1},
])
def test_exact_match_without_a_prompt_is_refused(cli, tmp_path, data):
    code, _, err = check(cli, tmp_path, data=data, eval={"exact_match": {"num_examples": 4}})
    assert code == 2 and "eval.exact_match" in err, err


# ---------------------------------------------------------------- the token cache


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(DATA / "tokenizer"))


def chat_section(path: Path, template: Path, **kw) -> DataSection:
    return DataSection(train=str(path), format="chat", chat_template=str(template), **kw)


def test_cache_key_covers_template_contents_seed_and_fields(tok, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text((DATA / "tokenizer" / "chat_template.jinja").read_text())
    cfg = chat_section(DATA / "digits_chat_train.jsonl", template, val_fraction=0.1)
    key = cache_key(cfg, tok, seed=1)
    assert cache_key(cfg, tok, seed=1) == key
    assert cache_key(cfg, tok, seed=2) != key  # which rows are held out
    template.write_text(template.read_text().replace("<|", "<| "))
    assert cache_key(cfg, tok, seed=1) != key
    plain = DataSection(train=str(DATA / "digits_train.jsonl"), format="instruction")
    assert cache_key(plain, tok, seed=1) == cache_key(plain, tok, seed=2)  # no split: no seed
    renamed = DataSection(train=str(DATA / "digits_train.jsonl"), format="instruction",
                          fields={"output": "answer"})
    assert cache_key(renamed, tok) != cache_key(plain, tok)
    cls = DataSection(train=str(DATA / "sentiment_train.csv"), format="classification")
    assert cache_key(cls, tok, LabelsSection(names=["a", "b"])) != cache_key(
        cls, tok, LabelsSection(names=["b", "a"]))


def test_cache_key_covers_tokenizer_contents_fast_and_slow(tmp_path):
    words = ["<pad>", "<unk>", "<s>", "</s>", "add", "one"]
    a = AutoTokenizer.from_pretrained(str(save_word_level_tokenizer(words, tmp_path / "a")))
    b = AutoTokenizer.from_pretrained(str(save_word_level_tokenizer(words[::-1], tmp_path / "b")))
    cfg = DataSection(train=str(DATA / "digits_train.jsonl"), format="instruction")
    assert cache_key(cfg, a) != cache_key(cfg, b)
    a2 = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert cache_key(cfg, a2) == cache_key(cfg, a)
    a2.add_tokens(["<|extra|>"], special_tokens=True)
    assert cache_key(cfg, a2) != cache_key(cfg, a)
    slow = []
    for name, vocab in (("s1", "[PAD]\n[UNK]\nadd\none\n"), ("s2", "[PAD]\n[UNK]\none\nadd\n")):
        (tmp_path / f"{name}.txt").write_text(vocab)
        slow.append(BertTokenizerLegacy(vocab_file=str(tmp_path / f"{name}.txt")))
    assert not slow[0].is_fast
    assert cache_key(cfg, slow[0]) != cache_key(cfg, slow[1])


def test_hub_dataset_without_revision_is_not_cached(tok):
    cfg = DataSection(train={"path": "someone/dataset"}, format="instruction")
    assert cache_key(cfg, tok) is None
    pinned = DataSection(train={"path": "someone/dataset", "revision": "abc123"}, format="instruction")
    assert cache_key(pinned, tok) is not None


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_corrupt_cache_entry_is_rebuilt(tok, tmp_path, damage):
    cfg = DataSection(train=str(DATA / "digits_train.jsonl"), format="instruction",
                      val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    mapped = prepare_data(cfg, tok, seed=0)
    # the splits are memory-mapped from the entry this test damages in place: keep a copy
    first = type(mapped)(*(type(s)(*(None if a is None else np.array(a) for a in (
        s.input_ids, s.labels, s.offsets, s.targets, s.token_type_ids))) for s in (
        mapped.train, mapped.validation)), mapped.stats)
    (entry,) = (tmp_path / "cache").iterdir()
    target = entry / ("meta.json" if damage == "meta" else "train.input_ids.npy")
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[:10]
    target.write_bytes(bytes(data))
    again = prepare_data(cfg, tok, seed=0)
    assert np.array_equal(again.train.input_ids, first.train.input_ids)
    assert np.array_equal(again.validation.labels, first.validation.labels)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [entry.name]
    third = prepare_data(cfg, tok, seed=0)  # the rebuilt entry is intact and used
    assert np.array_equal(third.train.offsets, first.train.offsets)


def test_corrupt_cache_entry_through_check(cli, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run", data={
        "cache_dir": str(tmp_path / "cache")}))
    assert cli("check", recipe)[0] == 0
    (entry,) = (tmp_path / "cache").iterdir()
    (entry / "validation.input_ids.npy").write_bytes(b"garbage")
    code, _, err = cli("check", recipe)
    assert code == 0, err


# ---------------------------------------------------------------- chat masking


CHAT_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|im_start|>", "<|im_end|>"]
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_GENERATION_PROMPT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


@pytest.fixture(scope="module")
def chat_tok():
    t = AutoTokenizer.from_pretrained(str(DATA / "tokenizer"))
    t.add_tokens(CHAT_SPECIALS, special_tokens=True)
    return t


def trained_tokens(chat_tok, template, messages):
    cfg = DataSection(train="x.jsonl", format="chat", chat_template=template)
    (enc,), _ = encode_rows([Row({"messages": messages}, "x.jsonl:1")], cfg, chat_tok)
    tokens = chat_tok.convert_ids_to_tokens(enc.input_ids)
    return tokens, [t for t, label in zip(tokens, enc.labels) if label != IGNORE_INDEX]


CONVO = [{"role": "user", "content": "add 1 2"}, {"role": "assistant", "content": "three"},
         {"role": "user", "content": "add 2 2"}, {"role": "assistant", "content": "four"}]
FIRST_ASSISTANT = [{"role": "assistant", "content": "what sum ?"},
                   {"role": "user", "content": "add 1 2"}, {"role": "assistant", "content": "three"}]


@pytest.mark.parametrize("template, eot", [(LLAMA3, "<|eot_id|>"), (CHATML, "<|im_end|>"),
                                           (NO_GENERATION_PROMPT, "<|im_end|>")])
@pytest.mark.parametrize("messages", [CONVO, FIRST_ASSISTANT], ids=["user-first", "assistant-first"])
def test_only_assistant_content_and_end_of_turn_train(chat_tok, template, eot, messages):
    tokens, trained = trained_tokens(chat_tok, template, messages)
    expected = []
    for m in messages:
        if m["role"] == "assistant":
            expected += m["content"].split() + [eot]
    assert trained == expected, tokens
    assert "<unk>" not in tokens


def test_template_whose_turn_hides_the_content_is_refused(cli, tmp_path):
    template = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] | upper }} {% endfor %}"
    code, _, err = check(cli, tmp_path, data={
        "train": str(DATA / "digits_chat_train.jsonl"), "validation": None, "val_fraction": 0.1,
        "format": "chat", "chat_template": template})
    assert code == 2 and "digits_chat_train.jsonl:1" in err and "add_generation_prompt" in err, err


# ---------------------------------------------------------------- every format names the place


def _array_file(path: Path) -> Path:
    """A pretty-printed JSON array: row 2 (lacking "output") starts on line 7."""
    path.write_text(json.dumps([ROW, {"instruction": "add", "input": "2 2"}, ROW], indent=1))
    assert path.read_text().splitlines()[6].strip() == "{"
    return path


@pytest.mark.parametrize(
    ("name", "expected"),
    [("rows.json", "rows.json:7: "), ("rows.parquet", "rows.parquet:row 2: "),
     ("lines.json", "lines.json:row 2: ")],
)  # fmt: skip
def test_every_format_names_the_row_as_a_user_finds_it(cli, tmp_path, name, expected):
    """JSON arrays name the line the element starts on; Parquet (and JSON Lines read under a
    .json name) the row counted from 1, as JSON Lines and CSV count lines. On main a JSON
    array and Parquet said 'row 1' for the second row."""
    path = tmp_path / name
    rows = [ROW, {"instruction": "add", "input": "2 2"}, ROW, ROW]
    if name == "rows.json":
        _array_file(path)
    elif name == "rows.parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([{**ROW, "output": r.get("output")} for r in rows])
        pq.write_table(table, path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = check(cli, tmp_path, **with_train(path))
    assert code == 2, err
    assert expected in err, err


@pytest.mark.parametrize(
    ("content", "expected"),
    [("[\n" + LINE + ",\n" + LINE + "\n", ":3: malformed JSON: the array is not closed"),
     ("[\n" + LINE + "\n" + LINE + "\n]", ":3: malformed JSON: expected ','"),
     ("[\n" + LINE + ",\n  {\"instruction\": oops}\n]", ":3: malformed JSON"),
     ("[\n" + LINE + ",\n 7\n]", ":3: row 2 must be a JSON object, got a number"),
     ("[" + LINE + "]\n[]", ":2: malformed JSON: extra data after the array")],
    ids=["unclosed", "missing-comma", "bad-value", "not-an-object", "trailing"],
)  # fmt: skip
def test_bad_json_array_exits_2_with_the_line(cli, tmp_path, content, expected):
    path = tmp_path / "rows.json"
    path.write_text(content)
    code, _, err = check(cli, tmp_path, **with_train(path))
    assert code == 2, err
    assert f"rows.json{expected}" in err, err
