"""Shared fixtures: the shipped tiny tokenizer and data, a recipe builder, the CLI in-process,
and one real local Ray cluster for every end-to-end test."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.recipe.ds_config import deep_merge as deep_update

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "recipes" / "data"
TINY_LLAMA = {
    "model_type": "llama", "vocab_size": 66, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def tiny_recipe(output_dir: Path, **changes: Any) -> dict[str, Any]:
    base = {
        "output_dir": str(output_dir),
        "method": "full",
        "model": {"architecture": TINY_LLAMA, "tokenizer": str(DATA / "tokenizer"), "dtype": "fp32"},
        "data": {
            "train": str(DATA / "digits_train.jsonl"),
            "validation": str(DATA / "digits_val.jsonl"),
            "format": "instruction",
            "max_length": 64,
        },
        "train": {"max_steps": 4, "micro_batch_size": 4, "lr": 1e-3, "seed": 1},
        "deepspeed": {"config": "zero2"},
        "resources": {"num_workers": 1, "use_gpu": False},
        "logging": {"progress": False},
    }
    return deep_update(base, changes)


def probe_matches(run_dir: Path, model: Any) -> None:
    """The reloaded model gives the logits the worker recorded at the end of training."""
    import torch
    from safetensors.torch import load_file

    probe = load_file(str(run_dir / "probe.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-4, rtol=1e-4)


def initial_adapter(run_dir: Path) -> dict[str, Any]:
    """The adapter (and any new head) as the worker initialised it before the first step: the
    same seed, model and peft wrapping, so a saved tensor equal to its entry here never trained."""
    import torch
    from peft import get_peft_model_state_dict

    from launcher.model.adapters import apply_adapter
    from launcher.model.build import build_model, load_tokenizer
    from launcher.tasks.base import load_task_config
    from launcher.run.rundir import load_resolved

    recipe = load_resolved(run_dir)
    tokenizer = load_tokenizer(recipe.model)
    config = load_task_config(recipe, tokenizer.pad_token_id)
    torch.manual_seed(recipe.train.seed)
    model = apply_adapter(build_model(recipe.model, config, "sdpa", recipe.task), recipe)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def adapter_moved(run_dir: Path) -> None:
    """Every tensor of the exported adapter differs from its initial value. Not for ZeRO-3 runs:
    there the worker initialises inside ``zero.Init`` and draws other random numbers."""
    import json

    import torch
    from safetensors.torch import load_file

    stage = json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"]
    assert stage != 3, "initial_adapter cannot reproduce a ZeRO-3 initialisation"

    saved = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    initial = initial_adapter(run_dir)
    assert saved.keys() == initial.keys(), (sorted(saved), sorted(initial))
    still = [k for k in saved if torch.equal(saved[k], initial[k])]
    assert not still, f"adapter tensors never trained: {still}"


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def cli(capsys):
    """Run ``ftlaunch`` in-process; returns (exit code, stdout, stderr)."""
    from launcher.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster shared by the end-to-end tests."""
    import ray

    from launcher.driver.orchestrate import start_local_ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    start_local_ray(num_cpus=4)
    yield ray
    ray.shutdown()


def train_recipe(name: str, run_dir: Path, *overrides: str, backend: str = "ray") -> Path:
    """Train the shipped ``recipes/cpu/NAME.yaml`` into ``run_dir`` through the real CLI."""
    from launcher.cli import main

    args = [str(ROOT / "recipes" / "cpu" / f"{name}.yaml"), "--output-dir", str(run_dir),
            "--no-progress", "--backend", backend]
    for override in overrides:
        args += ["--set", override]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.setenv("FTLAUNCH_CACHE", str(run_dir.parent / "cache"))
        assert main(args) == 0
    return run_dir


@pytest.fixture(scope="session")
def sentiment_run(ray_cluster, tmp_path_factory):
    """The shipped sentiment BERT recipe trained once (2 workers, ZeRO-2, 40 steps) for every test
    that reads a trained sentiment classifier. Tests using it carry
    ``@pytest.mark.xdist_group("sentiment")`` so that under pytest-xdist one worker trains it."""
    return train_recipe("sentiment_bert", tmp_path_factory.mktemp("sentiment") / "run")



@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (--dist loadgroup) the tests that share a module-scoped fixture of
    their own module (a trained run) go to one worker, so the run is trained once, not once per
    worker. Fixtures used together join one group (a test of ``a`` and ``b`` and one of ``b``
    and ``c`` put ``a``, ``b`` and ``c`` on one worker). Runs before xdist reads the groups."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    shared: dict[int, list[str]] = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None or item.get_closest_marker("xdist_group"):
            continue
        module_id = item.nodeid.split("::")[0]
        keys = [f"{module_id}::{name}" for name in info.names_closure
                if (defs := info.name2fixturedefs.get(name))
                and defs[-1].scope == "module" and defs[-1].baseid == module_id]
        for key in keys:
            parent[root(key)] = root(keys[0])
        if keys:
            shared[id(item)] = keys
    names: dict[str, str] = {}  # a group's name: the first of its fixtures, in sorted order
    for key in sorted(parent):
        names.setdefault(root(key), key)
    for item in items:
        if id(item) in shared:
            item.add_marker(pytest.mark.xdist_group(names[root(shared[id(item)][0])]))
    if getattr(config.option, "numprocesses", None):
        # xdist hands out the groups first, then single tests in this order: the long runs
        # first and the short tests last, so that the two workers end together. Whole modules
        # carry the marks, so each module's tests stay together (and its fixtures built once).
        items.sort(key=lambda item: not any(map(item.get_closest_marker, ("e2e", "slow"))))
