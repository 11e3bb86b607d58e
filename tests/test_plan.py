"""ftlaunch plan: model states equal DeepSpeed's estimators, the recommendation follows the GPU
memory, adapters count trainable parameters only, table and JSON agree, bad flags exit 2, a
real Ray cluster's nodes are read, and a CPU run records predicted and measured peak memory."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
# imported before any test captures output: DeepSpeed prints a line when first imported
from deepspeed.runtime.zero.stage3 import (
    estimate_zero3_model_states_mem_needs,
    estimate_zero3_model_states_mem_needs_all_cold,
)
from deepspeed.runtime.zero.stage_1_and_2 import (
    estimate_zero2_model_states_mem_needs,
    estimate_zero2_model_states_mem_needs_all_cold,
)

from tests.conftest import DATA, tiny_recipe, write_recipe

LLAMA_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
            "tie_word_embeddings": False}
LLAMA_1B = {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
            "tie_word_embeddings": True}
GIB = 2**30


def model_dir(tmp: Path, sizes: dict) -> Path:
    """A directory holding only config.json: no weights, no tokenizer."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
              "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, **sizes}
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config))
    return tmp


def plan_recipe(tmp: Path, sizes: dict = LLAMA_8B, **changes) -> Path:
    base = {
        "output_dir": str(tmp / "run"), "method": "full",
        "model": {"name_or_path": str(model_dir(tmp / "model", sizes)), "dtype": "bf16",
                  "gradient_checkpointing": True},
        "data": {"train": str(DATA / "digits_train.jsonl"), "format": "instruction",
                 "max_length": 2048},
        "train": {"max_steps": 100, "micro_batch_size": 1},
        "deepspeed": {"config": "zero3"},
        "resources": {"num_workers": 8, "use_gpu": True},
    }
    from launcher.recipe.ds_config import deep_merge

    return write_recipe(tmp / "plan.yaml", deep_merge(base, changes))


def plan_json(cli, recipe: Path, *args) -> tuple[int, dict]:
    code, out, _ = cli("plan", recipe, "--json", *args)
    return code, json.loads(out)


