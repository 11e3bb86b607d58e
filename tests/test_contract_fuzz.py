"""One contract, held against mutated recipes and data files: ``ftlaunch check`` exits 0, or
exits 2 with a message naming the recipe or data file (with a line) or the field path. Never a
traceback, never exit 1, never a run directory left behind.

Hypothesis mutates the shipped CPU recipes and the tests' tiny recipe (wrong types, missing and
extra keys, nested garbage, huge and negative numbers, wrong enum values and combinations) and
their YAML text (anchors, python tags, duplicate keys, tabs, bytes that are not UTF-8), and the
data files (truncated lines, other encodings, wrong field types, empty files). CI runs the
derandomized "ci" profile (fixed examples); HYPOTHESIS_PROFILE=dev explores more.
"""

from __future__ import annotations

import copy
import os
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import DATA, ROOT, tiny_recipe

settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "dev", max_examples=500, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

def shipped_recipes() -> list[dict[str, Any]]:
    recipes = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "recipes" / "cpu").glob("*.yaml"))]
    return [*recipes, tiny_recipe(Path("runs/tiny"))]


BASES = shipped_recipes()

SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1e308, -1e308, float("inf"), float("nan"), 2**64, 2**63 - 1, 1e-320]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", " ", "x" * 100_000, "auto", "none", "zero3", "lora", "full", "ia3",
                     "bitfit", "prompt_tuning", "prefix_tuning", "distill", "causal_lm",
                     "sequence_classification", "token_classification", "bf16", "fp16",
                     "flash_attention_2", "liger", "multi_label", "regression", "../../etc",
                     "recipes/data", "/nonexistent/x.jsonl", "zero9", "ds_configs/zero2.json",
                     "a\x00b", "~", "${HOME}", "1e4"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=6), inner, max_size=3),
    ),
    max_leaves=6,
)
KEYS = st.one_of(
    st.sampled_from(["method", "task", "output_dir", "model", "data", "train", "deepspeed",
                     "resources", "checkpoint", "eval", "logging", "lora", "ia3", "prompt",
                     "labels", "distill", "overrides", "config", "max_steps", "epochs", "lr",
                     "micro_batch_size", "grad_accum", "global_batch_size", "num_workers",
                     "max_length", "format", "fields", "packing", "train_on_prompt",
                     "early_stopping", "every_steps", "keep_last", "exact_match", "freeze",
                     "lr_groups", "names", "problem_type", "architecture", "tokenizer",
                     "name_or_path", "dtype", "attention", "val_fraction", "chat_template",
                     "target_modules", "r", "alpha", "env", "use_gpu", "hidden_size"]),
    st.text(max_size=8),
)


def paths_in(node: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths_in(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += paths_in(value, (*prefix, i))
    return found


def container(root: Any, path: tuple) -> Any:
    for key in path:
        root = root[key]
    return root


@st.composite
def mutated_recipes(draw) -> dict[str, Any]:
    recipe = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in paths_in(recipe) if p]
        path = draw(st.sampled_from(paths))
        parent = container(recipe, path[:-1])
        action = draw(st.sampled_from(["set", "delete", "add", "combine"]))
        if action == "set":
            parent[path[-1]] = draw(VALUES)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(KEYS)] = draw(VALUES)
        elif action == "combine":
            recipe["method"] = draw(st.sampled_from(
                ["full", "lora", "ia3", "prompt_tuning", "prefix_tuning", "bitfit", "distill"]))
            recipe["task"] = draw(st.sampled_from(
                ["causal_lm", "sequence_classification", "token_classification"]))
            recipe.setdefault("deepspeed", {})["config"] = draw(
                st.sampled_from(["zero1", "zero2", "zero3", "zero3_offload"]))
    return recipe


def dump(recipe: dict[str, Any]) -> str:
    try:
        return yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:  # a value PyYAML itself cannot write
        return yaml.safe_dump({k: str(v) for k, v in recipe.items()}, sort_keys=False)


