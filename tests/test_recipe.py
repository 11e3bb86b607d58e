"""The recipe schema: shipped recipes, overrides, defaults and cross-field rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher.errors import UserInputError
from launcher.recipe import Recipe, load_recipe
from tests.conftest import ROOT, tiny_recipe, write_recipe

SHIPPED = sorted((ROOT / "recipes").rglob("*.yaml"))


def from_hub(path: Path) -> bool:
    """Recipes whose model is not built from an architecture load weights from a hub."""
    return "architecture" not in (yaml.safe_load(path.read_text()).get("model") or {})


LOCAL = [p for p in SHIPPED if not from_hub(p)]
HUB = [p for p in SHIPPED if from_hub(p)]


def test_recipes_are_shipped():
    assert (ROOT / "recipes" / "quickstart.yaml") in SHIPPED
    assert len(LOCAL) >= 4 and len(HUB) >= 2


@pytest.mark.parametrize("path", LOCAL, ids=lambda p: str(p.relative_to(ROOT)))
def test_local_recipe_checks_fully(path, cli, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = cli("check", path)
    assert code == 0, err
    assert "train_batch_size" in out and "examples kept" in err


@pytest.mark.parametrize("path", HUB, ids=lambda p: str(p.relative_to(ROOT)))
def test_hub_recipe_checks_offline(path, cli):
    code, out, err = cli("check", "--offline", path)
    assert code == 0, err
    assert '"stage"' in out


def test_set_overrides_coerce_types(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    recipe = load_recipe(path, ["train.lr=5e-4", "train.max_steps=9", "model.gradient_checkpointing=true"])
    assert recipe.train.lr == 5e-4 and recipe.train.max_steps == 9
    assert recipe.model.gradient_checkpointing is True


def test_recipe_is_frozen(tmp_path):
    recipe = Recipe.model_validate(tiny_recipe(tmp_path))
    with pytest.raises(Exception):
        recipe.train.lr = 1.0  # type: ignore[misc]


def test_lora_defaults_when_method_is_lora(tmp_path):
    recipe = Recipe.model_validate(tiny_recipe(tmp_path, method="lora"))
    assert recipe.lora is not None and recipe.lora.target_modules == "all-linear"


def test_duplicate_key_names_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("output_dir: a\nmethod: full\ntrain:\n  lr: 1\n  lr: 2\n")
    with pytest.raises(UserInputError) as e:
        load_recipe(path)
    assert e.value.where == f"{path}:5" and "train.lr" in e.value.message


def test_field_error_names_path_and_line(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, train={"lr": "fast"}))
    with pytest.raises(UserInputError) as e:
        load_recipe(path)
    assert "train.lr" in str(e.value) and f"{path}:" in str(e.value)


def test_misspelled_key_suggests(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["train"]["learning_rate"] = 1e-4
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with pytest.raises(UserInputError) as e:
        load_recipe(path)
    assert "train.learning_rate" in str(e.value) and "unknown field" in str(e.value)


@pytest.mark.parametrize(("override", "where", "message"), [
    ("train.lr=.inf", "--set train.lr", "finite number"),
    ("train.lr=1e309", "--set train.lr", "finite number"),  # a float that overflows to inf
    ("train.weight_decay=.nan", "--set train.weight_decay", "finite number"),
    ("resources.cpus_per_worker=.inf", "--set resources.cpus_per_worker", "finite number"),
    ("train.betas=[1.0, 0.9]", "--set train.betas: train.betas.0", "less than 1"),
    ("train.betas=[0.9, -0.5]", "--set train.betas: train.betas.1", "greater than or equal"),
    ("train.seed=-1", "--set train.seed", "greater than or equal to 0"),  # numpy refuses it
    ("train.seed=9223372036854775808", "--set train.seed", "less than"),
])
def test_numbers_no_optimizer_or_generator_takes_exit_2_naming_the_flag(
    override, where, message, tmp_path, cli
):
    """These passed the schema (inf passes gt=0; NaN, the unbounded betas and seed had no
    rule) and failed in the workers: NaN losses, AdamW's ValueError, numpy's negative seed."""
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    code, _, err = cli("check", path, "--offline", "--set", override)
    assert code == 2, err
    assert f"ftlaunch: error: {where}: " in err and message in err, err


def test_an_infinite_number_in_the_file_names_its_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run")).replace("lr: ", "lr: .inf #", 1))
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "lr: .inf" in t)
    with pytest.raises(UserInputError) as e:
        load_recipe(path)
    assert str(e.value) == f"{path}:{line}: train.lr: Input should be a finite number"
