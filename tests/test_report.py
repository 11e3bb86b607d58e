"""Reports on runs: ``ftlaunch plot`` (the figures draw exactly what metrics.jsonl holds),
``ftlaunch runs`` (finished, running, interrupted by kill -9, failed), ``ftlaunch chat`` (the
greedy answer of the exported model), and the driver's liveness lock they rest on.

One real 40-step torchrun run with evaluations serves the tests that need a trained model;
the tests of bad input use small run directories written here."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launcher.run import liveness
from tests.conftest import ROOT, tiny_recipe, write_recipe

PNG = b"\x89PNG\r\n\x1a\n"


def records_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def column(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    kept = [r for r in records if isinstance(r.get(key), (int, float))]
    return [r["step"] for r in kept], [float(r[key]) for r in kept]


def lines_by_label(fig) -> dict[str, tuple[list[float], list[float]]]:
    return {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for ax in fig.axes for line in ax.get_lines()
    }


def legend_texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def fake_run(path: Path, lines: list[str]) -> Path:
    """A run directory as plot and runs read it: the resolved recipe and a metrics file."""
    import yaml

    from launcher.recipe import Recipe

    path.mkdir(parents=True)
    recipe = Recipe.model_validate(tiny_recipe(path))
    (path / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    (path / "metrics.jsonl").write_text("".join(lines))
    return path


# ---------------------------------------------------------------- fast: no training


def test_history_errors_name_file_and_line(cli, tmp_path):
    good = '{"step": 1, "loss": 2.0}\n'
    run = fake_run(tmp_path / "bad", [good, "{not json\n", '{"step": 3, "loss": 1.0}\n'])
    code, _, err = cli("plot", run)
    assert code == 2 and f"{run / 'metrics.jsonl'}:2:" in err, err
    empty = fake_run(tmp_path / "blank", [good, "\n", good])
    code, _, err = cli("plot", empty)
    assert code == 2 and f"{empty / 'metrics.jsonl'}:2: empty line" in err, err
    stepless = fake_run(tmp_path / "stepless", ['{"loss": 1.0}\n'])
    code, _, err = cli("plot", stepless)
    assert code == 2 and f"{stepless / 'metrics.jsonl'}:1:" in err, err
    code, _, err = cli("plot", tmp_path)
    assert code == 2 and "not a run directory" in err, err
    assert not any((p / "plots").exists() for p in (run, empty, stepless, tmp_path))


def test_torn_tail_is_skipped_and_a_repeated_step_drawn_once(tmp_path):
    from launcher.report import plot

    lines = [json.dumps({"step": s, "loss": float(10 - s)}) + "\n" for s in (1, 2, 3, 4)]
    lines += [json.dumps({"step": 3, "loss": 0.5}) + "\n", '{"step": 4, "lo']  # resumed at 2
    run = fake_run(tmp_path / "resumed", lines)
    drawn = lines_by_label(plot.figures([run])["loss"])["resumed: loss"]
    assert drawn == ([1, 2, 3], [9.0, 8.0, 0.5])


def test_steps_whose_loss_is_not_finite_are_shaded_not_dropped(tmp_path):
    """A diverged run's NaN steps have no point on a line; the loss figure shades them."""
    from launcher.report import plot
    from launcher.report.history import nonfinite_stretches, read_history

    losses = [3.0, math.nan, 2.5, math.inf, math.nan, None, -math.inf, 2.0, math.nan]
    lines = [json.dumps({"step": s} | ({} if v is None else {"loss": v})) + "\n"
             for s, v in enumerate(losses, start=1)]
    run = fake_run(tmp_path / "diverged", lines)
    assert nonfinite_stretches(read_history(run), "loss") == [(2, 2), (4, 7), (9, 9)]
    fig = plot.figures([run])["loss"]
    (ax,) = fig.axes
    spans = [(p.get_x(), p.get_x() + p.get_width()) for p in ax.patches]
    assert spans == [(1.5, 2.5), (3.5, 7.5), (8.5, 9.5)]
    assert "diverged: loss not finite" in legend_texts(fig)
    assert lines_by_label(fig)["diverged: loss"] == ([1, 3, 8], [3.0, 2.5, 2.0])


def test_plot_writes_only_into_a_directory_it_owns(cli, tmp_path):
    run = fake_run(tmp_path / "run", [json.dumps({"step": 1, "loss": 1.0, "lr": 0.1}) + "\n"])
    code, out, err = cli("plot", run)
    assert code == 0, err
    assert sorted(p.name for p in (run / "plots").iterdir()) == [
        "ftlaunch_plots.json", "loss.png", "lr.png"]
    assert cli("plot", run)[0] == 0  # its own files it may replace
    (run / "plots" / "notes.txt").write_text("mine")
    code, _, err = cli("plot", run)
    assert code == 2 and "notes.txt" in err, err
    assert (run / "plots" / "notes.txt").read_text() == "mine"
    code, _, err = cli("plot", run, run)
    assert code == 2 and "--out" in err, err