TEXT_ODDITIES = [
    lambda t: "base: &b {lr: 1.0}\n" + t.replace("train:", "train: *b\ntrain_:", 1),
    lambda t: t + "\nmethod: full\n",  # a duplicate top-level key
    lambda t: t.replace("  ", "\t", 1),
    lambda t: "!!python/object/apply:os.system ['echo owned']\n",
    lambda t: t + "\nextra: !!python/object:builtins.object {}\n",
    lambda t: t + "\nblob: !!binary aGVsbG8=\n",
    lambda t: t + "\nwhen: 2026-01-01\n",
    lambda t: "",
    lambda t: "---\n...\n",
    lambda t: "- a\n- b\n",
    lambda t: "just a string\n",
    lambda t: t[: len(t) // 2],
    lambda t: t + "\n  : :\n",
    lambda t: "x: [1, 2\n",
    lambda t: "%YAML 9.9\n---\n" + t,
    lambda t: "a: &a [*a]\n",
    lambda t: "a: &x 1\nb: *y\n",
    lambda t: "{" * 2000,
]


@st.composite
def recipe_bytes(draw) -> bytes:
    text = dump(draw(mutated_recipes()))
    if draw(st.booleans()):
        text = draw(st.sampled_from(TEXT_ODDITIES))(text)
    raw = text.encode()
    encoding = draw(st.sampled_from(["utf-8", "bom", "latin-1-bytes", "utf-16", "nul"]))
    if encoding == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif encoding == "latin-1-bytes":
        raw = raw + b"\n# caf\xe9 \xff\xfe\n"
    elif encoding == "utf-16":
        raw = text.encode("utf-16")
    elif encoding == "nul":
        raw = raw.replace(b"\n", b"\n\x00", 1)
    return raw


def assert_contract(code: int, err: str, run_dir: Path, *named: Path) -> None:
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err, err
    assert not run_dir.exists(), f"check left {run_dir} behind"
    if code == 2:
        errors = [line for line in err.splitlines() if line.startswith("ftlaunch: error: ")]
        assert len(errors) == 1, err
        message = errors[0].removeprefix("ftlaunch: error: ")
        located = (
            re.search(r":(row )?\d+: ", message)  # file:line (a JSON array: file:row)
            or re.match(r"[a-z_]+(\.[a-z0-9_]+)*: ", message)  # a recipe field path
            or any(message.startswith(str(p)) for p in named)  # the file as a whole
        )
        assert located, err


@pytest.fixture
def in_root(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # the shipped recipes' relative paths start here
    return tmp_path


def point_output(recipe_path: Path, raw: bytes, root: Path) -> tuple[Path, Path]:
    run_dir = root / f"run-{uuid.uuid4().hex}"
    recipe_path.write_bytes(raw)
    return recipe_path, run_dir


@given(raw=recipe_bytes())
def test_offline_check_keeps_the_contract_on_mutated_recipes(cli, in_root, raw):
    path, run_dir = point_output(in_root / f"r-{uuid.uuid4().hex}.yaml", raw, in_root)
    code, _, err = cli("check", "--offline", path, "--output-dir", run_dir)
    assert_contract(code, err, run_dir, path)


@given(recipe=mutated_recipes())
def test_check_keeps_the_contract_on_mutated_recipes(cli, in_root, recipe):
    """The full check (local tokenizer, model config, data) on structurally mutated recipes."""
    path = in_root / f"r-{uuid.uuid4().hex}.yaml"
    path.write_text(dump(recipe))
    run_dir = in_root / f"run-{uuid.uuid4().hex}"
    code, _, err = cli("check", path, "--output-dir", run_dir)
    assert_contract(code, err, run_dir, path)


ROWS = [line for line in (DATA / "digits_train.jsonl").read_text().splitlines()[:24]]
CSV_ROWS = (DATA / "sentiment_train.csv").read_text().splitlines()[:24]


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["jsonl", "csv"]))
    lines = list(ROWS if kind == "jsonl" else CSV_ROWS)
    for _ in range(draw(st.integers(1, 3))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(
            ["truncate", "drop", "garbage", "wrong_type", "blank", "empty_file", "duplicate"]))
        if action == "truncate":
            lines[i] = lines[i][: draw(st.integers(0, max(len(lines[i]) - 1, 0)))]
        elif action == "drop" and len(lines) > 1:
            del lines[i]
        elif action == "garbage":
            lines[i] = draw(st.text(max_size=20))
        elif action == "wrong_type" and kind == "jsonl":
            value = draw(VALUES)
            key = draw(st.sampled_from(["instruction", "input", "output", "label", "extra"]))
            lines[i] = yaml.safe_dump({key: value}, default_flow_style=True).strip().replace("'", '"')
        elif action == "blank":
            lines[i] = ""
        elif action == "empty_file":
            lines = []
        elif action == "duplicate":
            lines.append(lines[i])
    raw = "\n".join(lines).encode()
    encoding = draw(st.sampled_from(["utf-8", "bom", "latin-1", "utf-16", "crlf"]))
    if encoding == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif encoding == "latin-1":
        raw = raw.replace(b"e", b"\xe9", 1)
    elif encoding == "utf-16":
        raw = raw.decode().encode("utf-16")
    elif encoding == "crlf":
        raw = raw.replace(b"\n", b"\r\n")
    return kind, raw


@given(data=data_files(), which=st.sampled_from(["train", "validation"]))
def test_check_keeps_the_contract_on_mutated_data(cli, in_root, data, which):
    kind, raw = data
    data_path = in_root / f"d {uuid.uuid4().hex[:8]}.{kind}"  # a space, as users' paths have
    data_path.write_bytes(raw)
    run_dir = in_root / f"run-{uuid.uuid4().hex}"
    if kind == "jsonl":
        recipe = tiny_recipe(run_dir, data={which: str(data_path)})
    else:
        recipe = yaml.safe_load((ROOT / "recipes" / "cpu" / "sentiment_bert.yaml").read_text())
        recipe["data"][which] = str(data_path)
    path = in_root / f"r-{uuid.uuid4().hex}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code, _, err = cli("check", path, "--output-dir", run_dir)
    assert_contract(code, err, run_dir, path, data_path)
