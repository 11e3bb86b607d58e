"""Bad recipes and data: exit code 2, a message naming the field or file:line, and no run
directory left behind. Runs the real CLI in-process on the torchrun backend, whose validation
is the Ray backend's; nothing reaches Ray (on Ray, the launch would start an embedded Ray
beside the validation and shut it down after the error: tests/test_embedded_ray.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import DATA, tiny_recipe, write_recipe


def _jsonl(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def _tokenizer_without_template(tmp: Path) -> str:
    target = tmp / "tok-no-template"
    shutil.copytree(DATA / "tokenizer", target)
    (target / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return str(target)


GOOD_ROW = json.dumps({"instruction": "add", "input": "1 2", "output": "three"})

CASES = {
    "misspelled key": (lambda t: {"train": {"lerning_rate": 1e-4}}, ["train.lerning_rate", "unknown field"]),
    "wrong type": (lambda t: {"train": {"max_steps": "many"}}, ["train.max_steps"]),
    "inconsistent batch": (
        lambda t: {"train": {"global_batch_size": 10}}, ["train.global_batch_size", "= 4"]),
    "lora target matches nothing": (
        lambda t: {"method": "lora", "lora": {"target_modules": ["q_proj", "qkv_fused"]}},
        ["lora.target_modules", "qkv_fused"]),
    "sequence too long": (lambda t: {"data": {"max_length": 4096}}, ["data.max_length", "128"]),
    "unknown preset": (lambda t: {"deepspeed": {"config": "zero9"}}, ["deepspeed.config", "zero9"]),
    "preset contradicts recipe": (
        lambda t: {"deepspeed": {"overrides": {"train_micro_batch_size_per_gpu": 7}}},
        ["train_micro_batch_size_per_gpu=7"]),
    "malformed jsonl line": (
        lambda t: {"data": {"train": _jsonl(t / "bad.jsonl", [GOOD_ROW, GOOD_ROW, '{"instruction": '])}},
        ["bad.jsonl:3", "malformed JSON"]),
    "row missing a field": (
        lambda t: {"data": {"train": _jsonl(t / "miss.jsonl", [GOOD_ROW, '{"instruction": "add"}'])}},
        ["miss.jsonl:2", "output"]),
    "empty dataset": (lambda t: {"data": {"train": _jsonl(t / "empty.jsonl", [])}}, ["empty.jsonl", "no usable"]),
    "all rows dropped": (
        lambda t: {"data": {"max_length": 4, "overflow": "drop"}}, ["dropped as too long"]),
    "chat data without template": (
        lambda t: {"model": {"tokenizer": _tokenizer_without_template(t)},
                   "data": {"format": "chat", "train": str(DATA / "digits_chat_train.jsonl"),
                            "validation": str(DATA / "digits_chat_val.jsonl")}},
        ["data.chat_template", "no chat template"]),
    "missing file": (lambda t: {"data": {"train": str(t / "nope.jsonl")}}, ["nope.jsonl", "not found"]),
    "flash attention on cpu": (lambda t: {"model": {"attention": "flash_attention_2"}}, ["model.attention"]),
    "flex attention on cpu": (lambda t: {"model": {"attention": "flex"}}, ["model.attention", "CPU"]),
    "lora section without lora": (lambda t: {"lora": {"r": 4}}, ["method: lora"]),
    "keep_last of one": (lambda t: {"checkpoint": {"keep_last": 1}}, ["checkpoint.keep_last"]),
    "fp16 on cpu": (lambda t: {"model": {"dtype": "fp16"}}, ["fp16"]),
    "fewer examples than a batch": (
        lambda t: {"data": {"train": _jsonl(t / "two.jsonl", [GOOD_ROW, GOOD_ROW])}}, ["data.train", "global batch"]),
    "trust_remote_code unpinned": (
        lambda t: {"model": {"architecture": None, "tokenizer": None, "name_or_path": str(t),
                             "trust_remote_code": True}}, ["revision"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_and_leaves_nothing(case, tmp_path, cli):
    changes, expected = CASES[case]
    run_dir = tmp_path / "run"
    path = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(run_dir, **changes(tmp_path)))
    code, _, err = cli(path, "--backend", "torchrun")
    assert code == 2, err
    for text in expected:
        assert text in err, f"{text!r} not in: {err}"
    assert not run_dir.exists()


def test_missing_recipe_file(cli, tmp_path):
    code, _, err = cli(tmp_path / "absent.yaml")
    assert code == 2 and "absent.yaml" in err


def test_bad_set_override(cli, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    code, _, err = cli(path, "--set", "train.lr")
    assert code == 2 and "KEY=VALUE" in err


def test_resume_with_changed_recipe_is_refused(cli, tmp_path):
    from launcher.driver.prepare import prepare
    from launcher.recipe import Recipe
    from launcher.run.rundir import write_run_files

    run_dir = tmp_path / "run"
    first = prepare(Recipe.model_validate(tiny_recipe(run_dir)))
    write_run_files(run_dir, first.recipe, first.ds_config)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(run_dir, train={"lr": 0.5}))
    code, _, err = cli(path, "--backend", "torchrun")
    assert code == 2 and "train.lr: 0.001 -> 0.5" in err
    assert not (run_dir / "checkpoints").exists()


def test_user_input_error_survives_the_trip_from_a_worker():
    """Raised in a Ray worker, the error reaches the driver by pickle; without its own
    reduce, unpickling re-calls __init__ with one argument and Ray reports a TypeError."""
    import pickle

    from launcher.errors import UserInputError

    back = pickle.loads(pickle.dumps(UserInputError("checkpoint.resume_from", "none is intact")))
    assert (back.where, back.message) == ("checkpoint.resume_from", "none is intact")
    assert str(back) == "checkpoint.resume_from: none is intact"


def test_a_stop_is_remembered_for_its_command_only():
    """SIGTERM inside signals_raise raises Terminated and is remembered; the next command in
    the same process starts with no stop recorded, so its own errors stay errors."""
    import os
    import signal

    import pytest

    from launcher.driver.stop import Terminated, signal_received, signals_raise

    with pytest.raises(Terminated), signals_raise():
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()
    assert signal_received() == signal.SIGTERM
    with signals_raise():
        assert signal_received() is None


def test_the_executable_passes_main_s_exit_code_and_leaves_the_collector_frozen(tmp_path):
    """``ftlaunch`` (launcher.cli.entry) exits with main's code, and freezes the objects the
    command built so the interpreter's exit does not collect them all (1.6-2 s; measured in
    benchmarks/startup.py). In a subprocess: frozen objects stay in this process."""
    import subprocess
    import sys

    probe = ("import gc, sys; from launcher.cli import entry; code = entry(); "
             "print('frozen', gc.get_freeze_count() > 0); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "missing.yaml" in done.stderr and done.stdout.strip() == "frozen True"


@pytest.mark.parametrize(("command", "given"), [
    ("train", "--address"), ("train", "RAY_ADDRESS"), ("preflight", "--address"),
    ("plan", "--address")])
def test_a_cluster_address_where_nothing_answers_is_named_at_once(command, given, tmp_path, cli,
                                                                   monkeypatch):
    """Ray itself would wait ~60 s and then terminate the driver from C++."""
    import socket

    with socket.socket() as s:  # a port nobody listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    run_dir = tmp_path / "run"
    path = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(run_dir))
    args = [command, path]
    if given == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", address)
    else:
        args += ["--address", address]
    code, _, err = cli(*args)
    assert code == 2, err
    assert f"{given}: no Ray cluster answers at {address}" in err
    assert not run_dir.exists()


@pytest.mark.parametrize("command", ["preflight", "plan"])
def test_a_dead_address_is_named_even_with_ray_already_up_in_the_process(command, tmp_path, cli,
                                                                        ray_cluster):
    """In-process callers (a notebook, these tests) may hold a Ray session already; the address
    the user named is still the one checked, not silently replaced by the session's."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    assert ray_cluster.is_initialized()
    path = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tmp_path / "run"))
    code, _, err = cli(command, path, "--address", address)
    assert code == 2, err
    assert f"--address: no Ray cluster answers at {address}" in err
