"""ftlaunch submit / jobs against a real local Ray head with its job server, token auth on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.jobs import submit
from launcher.errors import UserInputError
from launcher.recipe import validate_recipe
from tests.conftest import DATA, tiny_recipe, write_recipe
from tests.raynodes import RAY, LocalRayCluster

PLANTED = "plantedsecret123"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    head = LocalRayCluster(tmp_path_factory.mktemp("jobs"), dashboard=True)
    try:
        head.start_head(num_cpus=2, resources="node_a")
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def project(cluster) -> Path:
    """A directory like a user's checkout: a recipe with relative paths to local data."""
    root = cluster.base / "project"
    (root / "data").mkdir(parents=True)
    for name in ("digits_train.jsonl", "digits_val.jsonl"):
        shutil.copy(DATA / name, root / "data" / name)
    shutil.copytree(DATA / "tokenizer", root / "data" / "tokenizer")
    recipe = tiny_recipe(cluster.base / "shared" / "quick", eval={"at_end": False})
    recipe["model"]["tokenizer"] = "data/tokenizer"
    recipe["data"]["train"] = "data/digits_train.jsonl"
    recipe["data"]["validation"] = "data/digits_val.jsonl"
    (root / "recipes").mkdir()
    write_recipe(root / "recipes" / "quick.yaml", recipe)
    return root