def cold_printout(fn, *args) -> list[tuple[str, str, str]]:
    """The (per CPU GB, per GPU GB, options) lines an *_all_cold estimator prints."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        fn(*args)
    return re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$", buffer.getvalue(), re.M)


@pytest.mark.parametrize("sizes", [LLAMA_8B, LLAMA_1B], ids=["llama3-8b", "llama3.2-1b"])
@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (8, 2), (4, 4), (3, 1)])
def test_model_states_equal_deepspeeds_estimators(cli, tmp_path, sizes, gpus, nodes):
    code, plan = plan_json(cli, plan_recipe(tmp_path, sizes), "--gpus", gpus, "--nodes", nodes)
    assert code == 0
    total, largest = plan["model"]["parameters"], plan["model"]["largest_layer"]
    assert total == (8_030_261_248 if sizes is LLAMA_8B else 1_235_814_400)
    assert largest == 128256 * sizes["hidden_size"]  # the embedding matrix
    rows = {r["choice"]: r for r in plan["rows"]}
    expected = {}
    for offload in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(total, gpus, nodes, offload)
        expected["zero2+offload_opt" if offload else "zero2"] = (gpu, cpu)
    for choice, (opt, param) in {"zero3": (False, False), "zero3+offload_opt": (True, False),
                                 "zero3+offload_opt+param": (True, True)}.items():
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, opt, param)
        expected[choice] = (gpu, cpu)
    got = {c: (rows[c]["states_bytes"], rows[c]["host_bytes"]) for c in expected}
    assert got == expected
    # and the figures the all_cold functions print (GiB, two decimals; zero_init=1 lines)
    printed = cold_printout(estimate_zero2_model_states_mem_needs_all_cold, total, gpus, nodes)
    printed += [
        line for line in cold_printout(
            estimate_zero3_model_states_mem_needs_all_cold, total, largest, gpus, nodes
        ) if "zero_init=1" in line[2]
    ]
    names = ["zero2+offload_opt", "zero2", "zero3+offload_opt+param", "zero3+offload_opt", "zero3"]
    assert [(f"{rows[n]['host_bytes'] / GIB:.2f}", f"{rows[n]['states_bytes'] / GIB:.2f}")
            for n in names] == [(cpu, gpu) for cpu, gpu, _ in printed]


@pytest.mark.parametrize("memory,choice", [
    ("80GiB", "zero1"), ("24GiB", "zero3"), ("12GiB", "zero3+offload_opt"),
    ("8GiB", "zero3+offload_opt+param"),
])
def test_recommendation_flips_as_gpu_memory_shrinks(cli, tmp_path, memory, choice):
    """Llama-3-8B, full fine-tune, bf16, 1 x 2048 tokens per GPU, two nodes of 8 GPUs."""
    recipe = plan_recipe(tmp_path)
    code, plan = plan_json(cli, recipe, "--gpu-mem", memory, "--gpus", 8, "--nodes", 2)
    assert (code, plan["recommended"]) == (0, choice)
    fits = [r["choice"] for r in plan["rows"] if r["fits"]]
    assert fits[0] == choice


def test_nothing_fits_exits_1_and_says_so(cli, tmp_path):
    code, out, _ = cli("plan", plan_recipe(tmp_path), "--gpu-mem", "2GiB")
    assert code == 1
    assert "recommended: none" in out
    code, plan = plan_json(cli, plan_recipe(tmp_path), "--gpu-mem", "2GiB")
    assert (code, plan["recommended"]) == (1, None)


def test_lora_counts_trainable_parameters_only(cli, tmp_path):
    lora = {"r": 16, "target_modules": ["q_proj", "v_proj"]}
    recipe = plan_recipe(tmp_path, method="lora", lora=lora)
    _, plan = plan_json(cli, recipe, "--gpus", 8)
    # per layer: q (4096->4096) and v (4096->1024), each r*(in+out)
    lora = 32 * 16 * ((4096 + 4096) + (4096 + 1024))
    assert plan["model"]["trainable"] == lora
    assert plan["model"]["parameters"] == 8_030_261_248 + lora
    rows = {r["choice"]: r for r in plan["rows"]}
    total = plan["model"]["parameters"]
    assert rows["zero2"]["states_bytes"] == 2 * total + int(18 * lora / 8)
    assert rows["zero0"]["states_bytes"] == 2 * total + 18 * lora


def test_freeze_counts_trainable_parameters_only(cli, tmp_path):
    recipe = plan_recipe(tmp_path, train={"freeze": {"embeddings": True}})
    _, plan = plan_json(cli, recipe)
    assert plan["model"]["trainable"] == 8_030_261_248 - 128256 * 4096


def test_json_has_the_numbers_of_the_table(cli, tmp_path):
    recipe = plan_recipe(tmp_path)
    code, table, _ = cli("plan", recipe, "--gpu-mem", "24GiB")
    _, plan = plan_json(cli, recipe, "--gpu-mem", "24GiB")
    lines = {ln.split()[0]: ln.split() for ln in table.splitlines() if ln.startswith("zero")}
    for row in plan["rows"]:
        cells = lines[row["choice"]]
        numbers = [c for c in cells if re.fullmatch(r"\d+\.\d\d", c)]
        want = [row[k] for k in ("states_bytes", "activations_bytes", "reserve_bytes",
                                 "total_bytes", "host_bytes")]
        assert numbers == [f"{b / GIB:.2f}" for b in want]
        assert ("yes" in cells) == row["fits"]
    assert f"recommended: {plan['recommended']} " in table
    assert "ASSUMED MFU of 40%" in table


def test_chunked_loss_never_holds_full_logits(cli, tmp_path):
    recipe = plan_recipe(tmp_path, model={"loss": "plain"}, data={"max_length": 8192})
    _, plain = plan_json(cli, recipe)
    recipe = plan_recipe(tmp_path, model={"loss": "chunked"}, data={"max_length": 8192})
    _, chunked = plan_json(cli, recipe)
    full_logits = 8192 * 128256 * 2
    gap = plain["rows"][0]["activations_bytes"] - chunked["rows"][0]["activations_bytes"]
    assert gap > full_logits


@pytest.mark.parametrize("args,flag", [
    (("--gpu-mem", "80XB"), "--gpu-mem"), (("--gpu-mem", "80"), "--gpu-mem"),
    (("--gpus", "0"), "--gpus"), (("--nodes", "-1"), "--nodes"), (("--mfu", "2"), "--mfu"),
])
def test_bad_flags_exit_2_naming_the_flag(cli, tmp_path, args, flag):
    with pytest.raises(SystemExit) as exit_info:
        cli("plan", plan_recipe(tmp_path), *args)
    assert exit_info.value.code == 2


def test_bad_flag_message_names_the_flag(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "plan", str(plan_recipe(tmp_path)),
         "--gpu-mem", "80XB"], capture_output=True, text=True,
    )
    assert done.returncode == 2
    assert "argument --gpu-mem: '80XB' is not a memory size" in done.stderr


def test_missing_model_directory_exits_2(cli, tmp_path):
    recipe = plan_recipe(tmp_path, model={"name_or_path": str(tmp_path / "nowhere")})
    code, _, err = cli("plan", recipe)
    assert code == 2 and "model.name_or_path" in err


def test_fit_warning_before_training(tmp_path, capsys):
    from launcher.plan.command import warn_if_unfit
    from launcher.recipe import load_recipe

    recipe = load_recipe(plan_recipe(tmp_path, deepspeed={"config": "zero2"}))
    warn_if_unfit(recipe, 24 * GIB, 8, 2)
    err = capsys.readouterr().err
    assert "warning: zero2 needs" in err and "zero3 would fit" in err
    warn_if_unfit(recipe, 80 * GIB, 8, 1)
    assert capsys.readouterr().err == ""
    cpu = load_recipe(plan_recipe(tmp_path, resources={"use_gpu": False}))
    warn_if_unfit(cpu, 1 * GIB, 8, 1)  # a CPU run is never warned
    assert capsys.readouterr().err == ""


@pytest.mark.e2e
def test_address_reads_the_nodes_of_a_real_ray_cluster(ray_cluster, cli, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    recipe = plan_recipe(tmp_path, LLAMA_1B)
    code, plan = plan_json(cli, recipe, "--address", address)
    cluster = plan["cluster"]
    # this machine: host memory, no GPUs; the GPU memory stays the stated assumption
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    assert cluster["host_bytes"] == total and cluster["gpus_per_node"] == 0
    assert plan["hardware"]["host_bytes"] == total
    # Below ZeRO-3 every one of the 8 processes loads the fp32 weights into host memory
    # (DeepSpeed's estimate): more than this host has, so the host decides the choice.
    _, unknown_host = plan_json(cli, recipe)
    assert (code, plan["recommended"], unknown_host["recommended"]) == (0, "zero3", "zero0")
    code, out, _ = cli("plan", recipe, "--address", address)
    assert "no GPUs on any node" in out and f"{total / GIB:.2f} GiB host memory per node" in out


@pytest.mark.e2e
def test_cpu_run_records_predicted_and_measured_peak_without_a_warning(cli, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    code, _, err = cli(recipe, "--backend", "torchrun", "--no-progress")
    assert code == 0
    assert "warning" not in err
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert 0 < info["predicted_peak_memory_gb"] < info["measured_peak_memory_gb"]
