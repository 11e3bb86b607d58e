"""output_dir in object storage: a real S3-compatible server (moto's, on loopback) and real
runs. Checkpoints commit to the bucket (marker last), a run killed mid-upload resumes from the
newest committed checkpoint with the losses of an uninterrupted run, a fresh machine resumes
from the bucket past a partial and a tampered checkpoint, and final/ is uploaded and loads.

The runs are ``ftlaunch`` processes: the credentials reach the driver and its local Ray's
workers through the environment, as on a cluster whose nodes hold them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.run.store import Store
from launcher.train.metrics import read_metrics
from tests.conftest import ROOT, probe_matches, tiny_recipe, write_recipe

BUCKET = "ftlaunch-test"
SECRET = "moto-secret-0123456789abcdef"  # must appear in no file and no object
STEPS = 8
RUN_TIMEOUT_S = 1200
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3 * RUN_TIMEOUT_S)]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free loopback port; yields the environment that reaches it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    server.stop()


def spec(output_dir: str, **changes):
    from tests.conftest import deep_update

    base = {
        "model": {"architecture": {"attention_dropout": 0.1}},
        "train": {"max_steps": STEPS, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 2,
                  "seed": 5},
        "resources": {"num_workers": 2},
        "checkpoint": {"every_steps": 2, "keep_last": 3},
        "data": {"validation": None},
    }
    return tiny_recipe(Path("unused"), **deep_update(base, changes)) | {"output_dir": output_dir}


def ftlaunch(env: dict, cache: Path, *args) -> subprocess.CompletedProcess:
    """The CLI in a process of its own: its embedded Ray's workers inherit its environment.
    Past the deadline it gets SIGTERM (it then stops its Ray), then SIGKILL."""
    full = os.environ | env | {"FTLAUNCH_CACHE": str(cache), "RAY_DEDUP_LOGS": "0"}
    full.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "launcher.cli", *map(str, args), "--no-progress"]
    proc = subprocess.Popen(command, cwd=ROOT, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def losses(metrics: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(metrics) if "loss" in r]


def objects(store: Store, rel: str = "") -> dict[str, int]:
    return store.listing(rel)


def committed_steps(store: Store) -> list[int]:
    from launcher.checkpoint.remote import committed_steps

    return committed_steps(store)


def download(store: Store, rel: str, dest: Path) -> Path:
    for name in objects(store, rel):
        store.download(f"{rel}/{name}" if rel else name, dest / name)
    return dest


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    """The same recipe on local disk, uninterrupted."""
    from launcher.cli import main

    tmp = tmp_path_factory.mktemp("reference")
    recipe = spec(str(tmp / "run"))
    assert main([str(write_recipe(tmp / "r.yaml", recipe))]) == 0
    return losses(tmp / "run" / "metrics.jsonl")


@pytest.fixture(scope="module")
def killed_run(s3, tmp_path_factory):
    """An S3 run whose rank 0 dies while saving step 6: its shards are uploaded, its marker
    never is. Ray restarts the workers, which resume from the bucket."""
    tmp = tmp_path_factory.mktemp("s3run")
    uri = f"s3://{BUCKET}/runs/killed"
    recipe = spec(uri, checkpoint={"max_failures": 1},
                  resources={"env": {"FTLAUNCH_TEST_FAULT": "save:6"}})
    done = ftlaunch(s3, tmp / "cache", write_recipe(tmp / "r.yaml", recipe))
    assert done.returncode == 0, done.stderr[-4000:]
    return uri, tmp, done


def test_bad_output_dir_exits_2_naming_it(cli, tmp_path):
    for bad, says in [("foo://b/x", "unknown scheme"), ("s3:///x", "names no bucket"),
                      ("s3://B_b/x", "not a valid bucket"), ("gs://bkt/a/../b", "'..'"),
                      ("s3://AKIA:hunter2@bkt/x", "holds credentials")]:
        path = write_recipe(tmp_path / "r.yaml", spec(bad))
        code, _, err = cli("check", path, "--offline")
        assert code == 2 and "output_dir" in err and says in err, err
        assert "hunter2" not in err
    for command in ("runs", "chat"):
        with pytest.raises(SystemExit) as exit_:
            cli(command, f"s3://{BUCKET}/runs/x")
        assert exit_.value.code == 2


def test_killed_mid_upload_resumes_from_bucket_and_exports(killed_run, reference, s3, tmp_path):
    uri, tmp, done = killed_run
    store = Store(uri)
    assert committed_steps(store) == [8, 6, 4]  # keep_last 3, in the bucket
    attempts = [json.loads(x) for x in store.read_text("attempts.jsonl").splitlines()]
    assert [a["resume_step"] for a in attempts] == [0, 4]
    assert any("step_00000006: not committed" in s for s in attempts[1]["skipped"])
    store.download("metrics.jsonl", tmp_path / "metrics.jsonl")
    assert losses(tmp_path / "metrics.jsonl") == pytest.approx(reference, rel=1e-6, abs=1e-6)
    final = objects(store, "final")
    assert "ftlaunch_export.json" in final and "model.safetensors" in final
    assert f"{uri}/final" in done.stderr


def test_final_from_bucket_loads_with_transformers(killed_run, s3, tmp_path):
    from transformers import AutoModelForCausalLM

    uri, _, _ = killed_run
    store = Store(uri)
    local = download(store, "final", tmp_path / "final")
    run = tmp_path / "run"
    store.download("probe.safetensors", run / "probe.safetensors")
    probe_matches(run, AutoModelForCausalLM.from_pretrained(str(local), dtype=torch.float32))


def test_no_secret_in_any_file_or_object(killed_run, s3):
    uri, tmp, done = killed_run
    assert SECRET not in done.stdout + done.stderr
    store = Store(uri)
    for name in objects(store):
        with store.fs.open_input_stream(store.key(name)) as f:
            assert SECRET.encode() not in f.read(), name
    for path in (tmp / "cache").rglob("*"):  # the mirror, the token cache
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.fixture(scope="module")
def fresh_machine_run(killed_run, s3):
    """The finished run, tampered in the bucket, run again by a machine with an empty
    mirror: step 8 lost an object (its marker stayed), step 6 gained an object it never
    committed (a pickle under a name DeepSpeed's loader globs). Both are detected after the
    download and skipped; the run resumes from step 4."""
    uri, tmp, _ = killed_run
    store = Store(uri)
    step8 = objects(store, "checkpoints/step_00000008")
    victim = sorted(n for n in step8 if n.endswith("optim_states.pt"))[0]
    store.delete(f"checkpoints/step_00000008/{victim}")
    marker = tmp / "payload-ran"
    stray = tmp / "stray.pt"
    torch.save({"evil": _Payload(marker)}, stray)
    store.upload(stray, "checkpoints/step_00000006/zero_pp_rank_2_mp_rank_00_optim_states.pt")
    recipe = spec(uri)
    done = ftlaunch(s3, tmp / "cache-fresh", write_recipe(tmp / "r2.yaml", recipe))
    assert done.returncode == 0, done.stderr[-4000:]
    return uri, victim, marker, done


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_fresh_machine_resumes_past_partial_and_tampered(fresh_machine_run, reference, tmp_path):
    uri, victim, marker, done = fresh_machine_run
    store = Store(uri)
    last = [json.loads(x) for x in store.read_text("attempts.jsonl").splitlines()][-1]
    assert last["resume_step"] == 4
    assert "step_00000008" in last["skipped"][0] and f"{victim} is missing" in last["skipped"][0]
    assert "step_00000006" in last["skipped"][1] and "zero_pp_rank_2" in last["skipped"][1]
    assert not marker.exists()  # the stray pickle was never unpickled
    store.download("metrics.jsonl", tmp_path / "metrics.jsonl")
    assert losses(tmp_path / "metrics.jsonl") == pytest.approx(reference, rel=1e-6, abs=1e-6)
    assert committed_steps(store) == [8, 6, 4]
    aside = [n for n in store.children("checkpoints") if n.startswith(".step_00000006.set-aside")]
    assert len(aside) == 1  # the stray object, kept aside, not deleted
    assert objects(store, f"checkpoints/{aside[0]}") .keys() == {
        "zero_pp_rank_2_mp_rank_00_optim_states.pt"}


def test_export_command_on_bucket(fresh_machine_run, s3, cli, tmp_path):
    from transformers import AutoModelForCausalLM

    uri = fresh_machine_run[0]
    code, out, err = cli("export", uri, "--checkpoint", "6", "--out", tmp_path / "six")
    assert code == 0, err
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "six"), dtype=torch.float32)
    code, _, err = cli("export", uri, "--checkpoint", "2")
    assert code == 2 and "no committed checkpoint at step 2" in err
    code, out, err = cli("plot", uri, "--out", tmp_path / "plots")
    assert code == 0 and ".png" in out, err


def test_object_names_that_leave_the_checkpoint_refuse_it(s3, tmp_path):
    """An object key with '..' (or an empty part) under a committed step is never written to
    disk: the step is refused before any download."""
    import boto3

    from launcher.checkpoint import remote

    client = boto3.client("s3")
    for key in ("COMMITTED.json", "x/../../../../escaped"):
        client.put_object(Bucket=BUCKET, Key=f"runs/evil/checkpoints/step_00000002/{key}", Body=b"{}")
    store = Store(f"s3://{BUCKET}/runs/evil")
    root = tmp_path / "mirror" / "checkpoints"
    problem = remote.fetch_step(store, root, "step_00000002", print)
    assert problem and "outside the checkpoint directory" in problem
    assert not list(tmp_path.rglob("escaped")) and not (root / "step_00000002").exists()


def test_final_upload_leaves_objects_ftlaunch_did_not_write(s3, tmp_path):
    from launcher.errors import UserInputError
    from launcher.run.export import EXPORT_MARK, upload_final

    store = Store(f"s3://{BUCKET}/runs/foreign-final")
    store.upload_text("mine", "final/notes.txt")
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text("{}")
    (final / EXPORT_MARK).write_text(json.dumps({"step": 2, "files": ["config.json"]}))
    with pytest.raises(UserInputError, match="notes.txt"):
        upload_final(store, final)
    assert objects(store, "final") == {"notes.txt": 4}  # untouched, nothing half-written
    store.delete("final/notes.txt")
    upload_final(store, final)
    assert set(objects(store, "final")) == {"config.json", EXPORT_MARK}


def test_retention_in_the_bucket_keeps_foreign_objects(s3):
    """Retention deletes only what ftlaunch wrote (the marker first); a step holding
    anything else stays, with a warning."""
    from launcher.checkpoint import remote

    store = Store(f"s3://{BUCKET}/runs/retain")
    for step in (2, 4, 6):
        tag = f"step_{step:08d}"
        manifest = {"files": {"rng_rank00000.safetensors": {"size": 1, "sha256": "0"}}}
        store.upload_text("r", f"checkpoints/{tag}/rng_rank00000.safetensors")
        store.upload_text(json.dumps(manifest), f"checkpoints/{tag}/COMMITTED.json")
    store.upload_text("x", "checkpoints/step_00000002/user-notes.txt")
    store.upload_text("x", "checkpoints/step_00000001/rng_rank00000.safetensors")  # interrupted
    warned: list[str] = []
    remote.retain(store, 1, (), warned.append)
    assert remote.remote_steps(store) == [(6, True), (2, False)]
    assert objects(store, "checkpoints/step_00000002") == {"user-notes.txt": 1}
    assert "user-notes.txt" in warned[0]


def test_preflight_storage_check_goes_through_the_bucket(s3, tmp_path, monkeypatch):
    """On a cluster the storage check proves every node reaches the bucket: the driver's and
    each node's token are objects under output_dir/.preflight/; a node that cannot reach the
    store fails the check, named."""
    import dataclasses

    from launcher.driver.preflight import Node, evaluate, inspect_node
    from launcher.driver.preflight.node import read_token, remove_files, share_of, write_token
    from launcher.recipe.load import validate_recipe

    uri = f"s3://{BUCKET}/runs/preflight"
    two_nodes = {"num_workers": 2, "use_gpu": False, "placement_strategy": "STRICT_SPREAD"}
    recipe = validate_recipe(spec(uri, resources=two_nodes), "r.yaml", {})
    share = share_of(uri)
    write_token(share, "driver-t", "t")
    here = inspect_node(share, "t", "a-t")
    assert here.write_error is None and here.sees_driver_token
    assert here.token_file == f"{share}/node-a-t" and read_token(share, "node-a-t") == "a-t"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    cut_off = inspect_node(share, "t", "b-t")
    assert cut_off.write_error and not cut_off.sees_driver_token
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["AWS_ENDPOINT_URL"])
    nodes = [Node("a" * 56, "10.0.0.1", {"CPU": 1}, True), Node("b" * 56, "10.0.0.2", {"CPU": 1}, False)]
    failures = evaluate(recipe, nodes, {"a" * 56: here, "b" * 56: dataclasses.replace(
        cut_off, write_error=None)}, {"a" * 56: True, "b" * 56: False}, "a" * 56)
    assert [(f.node, f.check) for f in failures] == [("10.0.0.2/bbbbbbbb", "storage")]
    assert "object store" in str(failures[0]) and share in str(failures[0])
    remove_files([here.token_file, f"{share}/driver-t"], [])
    assert objects(Store(uri)) == {}


def test_each_file_is_hashed_and_uploaded_by_a_rank_that_holds_it():
    """On one shared directory the split is the old share(); on node-local disks (ranks 0-1
    on one node, 2-3 on another) every file goes to exactly one rank of a node holding it."""
    from launcher.checkpoint.commit import owned, share

    files = [f"f{i}" for i in range(7)]
    assert [owned([files] * 3, r) for r in range(3)] == [share(files, r, 3) for r in range(3)]
    node_a, node_b = ["a0", "a1", "a2", "m"], ["b0", "b1"]
    listings = [node_a, node_a, node_b, node_b]
    mine = [owned(listings, r) for r in range(4)]
    assert sorted(sum(mine, [])) == sorted(node_a + node_b)
    assert all(set(mine[r]) <= set(listings[r]) for r in range(4))
