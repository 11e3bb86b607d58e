"""Errors found while preparing a run (they need the model config, tokenizer or data) name
the recipe's file:line, as the schema errors do, or the --set / --output-dir that set the
field. On main they named the field path alone."""

from __future__ import annotations

from pathlib import Path

from launcher.driver.locations import field_location
from tests.conftest import tiny_recipe, write_recipe


def _recipe(tmp_path: Path, **changes) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tmp_path / "run", **changes))


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_prepare_errors_name_the_recipe_line(cli, tmp_path) -> None:
    recipe = _recipe(tmp_path, data={"max_length": 4096})  # beyond the model's 128 positions
    code, _, err = cli("check", recipe)
    assert code == 2, err
    assert f"recipe.yaml:{_line_of(recipe, 'max_length')}: data.max_length: 4096 exceeds" in err
    assert not (tmp_path / "run").exists()


def test_a_field_set_on_the_command_line_names_the_flag(cli, tmp_path) -> None:
    recipe = _recipe(tmp_path)
    code, _, err = cli("check", recipe, "--set", "data.max_length=4096")
    assert code == 2 and "error: --set data.max_length: 4096 exceeds" in err, err
    code, _, err = cli(recipe, "--set", "data.max_length=4096", "--backend", "torchrun")
    assert code == 2 and "error: --set data.max_length: 4096 exceeds" in err, err
    assert not (tmp_path / "run").exists()


def test_field_location_table(tmp_path) -> None:
    recipe = _recipe(tmp_path, lora={"target_modules": ["q_proj", "v_proj"]})
    lora = _line_of(recipe, "target_modules")
    assert field_location("lora.target_modules[1]", recipe, [], None).startswith(
        f"{recipe}:{lora + 2}: "
    )
    assert field_location("model.tokenizer", recipe, [], None) == (
        f"{recipe}:{_line_of(recipe, 'tokenizer')}: model.tokenizer"
    )
    assert field_location("output_dir", recipe, [], "/x") == "--output-dir"
    assert field_location("model.revision", recipe, [], None) == (
        f"{recipe}:{_line_of(recipe, 'model:')}: model.revision"  # unset: its section's line
    )
    assert field_location("/data/rows.jsonl:3", recipe, [], None) is None  # already a place
    assert field_location("--checkpoint", recipe, [], None) is None
