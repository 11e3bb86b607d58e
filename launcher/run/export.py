"""Export a committed checkpoint as a Hugging Face model directory, and prove it loads.

Weights are consolidated from the ZeRO shards with DeepSpeed's own ``zero_to_fp32`` reader, so
the same path serves every ZeRO stage. The directory is written beside its destination and
renamed into place only after it has been reloaded and its logits checked.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from launcher.checkpoint import commit as ckpt
from launcher.checkpoint import remote
from launcher.durable import write_atomic
from launcher.errors import ExportError, UserInputError
from launcher.model.adapters import adapter_config
from launcher.model.build import DTYPES, auto_model_class, load_model_config, load_tokenizer, remote_code_kwargs
from launcher.recipe.sections import ModelSection
from launcher.recipe import Recipe
from launcher.run.probe import probe_ids
from launcher.run import sync
from launcher.run.rundir import RunDir, load_resolved
from launcher.run.store import Store, mirror_dir, store_for
from launcher.tasks.base import task_for

EXPORT_MARK = "ftlaunch_export.json"  # in every export: the files it wrote
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def choose_checkpoint(run_dir: Path, step: int | None) -> ckpt.Candidate:
    """The checkpoint at ``step``; by default the best one (eval.early_stopping), else the
    newest."""
    done = ckpt.committed(run_dir)
    if step is None and ckpt.best_steps(run_dir):
        step = ckpt.best_steps(run_dir)[0]
    if step is not None:
        done = [c for c in done if c.step == step]
        if not done:
            steps = [c.step for c in ckpt.committed(run_dir)]
            raise UserInputError("--checkpoint", f"no committed checkpoint at step {step}; have {steps}")
    if not done:
        raise UserInputError(str(run_dir), "no committed checkpoint to export")
    chosen = done[0]
    problem = ckpt.problem(chosen.path)  # before anything in it is unpickled
    if problem:
        raise UserInputError(str(chosen.path), f"checkpoint is corrupt: {problem}")
    return chosen


def consolidated_state(chosen: ckpt.Candidate) -> dict[str, torch.Tensor]:
    """The checkpoint's full fp32 weights, read the way its ZeRO stage saved them."""
    from launcher.checkpoint import consolidate

    manifest = ckpt.read_manifest(chosen.path)
    if manifest is None:
        raise ExportError(f"{chosen.path} lost its manifest while exporting")
    return consolidate.consolidated_state(chosen.path, manifest)


