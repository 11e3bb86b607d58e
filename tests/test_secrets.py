"""Secrets are never written down: one predicate, checked on the recipe, the DeepSpeed config
and the check printout, with real files and the in-process CLI."""

from __future__ import annotations

import json

import pytest

from launcher.recipe import load_recipe
from launcher.recipe.secrets import is_secret_name, secret_key_paths
from tests.conftest import ROOT, tiny_recipe, write_recipe

PLANTED = "plantedSECRETvalue987"


# --- one predicate ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["HF_TOKEN", "hf_token", "Api-Key", "apiKey", "api_key", "WANDB_API_KEY", "db.password",
     "AWS_SECRET_ACCESS_KEY", "GOOGLE_APPLICATION_CREDENTIALS", "ssh_passphrase",
     "\uff21\uff30\uff29_\uff2b\uff25\uff39", "api key", "x.Token", "API_KEY_2", "github_token",
     "GITHUB_TOKEN", "password", "PASSWORD", "token", "key", "secret", "apikey", "accessKey",
     "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY",
     "secret_value", "DB_PASSWORD_1", "client_secret", "private_key", "SSH_KEY", "auth-token",
     "S3_SECRET_KEY", "passwd", "WANDB_KEY", "hfToken", "x.y.refresh_token"],
)  # fmt: skip
def test_secret_looking_names_in_any_case_and_separator(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name", ["TOKENIZERS_PARALLELISM", "RAY_AUTH_MODE", "NCCL_DEBUG", "max_tokens", "stage",
             "HF_HUB_ENABLE_HF_TRANSFER", "keys_per_shard", "layer_token_lr_schedule",
             "token_budget", "max_new_tokens", "pad_token", "eos_token", "bos_token_id",
             "padTokenId", "sort_key", "cache_key", "label_key", "tokens_per_step",
             "key_dim", "num_key_value_heads", "token_type_ids", "HF_TOKEN_PATH",
             "RAY_AUTH_TOKEN_PATH", "monitor_key", "mask_token", "keys", "TOKENS", ""]
)
def test_settings_are_not_secrets(name: str) -> None:
    assert not is_secret_name(name)


def test_no_shipped_deepspeed_preset_or_recipe_field_looks_secret() -> None:
    for preset in sorted((ROOT / "ds_configs").glob("*.json")):
        assert list(secret_key_paths(json.loads(preset.read_text()), preset.name)) == []
    for recipe in sorted((ROOT / "recipes").rglob("*.yaml")):
        loaded = load_recipe(recipe)
        assert list(secret_key_paths(loaded.deepspeed.overrides, str(recipe))) == []
        assert not any(is_secret_name(name) for name in loaded.resources.env)


# --- secrets never reach recipe.resolved.yaml, ds_config.json or the check printout ------


@pytest.mark.parametrize(
    "override",
    ["deepspeed.overrides.comet.api_key", "deepspeed.overrides.wandb.Api-Key",
     "deepspeed.overrides.monitor.HF_TOKEN"],
)  # fmt: skip
def test_check_refuses_a_secret_override_without_printing_it(cli, tmp_path, override) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    code, out, err = cli("check", recipe, "--offline", "--set", f"{override}={PLANTED}")
    assert code == 2
    assert override in err and "looks like a secret" in err
    assert PLANTED not in out + err


def test_a_secret_in_the_recipe_file_is_refused_with_its_line(cli, tmp_path) -> None:
    raw = tiny_recipe(tmp_path / "run", deepspeed={"overrides": {"comet": {"api_key": PLANTED}}})
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    code, out, err = cli("check", recipe, "--offline")
    assert code == 2 and f"{recipe}:" in err and "deepspeed.overrides.comet.api_key" in err
    assert PLANTED not in out + err


def test_a_secret_in_a_deepspeed_json_file_never_reaches_the_run_directory(cli, tmp_path) -> None:
    config = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    config["comet"] = {"enabled": True, "api_key": PLANTED}
    path = tmp_path / "ds with space #1.json"
    path.write_text(json.dumps(config))
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(run, deepspeed={"config": str(path)}))
    code, out, err = cli("check", recipe, "--offline")
    assert code == 2 and "comet.api_key looks like a secret" in err and str(path) in err
    assert PLANTED not in out + err
    code, out, err = cli(recipe, "--backend", "torchrun")
    assert code == 2 and PLANTED not in out + err
    assert not run.exists()


@pytest.mark.parametrize(
    ("item", "where"),
    [
        (f"deepspeed.overrides.api_key=[{PLANTED}", "--set deepspeed.overrides.api_key"),
        (f"deepspeed.overrides.api_key: {PLANTED}", "--set deepspeed.overrides.api_key"),
        (f"a..b={PLANTED}", "--set a..b"),
        (f"resources.env={{HF_TOKEN: {PLANTED}}}", "resources.env"),
        (f"deepspeed.overrides={{Api-Key: {PLANTED}}}", "deepspeed.overrides.Api-Key"),
        ("train.lr=@x", "--set train.lr"),
    ],
    ids=["bad-yaml", "no-equals", "empty-key", "env-as-mapping", "overrides-as-mapping", "at"],
)
def test_a_bad_or_secret_override_is_exit_2_and_never_echoed(cli, tmp_path, item, where) -> None:
    """A --set value that is not YAML was a traceback quoting the value; now exit 2 naming
    only the key."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    code, out, err = cli("check", recipe, "--offline", "--set", item)
    assert code == 2 and where in err
    assert PLANTED not in out + err
