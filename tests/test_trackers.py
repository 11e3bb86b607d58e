"""Experiment trackers fed by the driver: TensorBoard event files, an MLflow local store and a
W&B offline run, each read back with the tool's own reader, through a crash and a resume; a
tracker whose package is missing; the follower that feeds them.

The W&B run is read from its .wandb file: a LevelDB-log record stream (32 KiB blocks, each
chunk headed by crc32 / length / type) of ``wandb_internal_pb2.Record`` protobufs after a
7-byte ``:W&B`` file header; wandb ships no Python reader for it."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.driver.trackers.base import flatten
from launcher.train.metrics import JsonlSink, read_metrics
from launcher.driver.progress import MetricsFollower
from tests.conftest import ROOT, tiny_recipe, write_recipe

ALL = ["tensorboard", "mlflow", "wandb"]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


# ---------------------------------------------------------------- readers (test side)

def tensorboard_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    events = acc.Scalars(tag)
    assert len({e.step for e in events}) == len(events), "a step is shown twice"
    return {e.step: e.value for e in events}


def tensorboard_text(log_dir: Path, tag: str) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")]


def wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(run_file: Path) -> tuple[str, dict, dict[int, float]]:
    """(run id, config, {step: loss}) of one offline run file."""
    run_id, config, history = "", {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config |= {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "config":
            config |= {i.key: json.loads(i.value_json) for i in record.config.update}
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            if "loss" in items:
                history[items["_step"]] = items["loss"]
    config.pop("_wandb", None)
    return run_id, config, history


def mlflow_view(run_dir: Path, run_id: str) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(run_id)
    runs = client.search_runs([run.info.experiment_id])
    history = client.get_metric_history(run_id, "loss")
    return client, run, runs, history


# ---------------------------------------------------------------- the run

@pytest.fixture(scope="module")
def crashed_and_resumed(tmp_path_factory):
    """Six steps, checkpoints every two, rank 0 crashing as step 6 starts (after step 5 was
    logged, step 4 committed): the rerun resumes at step 4 and trains steps 5 and 6 again."""
    from launcher.cli import main

    tmp = tmp_path_factory.mktemp("trackers")
    run_dir = tmp / "run"
    recipe = tiny_recipe(
        run_dir, train={"max_steps": 6}, checkpoint={"every_steps": 2},
        resources={"env": {"FTLAUNCH_TEST_FAULT": "crash:5"}},
        logging={"trackers": ALL, "wandb": {"mode": "offline", "tags": ["t1"]},
                 "mlflow": {"tags": {"team": "ft"}}},
    )
    path = write_recipe(tmp / "r.yaml", recipe)
    saved = {k: os.environ.pop(k) for k in ("MLFLOW_TRACKING_URI", "WANDB_DIR", "WANDB_MODE")
             if k in os.environ}
    try:
        assert main([str(path), "--backend", "torchrun"]) == 1
        first = {"state": json.loads((run_dir / "trackers.json").read_text()),
                 "losses": losses(run_dir)}
        assert main([str(path), "--backend", "torchrun"]) == 0
    finally:
        os.environ.update(saved)
    return run_dir, first


@pytest.mark.e2e
def test_the_crash_and_resume_fed_the_trackers_the_steps_metrics_jsonl_holds(crashed_and_resumed):
    run_dir, first = crashed_and_resumed
    assert sorted(first["losses"]) == [1, 2, 3, 4, 5]
    final = losses(run_dir)
    assert sorted(final) == [1, 2, 3, 4, 5, 6]
    assert json.loads((run_dir / "trackers.json").read_text()) == first["state"]  # same runs


@pytest.mark.e2e
def test_tensorboard_holds_each_step_once_and_the_recipe(crashed_and_resumed):
    run_dir, _ = crashed_and_resumed
    tb = run_dir / "tensorboard"
    assert tensorboard_scalars(tb, "loss") == pytest.approx(losses(run_dir), rel=1e-6)
    eval_loss = {r["step"]: r["eval_loss"] for r in read_metrics(run_dir / "metrics.jsonl")
                 if "eval_loss" in r}
    assert tensorboard_scalars(tb, "eval_loss") == pytest.approx(eval_loss, rel=1e-6)
    resolved = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    texts = tensorboard_text(tb, "recipe")
    assert len(texts) == 2  # the first start and the resume
    assert yaml.safe_load(texts[-1].strip().removeprefix("```yaml").removesuffix("```")) == resolved
    info = tensorboard_text(tb, "artifacts/run_info.json")[-1]
    assert json.loads(info.strip().removeprefix("```json").removesuffix("```")) == json.loads(
        (run_dir / "run_info.json").read_text())
    assert tensorboard_text(tb, "status") == ["failed", "finished"]


@pytest.mark.e2e
def test_mlflow_continues_one_run_with_the_recipe_as_params(crashed_and_resumed):
    run_dir, first = crashed_and_resumed
    run_id = first["state"]["mlflow"]["run_id"]
    client, run, runs, history = mlflow_view(run_dir, run_id)
    assert [r.info.run_id for r in runs] == [run_id]
    assert run.info.status == "FINISHED" and run.data.tags["team"] == "ft"
    resolved = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    assert run.data.params == {k: str(v) for k, v in flatten(resolved).items()}
    latest: dict[int, float] = {}
    for m in sorted(history, key=lambda m: m.timestamp):
        latest[m.step] = m.value
    assert latest == pytest.approx(losses(run_dir), rel=1e-9)
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 5, 6]  # step 5 trained twice
    assert {f.path for f in client.list_artifacts(run_id)} >= {
        "ds_config.json", "run_info.json", "metrics.jsonl", "recipe.resolved.yaml"}
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(run_dir)


@pytest.mark.e2e
def test_wandb_offline_resumes_the_same_run_from_the_resume_point(crashed_and_resumed):
    run_dir, first = crashed_and_resumed
    run_id = first["state"]["wandb"]["id"]
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(d.name.endswith(f"-{run_id}") for d in offline)
    resolved = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    final = losses(run_dir)
    seen_ids, histories = set(), []
    for d in offline:
        rid, config, history = wandb_run(d / f"run-{run_id}.wandb")
        seen_ids.add(rid)
        assert config == resolved
        histories.append(history)
    assert seen_ids == {run_id}
    assert histories[0] == pytest.approx(first["losses"], rel=1e-9)
    assert histories[1] == pytest.approx({s: final[s] for s in (5, 6)}, rel=1e-9)
    assert (offline[1] / "files" / "run_info.json").is_file()


@pytest.mark.e2e
def test_a_restart_inside_one_ray_driver_is_logged_once_per_step(ray_cluster, cli, tmp_path):
    """Ray Train restarts the crashed worker from step 4 in the same driver: the rewritten
    metrics.jsonl still reaches the trackers, TensorBoard shows each step once."""
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(
        run_dir, train={"max_steps": 6}, checkpoint={"every_steps": 2, "max_failures": 1},
        resources={"env": {"FTLAUNCH_TEST_FAULT": "crash:5"}},
        logging={"trackers": ["tensorboard", "mlflow"]},
    )
    code, _, err = cli(write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 0, err
    assert len((run_dir / "attempts.jsonl").read_text().splitlines()) == 2  # it did restart
    final = losses(run_dir)
    assert sorted(final) == [1, 2, 3, 4, 5, 6]
    assert tensorboard_scalars(run_dir / "tensorboard", "loss") == pytest.approx(final, rel=1e-6)
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"]
    _, run, runs, history = mlflow_view(run_dir, run_id)
    assert len(runs) == 1 and run.info.status == "FINISHED"
    assert {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)} == (
        pytest.approx(final, rel=1e-9))


# ---------------------------------------------------------------- no run needed

def test_a_tracker_without_its_package_exits_2_before_anything_starts(tmp_path):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(run_dir, logging={"trackers": ALL}))
    line = recipe.read_text().splitlines().index("  - mlflow") + 1
    hide = "import sys; sys.modules['mlflow'] = None; from launcher.cli import main; "
    for command in ("train", "check"):
        proc = subprocess.run(
            [sys.executable, "-c", hide + f"sys.exit(main([{command!r}, {str(recipe)!r}]))"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
        )
        assert proc.returncode == 2, proc.stderr
        assert f"{recipe}:{line}: logging.trackers.1: the mlflow tracker needs mlflow" in proc.stderr
        assert "pip install 'ftlaunch[mlflow]'" in proc.stderr
        assert not run_dir.exists()


def test_the_follower_hands_out_new_and_retrained_steps_once(tmp_path):
    """A resumed worker rewrites metrics.jsonl (cut back to its resume step) and appends past
    the old size before the driver looks again: the retrained steps still reach the
    consumers, the kept ones do not come again."""
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path, 0)
    for step in (1, 2, 3):
        sink.write({"step": step, "loss": 1.0 / step})
    sink.close()
    got: list[dict] = []
    follower = MetricsFollower(tmp_path, [got.append], interval=3600)
    with follower:
        sink = JsonlSink(path, 2)  # the resumed worker: keeps steps 1 and 2
        for step in (3, 4, 5, 6):
            sink.write({"step": step, "loss": 2.0 / step, "note": "retrained"})
        sink.close()
    assert got == [{"step": s, "loss": 2.0 / s, "note": "retrained"} for s in (3, 4, 5, 6)]


def test_submit_sends_no_tracker_credentials(tmp_path, monkeypatch):
    from launcher.jobs import submit
    from launcher.recipe import validate_recipe

    monkeypatch.setenv("WANDB_API_KEY", "planted-wandb-key")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "planted-mlflow-password")
    recipe = validate_recipe(tiny_recipe(tmp_path / "run", logging={"trackers": ALL}))
    job = submit.build_job(recipe, Path("r.yaml"), [], None, tmp_path, [], {}, None)
    sent = json.dumps([job.entrypoint, job.runtime_env, job.metadata])
    assert "planted" not in sent
