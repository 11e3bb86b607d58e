"""``ftlaunch check --show N`` marks exactly the tokens the loss trains on."""

from __future__ import annotations

import io
import itertools
import re

import pytest

from launcher.data.tokenized import IGNORE_INDEX
from launcher.model.build import load_tokenizer
from launcher.driver.prepare import prepare
from launcher.recipe import load_recipe
from launcher.driver.show import show
from tests.conftest import DATA, tiny_recipe, write_recipe
from tests.test_classification_data import cls_recipe

MARKED = re.compile("⟦(.*?)⟧", re.S)


def examples(out: str) -> list[str]:
    """The example lines of a --show, in order."""
    blocks = re.split(r"--- example \d+ \(\d+ tokens\)\n", out.split("training examples")[1])[1:]
    return [b.split("\n# ")[0].rstrip("\n") for b in blocks]


def check_show(cli, tmp_path, recipe: dict, n: int = 3):
    path = write_recipe(tmp_path / "r.yaml", recipe)
    code, out, err = cli("check", path, "--show", str(n))
    assert code == 0, err
    prepared = prepare(load_recipe(path))
    return out, examples(out), prepared, load_tokenizer(prepared.recipe.model)


def runs(tokenizer, ids, labels, trained: bool) -> list[str]:
    """Decoded runs of consecutive tokens whose label is (not) -100."""
    groups = itertools.groupby(zip(ids.tolist(), labels.tolist()), lambda p: p[1] != IGNORE_INDEX)
    return [tokenizer.decode([i for i, _ in g]) for k, g in groups if k == trained]


@pytest.mark.parametrize(
    "data",
    [
        {"format": "instruction"},
        {"format": "chat", "train": str(DATA / "digits_chat_train.jsonl"), "validation": None},
    ],
    ids=["instruction", "chat"],
)
def test_marks_exactly_the_trained_tokens(cli, tmp_path, data):
    out, shown, prepared, tokenizer = check_show(cli, tmp_path, tiny_recipe(tmp_path / "run", data=data))
    assert len(shown) == 3
    for i, line in enumerate(shown):
        ids, labels = prepared.data.train.example(i)
        assert labels[0] == IGNORE_INDEX  # the prompt comes first: nothing is left out
        assert MARKED.findall(line) == runs(tokenizer, ids, labels, True)
        assert MARKED.sub("", line) == "".join(runs(tokenizer, ids, labels, False))
        assert "Instruction" not in "".join(MARKED.findall(line))
    assert re.search(r"# train lengths \(tokens\): p50 \d+, p90 \d+, p99 \d+, max \d+; train: "
                     r"4000 examples kept of 4000 read \(0 truncated", out)


def test_classification_shows_each_label(cli, tmp_path):
    _, shown, prepared, _ = check_show(cli, tmp_path, cls_recipe(tmp_path), n=4)
    names = ["0", "1"]
    assert [MARKED.findall(line) for line in shown] == [
        [names[int(prepared.data.train.targets[i])]] for i in range(4)
    ]


def test_tagging_shows_each_words_tag(cli, tmp_path):
    recipe = cls_recipe(
        tmp_path, task="token_classification",
        data={"train": str(DATA / "ner_train.jsonl"), "validation": str(DATA / "ner_val.jsonl")},
    )
    _, shown, prepared, _ = check_show(cli, tmp_path, recipe, n=3)
    names = prepared.recipe.labels.names
    assert len(shown) == 3
    for i, line in enumerate(shown):
        _, labels = prepared.data.train.example(i)
        tags = [m.rsplit("/", 1)[1] for m in MARKED.findall(line)]
        assert tags == [names[t] for t in labels.tolist() if t != IGNORE_INDEX]


@pytest.mark.parametrize("bad", ["0", "-1", "x"])
def test_bad_count_exits_2_naming_show(cli, tmp_path, capsys, bad):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    with pytest.raises(SystemExit) as exit_info:
        cli("check", path, f"--show={bad}")
    assert exit_info.value.code == 2
    assert "argument --show" in capsys.readouterr().err


def test_show_needs_the_data(cli, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    code, _, err = cli("check", path, "--offline", "--show", "2")
    assert code == 2 and "--show" in err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_styles_not_brackets(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    prepared = prepare(load_recipe(path))
    stream = Terminal()
    show(prepared.recipe, prepared.data, 1, stream)
    out = stream.getvalue()
    assert "\x1b[" in out and "⟦" not in out and "five" in out
