"""Hang diagnosis: a rank that sleeps inside a step yields every rank's stacks under hang/."""

from __future__ import annotations

import re

import pytest

from launcher.recipe import ResourcesSection
from tests.conftest import tiny_recipe, write_recipe

SLEEPING = {"FTLAUNCH_TEST_FAULT": "sleep_step:2", "FTLAUNCH_TEST_SLEEP_S": "20"}


def hang_recipe(run_dir, **resources):
    return tiny_recipe(
        run_dir, train={"max_steps": 4, "micro_batch_size": 4, "lr": 1e-3},
        deepspeed={"config": "zero1"}, data={"validation": None},
        resources={"num_workers": 2, "hang_dump_s": 5, "env": SLEEPING} | resources,
    )


def dumps_of_one_event(run_dir, err):
    events = [p for p in (run_dir / "hang").iterdir() if not p.name.startswith(".")]
    assert len(events) == 1, events
    event = events[0]
    assert re.fullmatch(r"\d{8}T\d{6}Z", event.name)
    assert f"no step for 5 s: stacks of every rank in {event}/" in err
    assert sorted(p.name for p in event.iterdir()) == ["rank0.txt", "rank1.txt"]
    return (event / "rank0.txt").read_text(), (event / "rank1.txt").read_text()


def check_stacks(waiting: str, sleeping: str) -> None:
    assert re.search(r'faults\.py", line \d+ in sleep_in_step', sleeping), sleeping
    assert "in fault_point" in sleeping
    assert "sleep_in_step" not in waiting
    assert "in all_reduce" in waiting and "in train_step" in waiting, waiting


@pytest.mark.e2e
def test_sleeping_rank_under_torchrun(cli, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = cli(write_recipe(tmp_path / "r.yaml", hang_recipe(run_dir)), "--backend", "torchrun")
    assert code == 0, err
    check_stacks(*dumps_of_one_event(run_dir, err))
    assert not list((run_dir / "hang").glob(".rank*.live"))  # the ranks' own files are gone


@pytest.mark.e2e
def test_sleeping_rank_under_ray(cli, tmp_path, ray_cluster):
    run_dir = tmp_path / "run"
    code, _, err = cli(write_recipe(tmp_path / "r.yaml", hang_recipe(run_dir)))
    assert code == 0, err
    check_stacks(*dumps_of_one_event(run_dir, err))


def test_no_dump_when_off(cli, tmp_path):
    run_dir = tmp_path / "run"
    recipe = hang_recipe(run_dir, hang_dump_s=0, env={})
    code, _, err = cli(write_recipe(tmp_path / "r.yaml", recipe), "--backend", "torchrun")
    assert code == 0, err
    assert not (run_dir / "hang").exists()


def test_dump_must_come_before_the_collective_timeout(cli, tmp_path):
    recipe = tiny_recipe(tmp_path / "run", resources={"collective_timeout_s": 60, "hang_dump_s": 60})
    code, _, err = cli("check", write_recipe(tmp_path / "r.yaml", recipe), "--offline")
    assert code == 2
    assert "resources.hang_dump_s" in err and "collective_timeout_s (60 s)" in err


def test_default_stays_below_a_short_timeout():
    assert ResourcesSection().hang_dump_s == 300
    assert ResourcesSection(collective_timeout_s=15).hang_dump_s == 7.5
