"""Remote code only when pinned: the checks run on local directories and hub-shaped ids that
are refused before any hub is reached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.tasks.distill import check_teacher
from launcher.errors import UserInputError
from launcher.model.build import check_remote_code_pins, load_model_config, load_tokenizer
from launcher.recipe.sections import ModelSection
from launcher.recipe import load_recipe
from tests.conftest import DATA, TINY_LLAMA, tiny_recipe, write_recipe

COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --- remote code only when pinned ---------------------------------------------------------


def _local_model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    return path


def test_local_directories_need_no_commit(tmp_path) -> None:
    model = _local_model(tmp_path / "model dir #1")
    check_remote_code_pins(
        ModelSection(name_or_path=str(model), trust_remote_code=True, revision="local")
    )
    check_remote_code_pins(
        ModelSection(architecture=TINY_LLAMA, tokenizer=str(DATA / "tokenizer"),
                     trust_remote_code=True, revision="x")  # fmt: skip
    )
    config = load_model_config(
        ModelSection(name_or_path=str(model), trust_remote_code=True, revision="local")
    )
    assert config.hidden_size == TINY_LLAMA["hidden_size"]


@pytest.mark.parametrize(
    ("model", "field"),
    [
        ({"name_or_path": "org/model", "revision": "main"}, "model.revision"),
        ({"name_or_path": "org/model", "revision": "v1.0"}, "model.revision"),
        ({"name_or_path": "org/model", "revision": COMMIT, "tokenizer": "org/tok"},
         "model.tokenizer"),
        ({"architecture": TINY_LLAMA, "tokenizer": "org/tok", "revision": COMMIT},
         "model.tokenizer"),
    ],
    ids=["branch", "tag", "other-tokenizer-repo", "architecture-with-hub-tokenizer"],
)  # fmt: skip
def test_remote_code_from_an_unpinned_hub_repo_is_refused(model, field) -> None:
    cfg = ModelSection(**model, trust_remote_code=True)
    with pytest.raises(UserInputError) as info:
        check_remote_code_pins(cfg)
    assert info.value.where == field
    with pytest.raises(UserInputError) as info:  # the loaders refuse before reaching a hub
        load_tokenizer(cfg)
    assert info.value.where == field and "cannot load" not in str(info.value)


def test_a_pinned_hub_model_passes_and_no_remote_code_needs_no_pin() -> None:
    check_remote_code_pins(ModelSection(name_or_path="org/model", revision=COMMIT,
                                        trust_remote_code=True))  # fmt: skip
    check_remote_code_pins(ModelSection(name_or_path="org/model", tokenizer="org/tok"))


def test_a_distillation_teacher_never_runs_its_code(tmp_path) -> None:
    """The teacher is loaded without trust_remote_code: a teacher that ships code is refused
    (exit 2) and its code does not run."""
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    marker = tmp_path / "code-ran"
    (teacher / "configuration_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    (teacher / "config.json").write_text(
        json.dumps(
            {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}
        )
    )
    raw = tiny_recipe(tmp_path / "run", method="distill", distill={"teacher": str(teacher)})
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", raw))
    with pytest.raises(UserInputError) as info:
        check_teacher(recipe, load_model_config(recipe.model))
    assert info.value.where == "distill.teacher"
    assert not marker.exists()


# --- an export of a remote-code model reloads with the recipe's trust ---------------------

CONFIG_CODE = """from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny_custom"
"""
MODEL_CODE = """from transformers import LlamaForCausalLM

from .configuration_tiny_custom import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
"""


def _remote_code_model(path: Path) -> Path:
    """A local model directory whose config and model classes are code it ships."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(str(path))
    (path / "configuration_tiny_custom.py").write_text(CONFIG_CODE)
    (path / "modeling_tiny_custom.py").write_text(MODEL_CODE)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "tiny_custom"
    config["architectures"] = ["TinyCustomForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
        "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM",
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_remote_code_model_exports_and_reloads(cli, tmp_path, method) -> None:
    """A local model directory with remote code trains and exports: the export's reload check
    loads it with the recipe's trust_remote_code (it failed with 'requires you to execute the
    configuration file' before), and the export loads the way a user loads it."""
    from transformers import AutoModelForCausalLM

    model_dir = _remote_code_model(tmp_path / "custom model")
    recipe = tiny_recipe(tmp_path / "run", method=method, train={"max_steps": 2})
    recipe["model"] = {"name_or_path": str(model_dir), "tokenizer": str(DATA / "tokenizer"),
                       "revision": "local", "trust_remote_code": True, "dtype": "fp32"}  # fmt: skip
    code, _, err = cli(write_recipe(tmp_path / "r.yaml", recipe), "--backend", "torchrun")
    assert code == 0, err
    final = tmp_path / "run" / "final"
    if method == "full":
        model = AutoModelForCausalLM.from_pretrained(str(final), trust_remote_code=True)
        assert type(model).__name__ == "TinyCustomForCausalLM"
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True)
        model = PeftModel.from_pretrained(base, str(final))
    from tests.conftest import probe_matches

    probe_matches(tmp_path / "run", model.eval())
