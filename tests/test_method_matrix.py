"""Every training method (and train.freeze) on every ZeRO stage trains through the real CLI
and exports a model that reloads with the logits the worker recorded at the end of training."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.train.metrics import read_metrics
from tests.conftest import probe_matches, tiny_recipe, write_recipe

METHODS = {
    "full": {},
    "lora": {},
    "ia3": {},
    # a few virtual tokens barely move the loss in two steps at the base rate of 1e-3
    "prompt_tuning": {"prompt": {"num_virtual_tokens": 4}, "train": {"lr": 3e-2}},
    "prefix_tuning": {"prompt": {"num_virtual_tokens": 4}, "train": {"lr": 3e-2}},
    "bitfit": {"model": {"architecture": {"attention_bias": True}}},  # Llama has no biases
    "freeze": {"train": {"freeze": {"embeddings": True, "first_layers": 1}}},
}
CASES = [(method, stage, 1) for method in METHODS for stage in (1, 2, 3)]
# two workers: the sharded save and gather of each stage, one method per stage and more
CASES += [("lora", 3, 2), ("full", 2, 2), ("prompt_tuning", 1, 2), ("ia3", 2, 2)]


def matrix_recipe(run_dir: Path, method: str, stage: int, workers: int = 1) -> dict:
    recipe = tiny_recipe(
        run_dir, method="full" if method == "freeze" else method,
        deepspeed={"config": f"zero{stage}"}, eval={"max_batches": 1, "at_start": True},
        resources={"num_workers": workers}, **METHODS[method],
    )
    recipe["train"].update({"max_steps": 2, "micro_batch_size": 2})
    return recipe


def load_export(final: Path):
    if (final / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(str(final)).eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(final)).eval()


@pytest.mark.e2e
@pytest.mark.parametrize(("method", "stage", "workers"), CASES,
                         ids=[f"{m}-zero{s}" + (f"-{w}w" if w > 1 else "") for m, s, w in CASES])
def test_method_exports_on_zero_stage(cli, tmp_path, method, stage, workers):
    recipe = matrix_recipe(tmp_path / "run", method, stage, workers)
    code, _, err = cli(write_recipe(tmp_path / "r.yaml", recipe), "--backend", "torchrun",
                       "--no-progress")
    assert code == 0, err
    probe_matches(tmp_path / "run", load_export(tmp_path / "run" / "final"))
    evals = [r["eval_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
             if "eval_loss" in r]
    assert len(evals) == 2 and abs(evals[1] - evals[0]) > 1e-5 * evals[0], evals  # it trained