def rebuild(
    recipe: Recipe, state: dict[str, torch.Tensor], pad_token_id: int
) -> torch.nn.Module:
    """The trained model in fp32 on CPU: an uninitialised skeleton, then the trained tensors."""
    from transformers.initialization import no_init_weights

    task = task_for(recipe)
    config = task.configure(load_model_config(recipe.model), pad_token_id)
    with no_init_weights():
        model = auto_model_class(recipe.task).from_config(
            config, dtype=torch.float32, **remote_code_kwargs(recipe.model)
        )
    if recipe.uses_adapter:
        from peft import get_peft_model

        head = task.head_modules(model)
        model = get_peft_model(model, adapter_config(recipe, head))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = _tied_names(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ExportError(f"checkpoint does not match the model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.numel() == 0 or p.is_meta]
    if empty:
        raise ExportError(f"empty or unmaterialised tensors after loading: {empty[:5]}")
    return model.eval()


def _tied_names(model: torch.nn.Module) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    if getattr(model.config, "tie_word_embeddings", False) and getter and getter() is not None:
        return {n for n, p in model.named_parameters(remove_duplicate=False) if p is getter().weight}
    return {n for n in ("lm_head.weight",) if getattr(model.config, "tie_word_embeddings", False)}


def export_run(
    run_dir: Path, out: Path | None = None, step: int | None = None, merge_lora: bool = False
) -> Path:
    run_dir = run_dir.resolve()
    recipe = load_resolved(run_dir)
    if recipe is None:
        raise UserInputError(str(run_dir), "not a run directory (no recipe.resolved.yaml)")
    if merge_lora and not recipe.uses_adapter:
        raise UserInputError("--merge-lora", "only for runs with an adapter (method: lora or ia3)")
    final = RunDir(run_dir).final
    where = "--out" if out is not None else str(final)
    out = (out or final).resolve()
    if ckpt.checkpoints_dir(run_dir) in (out, *out.parents):
        raise UserInputError(where, f"{out} is inside the run's checkpoints/: an export there "
                             "would make a checkpoint hold files its manifest does not name")
    own_final = out == run_dir / "final"  # a final/ ftlaunch did not mark is moved aside
    if not own_final:
        check_destination(out, where)
    chosen = choose_checkpoint(run_dir, step)
    tokenizer = load_tokenizer(recipe.model)
    model = rebuild(recipe, consolidated_state(chosen), tokenizer.pad_token_id)
    dtype = DTYPES[recipe.model.dtype]
    probe = torch.tensor([probe_ids(tokenizer)])
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        if recipe.uses_adapter and merge_lora:
            model = model.merge_and_unload()
        expected = _logits(model.to(dtype), probe)
        _save(model, recipe, staging, merge_lora, final_dir=out)
        if task_for(recipe).pads_left(recipe.method, model.config.model_type):
            tokenizer = load_tokenizer(recipe.model, padding_side="left")  # as training padded
        tokenizer.save_pretrained(str(staging))
        got = _logits(load_exported(staging, dtype, recipe.task, recipe.model), probe)
        _compare(got, expected, dtype, "reloaded export vs checkpoint")
        trained = trained_logits(run_dir, chosen.step)
        if trained is not None:
            _compare(got, trained, dtype, "reloaded export vs the model at the end of training")
        mark_export(staging, chosen.step)
        if own_final:
            move_aside_unmarked(out)
        install(staging, out, where)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def check_destination(out: Path, where: str) -> None:
    """An export may replace only an empty directory or an earlier export that holds nothing
    but the files ftlaunch wrote there; anything else is refused, untouched."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserInputError(where, f"{out} exists and is not a directory")
    foreign = foreign_files(out)
    if foreign:
        raise UserInputError(
            where,
            f"{out} holds files ftlaunch did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); choose another --out, or move them away",
        )


def move_aside_unmarked(final: Path) -> None:
    """The run's own final/ holding files no ftlaunch export listed (one written by an older
    ftlaunch, or files added to it) is renamed to final.old-<UTC time>/, never deleted."""
    if not final.is_dir() or not foreign_files(final):
        return
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = final.with_name(f"{final.name}.old-{stamp}")
    n = 1
    while aside.exists():
        aside, n = final.with_name(f"{final.name}.old-{stamp}-{n}"), n + 1
    final.rename(aside)
    print(f"[ftlaunch] {final} held files ftlaunch did not write there; kept them, moved to "
          f"{aside}", file=sys.stderr)


def foreign_files(out: Path) -> list[str]:
    """Files in ``out`` that no earlier export listed in its EXPORT_MARK."""
    present = ckpt.present_files(out)
    try:
        listed = set(json.loads((out / EXPORT_MARK).read_text())["files"]) | {EXPORT_MARK}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        listed = set()
    return [name for name in present if name not in listed]


def mark_export(staging: Path, step: int) -> None:
    """List every file this export wrote, so a later export knows what it may replace."""
    files = ckpt.present_files(staging)
    write_atomic(staging / EXPORT_MARK, json.dumps({"step": step, "files": files}, indent=1))


def install(staging: Path, out: Path, where: str) -> None:
    """Rename the verified export into place. An earlier export there is moved aside first
    and removed only after the new one is in place."""
    if not out.exists():
        staging.rename(out)
        return
    check_destination(out, where)  # again: it may have changed while this export ran
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
    out.rename(old / "export")
    staging.rename(out)
    for name in ckpt.present_files(old / "export"):
        (old / "export" / name).unlink()
    for folder in sorted((p for p in old.rglob("*") if p.is_dir()), reverse=True):
        folder.rmdir()
    old.rmdir()


def _save(model: Any, recipe: Recipe, out: Path, merged: bool, final_dir: Path) -> None:
    if not recipe.uses_adapter or merged:
        model.save_pretrained(str(out), safe_serialization=True, max_shard_size="5GB")
        return
    if recipe.model.architecture is not None:
        # A freshly initialised base exists nowhere else: ship it beside the adapter.
        base_dir = out / "base_model"
        model.peft_config["default"].base_model_name_or_path = str(final_dir / "base_model")
        model.save_pretrained(str(out), safe_serialization=True)
        model.get_base_model().save_pretrained(str(base_dir), safe_serialization=True)
        _strip_lora_from_base(base_dir)
    else:
        model.peft_config["default"].base_model_name_or_path = recipe.model.name_or_path
        model.save_pretrained(str(out), safe_serialization=True)


def _strip_lora_from_base(base_dir: Path) -> None:
    """get_base_model() still holds the adapter layers (LoRA, DoRA, IA3) and the wrappers of
    fully trained modules (a classification head); rewrite its weights as the plain base. The
    trained copies of those modules ship in the adapter."""
    from safetensors.torch import load_file, save_file

    for path in base_dir.glob("*.safetensors"):
        tensors = load_file(str(path))
        plain = {
            k.replace(".base_layer.", ".").replace(".original_module.", "."): v
            for k, v in tensors.items()
            if ".lora_" not in k and ".ia3_" not in k and ".modules_to_save." not in k
        }
        save_file(plain, str(path), metadata={"format": "pt"})


def load_exported(
    path: Path, dtype: torch.dtype, task: str = "causal_lm", model: ModelSection | None = None
) -> torch.nn.Module:
    """Load an export the way users will: the task's Auto class for models, peft for adapters.

    ``model`` is the recipe's model section: with trust_remote_code the export holds a copy of
    the model's code (it was checked pinned when training started) and an adapter's base is
    loaded from the recipe's source at its pinned revision, as training loaded it.
    """
    auto = auto_model_class(task)
    trust = {"trust_remote_code": True} if model is not None and model.trust_remote_code else {}
    if (path / "adapter_config.json").is_file():
        from peft import PeftConfig, PeftModel

        shipped = path / "base_model"
        if shipped.is_dir():
            base = auto.from_pretrained(str(shipped), dtype=dtype, **trust)
        elif model is not None and model.name_or_path is not None:
            base = auto.from_pretrained(
                model.name_or_path, revision=model.revision, dtype=dtype, **trust
            )
        else:
            name = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
            base = auto.from_pretrained(name, dtype=dtype)
        return PeftModel.from_pretrained(base, str(path)).eval()
    return auto.from_pretrained(str(path), dtype=dtype, **trust).eval()


def trained_logits(run_dir: Path, step: int) -> torch.Tensor | None:
    """Logits the worker recorded at the end of training, if training ended at ``step`` (the
    probe records its step; one from another step, or that does not say, is not compared)."""
    from safetensors import safe_open

    path = RunDir(run_dir).probe
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("step") != str(step):
            return None
        return f.get_tensor("logits")


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _compare(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    scale = expected.abs().max().clamp_min(1.0)
    error = ((got - expected).abs().max() / scale).item()
    if not error <= TOLERANCE[dtype]:
        raise ExportError(f"{what}: logits differ by {error:.2e} (tolerance {TOLERANCE[dtype]})")


def export_stored(
    output_dir: str, out: Path | None = None, step: int | None = None, merge_lora: bool = False
) -> str:
    """:func:`export_run` for a run in object storage: its files and the chosen committed
    checkpoint are downloaded into the node-local mirror (and verified there, before anything
    is unpickled); the export is verified locally, then ``final/`` is uploaded, its
    ``ftlaunch_export.json`` last. With ``out``, the export stays in that local directory."""
    store = store_for(output_dir)
    run_dir = mirror_dir(output_dir)
    sync.pull(store, run_dir, sync.run_files(run_dir))
    if load_resolved(run_dir) is None:
        raise UserInputError(output_dir, "not a run directory (no recipe.resolved.yaml there)")
    steps = remote.committed_steps(store)
    if step is None and ckpt.best_steps(run_dir):
        step = ckpt.best_steps(run_dir)[0]
    if step is not None and step not in steps:
        raise UserInputError("--checkpoint", f"no committed checkpoint at step {step}; have {steps}")
    if not steps:
        raise UserInputError(output_dir, "no committed checkpoint to export")
    chosen = ckpt.tag_for(step if step is not None else steps[0])
    warn = lambda message: print(f"[ftlaunch] WARNING: {message}", file=sys.stderr)  # noqa: E731
    unusable = remote.fetch_step(store, ckpt.checkpoints_dir(run_dir), chosen, warn)
    if unusable:
        raise UserInputError(store.where(remote.step_rel(chosen)), f"checkpoint is corrupt: {unusable}")
    final = export_run(run_dir, out, int(chosen[len("step_"):]), merge_lora)
    if out is not None:
        return str(final)
    upload_final(store, final)
    return store.where("final")


def upload_final(store: Store, final: Path) -> None:
    """Replace the store's ``final/`` with a verified local export. Its mark goes first and
    comes back last, so a ``final/`` without ``ftlaunch_export.json`` is an interrupted
    upload; objects no earlier ftlaunch export listed are refused, untouched."""
    present = store.listing("final")
    listed = _listed(store.read_text(f"final/{EXPORT_MARK}"))
    new = set(ckpt.present_files(final))
    foreign = sorted(n for n in present if n not in listed and n not in new)
    if foreign:
        raise UserInputError(store.where("final"), f"holds objects ftlaunch did not write "
                             f"({', '.join(foreign[:3])}); move them away, then export again")
    store.delete(f"final/{EXPORT_MARK}")
    for name in sorted(new - {EXPORT_MARK}):
        store.upload(final / name, f"final/{name}")
    store.upload(final / EXPORT_MARK, f"final/{EXPORT_MARK}")
    for name in sorted(set(present) - new):
        store.delete(f"final/{name}")


def _listed(mark: str | None) -> set[str]:
    try:
        return set(json.loads(mark or "")["files"]) | {EXPORT_MARK}
    except (ValueError, KeyError, TypeError):
        return set()