def ftlaunch(cluster, *args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *map(str, args)],
        cwd=cwd or cluster.base,
        env=env or cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def job_record(cluster, job_id: str) -> str:
    """Everything the job server stores about a job, and its logs, as text."""
    code = (
        "from ray.job_submission import JobSubmissionClient;"
        f"c = JobSubmissionClient({cluster.dashboard_url!r});"
        f"print(c.get_job_info({job_id!r}).model_dump_json()); print(c.get_job_logs({job_id!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


@pytest.mark.e2e
def test_submit_wait_trains_and_ships_no_secret(cluster, project):
    env = cluster.env | {"HF_TOKEN": PLANTED, "WANDB_API_KEY": PLANTED}
    result = ftlaunch(
        cluster,
        "submit",
        "recipes/quick.yaml",
        "--address",
        cluster.dashboard_url,
        "--wait",
        "--env",
        "FTLAUNCH_JOB_MARK=1",
        cwd=project,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    job_id = result.stdout.strip().splitlines()[0]
    assert job_id.startswith("ftlaunch-quick-")
    assert "[ftlaunch] model exported and verified" in result.stdout  # the followed logs
    run_dir = cluster.base / "shared" / "quick"
    assert (run_dir / "final" / "config.json").is_file()

    record = job_record(cluster, job_id)
    info = json.loads(record.splitlines()[0])
    assert info["status"].endswith("SUCCEEDED")
    assert info["entrypoint"] == "ftlaunch recipes/quick.yaml"
    assert info["runtime_env"]["env_vars"] == {"FTLAUNCH_JOB_MARK": "1"}
    for secret in (PLANTED, cluster.token):
        assert secret not in record
        assert secret not in (run_dir / "recipe.resolved.yaml").read_text()
        assert secret not in result.stdout + result.stderr


@pytest.mark.e2e
def test_submitting_the_same_recipe_again_is_one_job(cluster, project):
    args = ("submit", "recipes/quick.yaml", "--address", cluster.dashboard_url)
    first = ftlaunch(cluster, *args, cwd=project)
    second = ftlaunch(cluster, *args, cwd=project)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout
    assert "already submitted" in second.stderr
    listed = ftlaunch(cluster, "jobs", "list", "--address", cluster.dashboard_url)
    assert listed.stdout.count(first.stdout.strip()) == 1, listed.stdout


@pytest.mark.e2e
def test_ray_job_submit_runs_ftlaunch_and_jobs_stop_stops_it(cluster, project):
    recipe = tiny_recipe(cluster.base / "shared" / "long", train={"max_steps": 100000})
    write_recipe(project / "long.yaml", recipe)
    address = ("--address", cluster.dashboard_url)
    subprocess.run(
        [
            RAY,
            "job",
            "submit",
            *address,
            "--no-wait",
            "--submission-id",
            "long-1",
            "--working-dir",
            str(project),
            "--entrypoint-num-cpus",
            "0",
            "--",
            "ftlaunch",
            "long.yaml",
        ],
        env=cluster.env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    wait_for(
        lambda: "starting run" in ftlaunch(cluster, "jobs", "logs", "long-1", *address).stdout,
        timeout=180,
        what="training to start",
    )
    assert ftlaunch(cluster, "jobs", "status", "long-1", *address).stdout.startswith(
        "long-1: RUNNING"
    )
    stopped = ftlaunch(cluster, "jobs", "stop", "long-1", *address)
    assert stopped.returncode == 0 and stopped.stdout.strip() == "long-1: STOPPED", stopped
    status = ftlaunch(cluster, "jobs", "status", "long-1", *address)
    assert status.stdout.startswith("long-1: STOPPED")
    missing = ftlaunch(cluster, "jobs", "status", "no-such-job", *address)
    assert missing.returncode == 2 and "no such job" in missing.stderr


def test_remote_address_without_token_auth_is_refused_before_connecting(cli, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    remote = "https://203.0.113.7:8265"  # TEST-NET-3: never reached, the refusal comes first
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    code, _, err = cli("submit", recipe, "--address", remote)
    assert code == 2
    assert "RAY_AUTH_MODE is not 'token'" in err and "--insecure" in err

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token"))
    code, _, err = cli("submit", recipe, "--address", remote)
    assert code == 2 and "no token was found" in err


TOKEN_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "t"}


def test_insecure_or_loopback_or_https_with_a_token_lets_the_submission_through():
    remote = "http://203.0.113.7:8265"
    submit.check_transport(remote, insecure=True, env={})
    submit.check_transport("http://127.0.0.1:8265", insecure=False, env={})
    submit.check_transport("http://localhost:8265", insecure=False, env={})
    submit.check_transport("https://203.0.113.7", False, TOKEN_ENV)
    with pytest.raises(UserInputError):
        submit.check_transport("http://[::2]:8265", insecure=False, env={})
    with pytest.raises(UserInputError, match="no token was found"):
        submit.check_transport("https://203.0.113.7", False, {"RAY_AUTH_MODE": "token",
                               "RAY_AUTH_TOKEN_PATH": "/nonexistent/token"})  # fmt: skip


@pytest.mark.parametrize(
    "command",
    [["submit", "RECIPE"], ["jobs", "list"], ["jobs", "status", "x"], ["jobs", "logs", "x"],
     ["jobs", "stop", "x"]],
    ids=lambda c: " ".join(c),
)
def test_a_token_over_plain_http_to_another_machine_is_refused(
    cli, tmp_path, monkeypatch, command
):
    """The token would cross the network in clear text: refused before any connection, for
    submit and for every jobs command, unless --insecure."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", PLANTED)
    argv = [str(recipe) if a == "RECIPE" else a for a in command]
    code, out, err = cli(*argv, "--address", "http://203.0.113.7:8265")
    assert code == 2, err
    assert "plain http://" in err and "--insecure" in err and "SSH tunnel" in err
    assert PLANTED not in out + err


def test_credentials_in_the_address_are_refused_without_echoing_them(cli, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    code, out, err = cli("submit", recipe, "--address", f"http://me:{PLANTED}@127.0.0.1:9")
    assert code == 2 and "credentials in the URL" in err
    assert PLANTED not in out + err
    code, out, err = cli("submit", recipe, "--address", "http://127.0.0.1:9", "--env", f"={PLANTED}")
    assert code == 2 and "--env: expected KEY=VALUE" in err
    assert PLANTED not in out + err


@pytest.mark.parametrize(
    "name",
    ["HF_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "hf_token", "ApiKey"],
)
def test_secret_env_is_refused_with_a_pointer_to_the_docs(cli, tmp_path, name):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    code, _, err = cli("submit", recipe, "--address", "http://127.0.0.1:9", "--env", f"{name}=x")
    assert code == 2
    assert f"--env {name}: looks like a secret" in err and "README.md" in err
    with pytest.raises(UserInputError, match=f"resources.env: {name} looks like a secret"):
        validate_recipe(tiny_recipe(tmp_path / "run", resources={"env": {name: "x"}}))


def test_settings_that_merely_mention_tokens_are_not_secrets(tmp_path):
    assert submit.parse_env(["TOKENIZERS_PARALLELISM=false"]) == {"TOKENIZERS_PARALLELISM": "false"}
    validate_recipe(tiny_recipe(tmp_path, resources={"env": {"TOKENIZERS_PARALLELISM": "false"}}))


def test_relative_output_dir_is_refused(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(Path("runs/x")))
    code, _, err = cli("submit", "r.yaml", "--address", "http://127.0.0.1:9")
    assert code == 2 and "output_dir: 'runs/x' is relative" in err
    assert recipe.is_file()


def test_working_dir_holds_the_recipe_and_its_local_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    shutil.copytree(DATA / "tokenizer", tmp_path / "tok")
    raw = tiny_recipe(tmp_path / "run")
    raw["data"]["train"] = "data/train.jsonl"
    raw["model"]["tokenizer"] = "tok"
    recipe = validate_recipe(raw)
    files = submit.local_files(recipe)
    assert files == {"model.tokenizer": Path("tok"), "data.train.path": Path("data/train.jsonl")}
    (tmp_path / "cfg").mkdir()
    path = write_recipe(tmp_path / "cfg" / "r.yaml", raw)
    rel = submit.recipe_in_working_dir(path)
    with submit.staged_working_dir(path, rel, files) as staged:
        shipped = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    assert "cfg/r.yaml" in shipped and "data/train.jsonl" in shipped
    assert any(p.startswith("tok/") for p in shipped)
    assert submit.submission_id(recipe) == submit.submission_id(validate_recipe(raw))

    outside = validate_recipe(raw | {"data": raw["data"] | {"train": "../elsewhere.jsonl"}})
    (tmp_path.parent / "elsewhere.jsonl").write_text("{}\n")
    with pytest.raises(UserInputError, match="data.train.path"):
        submit.local_files(outside)


def test_a_secret_never_leaves_in_the_entrypoint_or_the_working_dir(cli, tmp_path, monkeypatch):
    """--set values travel in the job's entrypoint and a DeepSpeed JSON file in its
    working_dir, both stored by the cluster: secret-looking keys are refused before connecting
    (the address is a closed port), and the value is not echoed."""
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    address = ["--address", "http://127.0.0.1:9"]
    override = f"deepspeed.overrides.wandb.api_key={PLANTED}"
    code, out, err = cli("submit", recipe, *address, "--set", override)
    assert code == 2 and "deepspeed.overrides.wandb.api_key" in err
    assert PLANTED not in out + err
    config = json.loads((Path(__file__).parent.parent / "ds_configs" / "zero2.json").read_text())
    (tmp_path / "ds.json").write_text(json.dumps(config | {"comet": {"API_KEY": PLANTED}}))
    with_file = write_recipe(tmp_path / "f.yaml", tiny_recipe(tmp_path / "run",
                             deepspeed={"config": "ds.json"}))  # fmt: skip
    code, out, err = cli("submit", with_file, *address)
    assert code == 2 and "comet.API_KEY looks like a secret" in err and "cannot reach" not in err
    assert PLANTED not in out + err


# --- train / preflight --address: a Ray cluster to join, checked before connecting --------


@pytest.mark.parametrize(
    ("address", "env", "insecure", "refused"),
    [
        ("auto", {}, False, None),
        ("10.0.0.5:6379", {}, False, None),  # the GCS: from a node inside the cluster
        ("[::1]:6379", {}, False, None),
        ("ray://127.0.0.1:10001", {}, False, None),  # an SSH tunnel
        ("ray://localhost:10001", {}, False, None),
        ("ray://203.0.113.7:10001", {"RAY_USE_TLS": "1"}, False, None),
        ("ray://203.0.113.7:10001", {}, True, None),
        ("ray://203.0.113.7:10001", {}, False, "without TLS"),
        (None, {"RAY_ADDRESS": "ray://203.0.113.7:10001"}, False, "without TLS"),
        (f"ray://me:{PLANTED}@127.0.0.1:10001", {}, True, "credentials"),
        (f"me:{PLANTED}@10.0.0.5:6379", {}, False, "credentials"),
        (f"http://me:{PLANTED}@127.0.0.1:8265", {}, False, "credentials"),
        ("http://127.0.0.1:8265", {}, False, "job server URL"),
        ("HTTPS://head.example:443", {}, True, "job server URL"),
        ("grpc://10.0.0.5:6379", {}, False, "not a Ray cluster address"),
        ("10.0.0.5", {}, False, "not a Ray cluster address"),
        ("10.0.0.5:port", {}, False, "not a Ray cluster address"),
        ("ray://:10001", {}, False, "not a Ray cluster address"),
    ],
)  # fmt: skip
def test_cluster_addresses(address, env, insecure, refused) -> None:
    if refused is None:
        submit.check_cluster_address(address, insecure, env)
        return
    with pytest.raises(UserInputError) as info:
        submit.check_cluster_address(address, insecure, env)
    assert refused in str(info.value)
    assert info.value.where == ("--address" if address else "RAY_ADDRESS")
    assert PLANTED not in str(info.value)


@pytest.mark.parametrize("command", ["train", "preflight"])
@pytest.mark.parametrize(
    "address",
    [f"ray://me:{PLANTED}@10.0.0.5:10001", "http://203.0.113.7:8265", "ray://203.0.113.7:10001"],
    ids=["credentials", "job-server-url", "ray-client-in-clear"],
)  # fmt: skip
def test_train_and_preflight_check_the_address_before_connecting(cli, tmp_path, command, address):
    """Refused with exit 2 before anything connects or is written; the credentials are never
    echoed. On main these reached ray.init (a traceback, or a token over plain gRPC)."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    code, out, err = cli(command, recipe, "--address", address)
    assert code == 2, err
    assert "--address" in err and PLANTED not in out + err
    assert not (tmp_path / "run").exists()


def test_torchrun_with_an_address_is_refused(cli, tmp_path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    code, _, err = cli(recipe, "--backend", "torchrun", "--address", "10.0.0.5:6379")
    assert code == 2 and "torchrun backend runs on this machine only" in err
    assert not (tmp_path / "run").exists()