def test_plot_without_matplotlib_names_the_extra(cli, tmp_path, monkeypatch):
    run = fake_run(tmp_path / "run", [json.dumps({"step": 1, "loss": 1.0}) + "\n"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    code, _, err = cli("plot", run)
    assert code == 2 and "ftlaunch[plot]" in err, err


def test_driver_lock_is_positive_evidence(tmp_path):
    with liveness.Driver(tmp_path) as driver:
        assert not liveness.probe(tmp_path).held  # nothing claimed yet
        driver.claim()
        live = liveness.probe(tmp_path)
        assert live.held and live.driver["pid"] == os.getpid()
        with pytest.raises(Exception, match="another ftlaunch driver"):
            liveness.Driver(tmp_path).claim()
    assert not liveness.probe(tmp_path).held and liveness.probe(tmp_path).failure is None
    with pytest.raises(RuntimeError), liveness.Driver(tmp_path) as driver:
        driver.claim()
        raise RuntimeError("boom")
    assert "boom" in liveness.probe(tmp_path).failure["reason"]
    with liveness.Driver(tmp_path) as driver:
        driver.claim()  # a new launch forgets the old failure
    assert liveness.probe(tmp_path).failure is None


# ---------------------------------------------------------------- end to end: real runs

TRAIN = {"max_steps": 40, "micro_batch_size": 8, "lr": 1e-2, "warmup_steps": 4, "seed": 5}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 40-step run (long enough that the model answers more than end-of-text):
    metrics every step, evaluations at steps 0, 20 and 40."""
    from launcher.cli import main

    tmp = tmp_path_factory.mktemp("trained")
    run_dir = tmp / "runs" / "tiny"
    recipe = tiny_recipe(
        run_dir, train=TRAIN, checkpoint={"every_steps": 20},
        eval={"every_steps": 20, "at_start": True}, logging={"every_steps": 1},
    )
    assert main([str(write_recipe(tmp / "r.yaml", recipe)), "--backend", "torchrun"]) == 0
    return run_dir


def runs_json(cli, root: Path) -> dict[str, dict]:
    code, out, err = cli("runs", root, "--json")
    assert code == 0, err
    return {Path(r["run_dir"]).name: r for r in json.loads(out)}


@pytest.mark.e2e
def test_plot_draws_exactly_what_metrics_jsonl_holds(cli, trained):
    from launcher.report import plot

    records = records_of(trained)
    assert any("eval_perplexity" in r for r in records)
    figs = plot.figures([trained])
    loss = lines_by_label(figs["loss"])
    assert loss["tiny: loss"] == column(records, "loss")
    smoothed, raw = [], column(records, "loss")[1]
    for value in raw:
        smoothed.append(value if not smoothed else 0.9 * smoothed[-1] + 0.1 * value)
    assert loss["tiny: loss (EMA 0.9)"] == (column(records, "loss")[0], pytest.approx(smoothed))
    assert loss["tiny: eval_loss"] == column(records, "eval_loss")
    assert column(records, "eval_loss")[0] == [0, 20, 40]
    for key in ("eval_perplexity", "lr", "tokens_per_s", "peak_memory_gb"):
        name = {"lr": "lr", "tokens_per_s": "throughput", "peak_memory_gb": "memory"}.get(key, key)
        assert lines_by_label(figs[name])[f"tiny: {key}"] == column(records, key), key
    code, out, err = cli("plot", trained)
    assert code == 0, err
    written = [Path(p) for p in out.split()]
    assert {p.name for p in written} == {f"{n}.png" for n in figs}
    assert all(p.parent == trained / "plots" and p.read_bytes()[:8] == PNG for p in written)


@pytest.mark.e2e
def test_two_runs_overlaid_with_a_legend_naming_both(cli, trained, tmp_path):
    from launcher.report import plot

    other = tmp_path / "second"
    shutil.copytree(trained, other, ignore=shutil.ignore_patterns("plots"))
    figs = plot.figures([trained, other])
    texts = legend_texts(figs["loss"])
    assert {"tiny: loss", "second: loss", "tiny: eval_loss", "second: eval_loss"} <= set(texts)
    assert any(t.startswith("second:") for t in legend_texts(figs["lr"]))
    code, out, err = cli("plot", trained, other, "--out", tmp_path / "both")
    assert code == 0 and (tmp_path / "both" / "loss.png").stat().st_size > 0, err


@pytest.mark.e2e
def test_runs_reports_a_finished_run(cli, trained):
    row = runs_json(cli, trained.parent)["tiny"]
    evals = [(r["step"], r["eval_loss"]) for r in records_of(trained) if "eval_loss" in r]
    best_step, best = min((e for e in evals if e[0] > 0), key=lambda e: e[1])
    assert row["status"] == "finished", row
    assert (row["steps_done"], row["steps_total"]) == (40, 40)
    assert (row["best_metric"], row["best_value"], row["best_step"]) == ("eval_loss", best, best_step)
    assert row["output"] == str(trained / "final") and row["wall_s"] > 0
    code, out, _ = cli("runs", trained.parent)
    assert code == 0 and "finished" in out and "40/40" in out


@pytest.mark.e2e
def test_runs_names_a_damaged_run_and_lists_the_others(cli, trained, tmp_path):
    for name in ("good", "damaged"):
        shutil.copytree(trained, tmp_path / "runs" / name)
    metrics = tmp_path / "runs" / "damaged" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join([lines[0], "{not json\n", *lines[1:]]))
    code, out, err = cli("runs", tmp_path / "runs")
    assert code == 0, err
    assert f"unreadable: {metrics}:2: not valid JSON" in out, out
    rows = runs_json(cli, tmp_path / "runs")
    assert rows["good"]["steps_done"] == 40 and rows["good"]["problem"] is None
    assert rows["damaged"]["status"] == "finished" and "metrics.jsonl:2" in rows["damaged"]["problem"]


@pytest.mark.e2e
def test_runs_reports_running_then_interrupted_after_kill_9(cli, tmp_path):
    run_dir = tmp_path / "runs" / "killed"
    recipe = tiny_recipe(run_dir, train={"max_steps": 2000}, logging={"every_steps": 1},
                         data={"validation": None})
    env = os.environ | {"PYTHONPATH": str(ROOT), "FTLAUNCH_CACHE": str(tmp_path / "cache")}
    err = (tmp_path / "stderr.txt").open("w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", str(write_recipe(tmp_path / "r.yaml", recipe)),
         "--backend", "torchrun", "--no-progress"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
    )
    procs: list[psutil.Process] = []
    try:
        deadline = time.time() + 300
        while not (run_dir / "metrics.jsonl").is_file() or not records_of(run_dir):
            assert driver.poll() is None and time.time() < deadline, (tmp_path / "stderr.txt").read_text()
            time.sleep(0.2)
        procs = psutil.Process(driver.pid).children(recursive=True)
        row = runs_json(cli, tmp_path / "runs")["killed"]
        assert row["status"] == "running" and str(driver.pid) in row["detail"], row
        assert row["steps_total"] == 2000 and row["steps_done"] >= 1
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
        row = runs_json(cli, tmp_path / "runs")["killed"]
        assert row["status"] == "interrupted" and "gone" in row["detail"], row
    finally:
        if driver.poll() is None:
            driver.kill()
        for proc in procs:
            try:
                proc.kill()  # torchrun runs in its own session: it outlives a killed driver
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        err.close()


@pytest.mark.e2e
def test_runs_reports_a_failed_run(cli, tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "broken"
    recipe = tiny_recipe(run_dir, data={"validation": None}, checkpoint={"max_failures": 0})
    monkeypatch.setenv("FTLAUNCH_TEST_FAULT", "crash:2:always")
    code, _, err = cli(write_recipe(tmp_path / "r.yaml", recipe), "--backend", "torchrun")
    assert code == 1, err
    row = runs_json(cli, tmp_path / "runs")["broken"]
    assert row["status"] == "failed" and row["steps_done"] == 2, row


@pytest.mark.e2e
def test_chat_answers_as_the_exported_model_generates(cli, trained, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = trained / "final"
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    model = AutoModelForCausalLM.from_pretrained(str(final)).eval()

    def greedy(text: str) -> str:
        prompt = f"### Instruction:\n{text}\n\n### Response:\n"  # the recipe's prompt_template
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    code, out, err = cli("chat", trained, "--prompt", "add 1 4", "--max-new-tokens", "6")
    assert code == 0, err
    assert out.strip() == greedy("add 1 4").strip() and out.strip()
    monkeypatch.setattr(sys, "stdin", io.StringIO("add 2 2\n\nspell the digits 3 1\n"))
    code, out, err = cli("chat", trained, "--max-new-tokens", "6")
    assert code == 0, err
    assert out.splitlines() == [greedy("add 2 2").strip(), greedy("spell the digits 3 1").strip()]


@pytest.mark.e2e
def test_chat_without_final_names_it(cli, trained, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(trained, run_dir, ignore=shutil.ignore_patterns("final", "checkpoints"))
    code, _, err = cli("chat", run_dir, "--prompt", "add 1 4")
    assert code == 2 and str(run_dir / "final") in err, err
