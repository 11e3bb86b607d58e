"""Recipe files YAML allows but a recipe cannot be: each is exit 2 naming the file and line,
never a traceback (found by tests/test_contract_fuzz.py)."""

from __future__ import annotations

import pytest

from tests.conftest import tiny_recipe, write_recipe

LAUGHS = b"a: &a [1,1,1,1,1,1,1,1,1,1]\n" + b"".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n".encode() for p, n in zip("abcde", "bcdef")
)


@pytest.mark.parametrize(
    ("raw", "where", "message"),
    [
        (b"method: full\nmodel: caf\xe9\n", ":2", "not valid UTF-8"),
        (b"method: full\nmodel: \x00\n", ":2", "unacceptable character #x0000"),
        (b"method: !!python/object/apply:os.system [echo]\n", ":1", "could not determine a constructor"),
        (b"a: &a [*a]\n", ":1", "an alias refers to a value that contains it"),
        (b"? [a, b]\n: 1\n", ":1", "a key must be a plain name"),
        (LAUGHS, ":", "more than 100000 values"),
        (b"{" * 3000, ": invalid YAML", "nested too deeply"),
    ],
    ids=["latin-1", "nul", "python-tag", "recursive-alias", "list-key", "billion-laughs", "deep"],
)
def test_odd_yaml_is_a_user_error(cli, tmp_path, raw, where, message):
    path = tmp_path / "r.yaml"
    path.write_bytes(raw)
    code, _, err = cli("check", "--offline", path)
    assert code == 2 and f"{path}{where}" in err and message in err, err
    assert "Traceback" not in err


def test_utf16_recipe_with_bom_is_read(cli, tmp_path):
    text = write_recipe(tmp_path / "u.yaml", tiny_recipe(tmp_path / "run")).read_text()
    path = tmp_path / "r.yaml"
    path.write_bytes(text.encode("utf-16"))
    code, out, err = cli("check", "--offline", path)
    assert code == 0, err
    assert not (tmp_path / "run").exists()


def test_recipe_path_that_is_a_directory(cli, tmp_path):
    code, _, err = cli("check", "--offline", tmp_path)
    assert code == 2 and "is a directory" in err, err


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "full"])
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("hidden_size", float("nan"), "model.architecture.hidden_size: must be a whole number"),
        ("hidden_size", "abc", "model.architecture.hidden_size: must be a whole number"),
        ("vocab_size", None, "model.architecture.vocab_size: must be a whole number"),
        ("num_hidden_layers", True, "model.architecture.num_hidden_layers: must be a whole"),
        ("rope_theta", "abc", "model: the model cannot be built from its config"),
    ],
    ids=["nan", "text", "null", "bool", "rope-text"],
)
def test_architecture_values_of_the_wrong_kind_are_user_errors(cli, tmp_path, key, value,
                                                               message, offline):
    """Found by the fuzz test: these reached DeepSpeed's bucket arithmetic, transformers'
    strict config validation or the model's constructor as tracebacks."""
    if offline and key == "rope_theta":
        pytest.skip("--offline builds no model")
    recipe = tiny_recipe(tmp_path / "run")
    recipe["model"]["architecture"][key] = value
    path = write_recipe(tmp_path / "r.yaml", recipe)
    code, _, err = cli("check", *(["--offline"] if offline else []), path)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
