"""Data at scale: every format tokenized by datasets.map in processes gives what the row
encoder gives; the cache is memory-mapped by every process that reads it; a bad row found in a
tokenizing process still names its line; racing runs share one entry; rank 0 tokenizes once
for a cluster on shared storage, once per node without; packing plans from lengths alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from launcher.data.cache import cache_key
from launcher.data.encode import encode_rows, make_encoder
from launcher.data.labels import infer_label_names
from launcher.data.pack import pack_examples
from launcher.data.parallel import encode_tables
from launcher.data.pipeline import held_out, prepare_data
from launcher.data.read import numeric_fields, read_rows
from launcher.data.rowtable import row_tables
from launcher.data.tokenized import TokenizedSplit
from launcher.recipe.sections import DataSection, LabelsSection
from tests.conftest import DATA, ROOT, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(DATA / "tokenizer"))


FORMATS = {
    "instruction": ({"train": "digits_train.jsonl", "format": "instruction", "max_length": 20,
                     "validation": "digits_val.jsonl"}, None),
    "instruction-drop": ({"train": "digits_train.jsonl", "format": "instruction",
                          "max_length": 18, "overflow": "drop", "val_fraction": 0.1}, None),
    "chat": ({"train": "digits_chat_train.jsonl", "format": "chat", "val_fraction": 0.2}, None),
    "sharegpt": ({"train": "digits_sharegpt_train.jsonl", "format": "chat"}, None),
    "text": ({"train": "digits_text_train.jsonl", "format": "text", "val_fraction": 0.1}, None),
    "classification": ({"train": "sentiment_train.csv", "format": "classification",
                        "fields": {"text": "sentence"}}, {}),
    "pairs": ({"train": "pairs_train.csv", "format": "classification",
               "fields": {"text": "sentence1", "text_pair": "sentence2"}}, {}),
    "multi-label": ({"train": "topics_train.jsonl", "format": "classification",
                     "fields": {"label": "labels"}}, {"problem_type": "multi_label"}),
    "tagging": ({"train": "ner_train.jsonl", "format": "tagging", "val_fraction": 0.1}, {}),
}


def _section(spec: dict, tmp_path: Path, **kw) -> DataSection:
    paths = {k: str(DATA / v) for k, v in spec.items() if k in ("train", "validation")}
    return DataSection.model_validate({**spec, **paths, "cache_dir": str(tmp_path / "c"), **kw})


def _labels(cfg: DataSection, spec: dict | None) -> LabelsSection | None:
    if spec is None:
        return None
    rows = read_rows(cfg.train, numeric_fields(cfg))
    if spec.get("problem_type") == "multi_label":
        names = sorted({v for r in rows for v in r.data[cfg.fields.label]})
    else:
        names = infer_label_names(rows, cfg.format, cfg.fields)
    return LabelsSection(names=names, **spec)


def _same(a: TokenizedSplit, b: TokenizedSplit) -> None:
    for name, array in a.arrays().items():
        other = b.arrays()[name]
        assert array.dtype == other.dtype and np.array_equal(array, other), name
    assert a.arrays().keys() == b.arrays().keys()


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_through_processes_matches_the_row_encoder(tok, tmp_path, name):
    """Two tokenizing processes (each file holds >= 2,000 rows) write what encoding the rows
    one batch at a time in this process gives, split and counted the same way."""
    spec, label_spec = FORMATS[name]
    cfg = _section(spec, tmp_path, num_proc=2)
    labels = _labels(cfg, label_spec)
    data = prepare_data(cfg, tok, seed=3, labels=labels)
    rows = read_rows(cfg.train, numeric_fields(cfg))
    assert len(rows) >= 2000
    held = held_out(cfg, 3, len(rows))
    train_rows = rows if held is None else [r for r, h in zip(rows, held) if not h]
    expected, stats = encode_rows(train_rows, cfg, tok, labels)
    _same(data.train, TokenizedSplit.from_examples(expected))
    assert data.stats["train"] == stats
    if cfg.validation is not None or held is not None:
        val_rows = (read_rows(cfg.validation, numeric_fields(cfg)) if cfg.validation
                    else [r for r, h in zip(rows, held) if h])
        expected, stats = encode_rows(val_rows, cfg, tok, labels)
        _same(data.validation, TokenizedSplit.from_examples(expected))
        assert data.stats["validation"] == stats


@pytest.mark.parametrize("cpus", [1, 2])
def test_num_proc_beyond_the_cpus_starts_one_process_per_cpu(tok, tmp_path, cpus):
    """data.num_proc: 1000000 on a 4,000-row file would fork four tokenizing processes (one
    per 1,000 rows) whatever the cores; as many as this process may run on (its affinity)."""
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < cpus:
        pytest.skip(f"this process may use {len(mine)} CPU(s)")
    cfg = _section(FORMATS["instruction"][0], tmp_path, num_proc=10**6)
    tables = row_tables(cfg.train, frozenset(numeric_fields(cfg)), tmp_path / "rows")
    os.sched_setaffinity(0, mine[:cpus])
    try:
        rows = encode_tables(tables, make_encoder(cfg, tok, None), tmp_path / "enc", cfg.num_proc)
    finally:
        os.sched_setaffinity(0, mine)
    assert len(rows.files) == cpus  # one Arrow shard per process (in this process for one)
    assert len(rows.lengths) == 4000


def test_num_proc_does_not_change_the_cache_key(tok):
    cfg = DataSection(train=str(DATA / "digits_train.jsonl"), format="instruction")
    assert cache_key(cfg, tok) == cache_key(cfg.model_copy(update={"num_proc": 7}), tok)


def _mapped_files(pid: int | str = "self") -> set[str]:
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split(maxsplit=5)[5] for line in lines if len(line.split(maxsplit=5)) == 6}


def test_cache_is_memory_mapped_not_copied(tok, tmp_path):
    cfg = DataSection(train=str(DATA / "digits_train.jsonl"), format="instruction",
                      val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    prepare_data(cfg, tok, seed=0)  # fills the cache
    (entry,) = (tmp_path / "cache").iterdir()
    data = prepare_data(cfg, tok, seed=0)
    for split, name in ((data.train, "train"), (data.validation, "validation")):
        for array in ("input_ids", "labels", "offsets"):
            value = getattr(split, array)
            assert isinstance(value, np.memmap) and not value.flags.writeable
            assert Path(value.filename) == entry / f"{name}.{array}.npy"
            assert str(entry / f"{name}.{array}.npy") in _mapped_files()


RANK_SCRIPT = """
import json, os, sys
from pathlib import Path
import numpy as np
import torch.distributed as dist
from transformers import AutoTokenizer
from launcher.data.pipeline import prepare_data
from launcher.ranks import Rank
from launcher.recipe.sections import DataSection
from launcher.train.setup import once_per_cluster

rank, local, world, cache = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
dist.init_process_group("gloo", init_method=f"file://{sys.argv[5]}", rank=rank, world_size=world)
tok = AutoTokenizer.from_pretrained(sys.argv[6])
cfg = DataSection(train=sys.argv[7], format="instruction", cache_dir=str(cache), num_proc=1)

def fill():
    found = [p.name for p in cache.iterdir() if not p.name.startswith(".")] if cache.exists() else []
    return bool(found), prepare_data(cfg, tok, seed=0)

warm, data = once_per_cluster(Rank(rank, world, local, None), fill)
maps = Path("/proc/self/maps").read_text()
mapped = isinstance(data.train.input_ids, np.memmap) and str(data.train.input_ids.filename) in maps
print(json.dumps({"rank": rank, "tokenized": not warm, "mapped": mapped,
                  "tokens": int(data.train.offsets[-1])}), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.parametrize("shared", [True, False], ids=["shared-cache", "node-local-caches"])
def test_once_per_cluster_with_shared_storage_once_per_node_without(tmp_path, shared):
    """Four ranks as two nodes of two (real processes, gloo): on a cache both nodes see only
    rank 0 tokenizes; with one cache per node, rank 0 and the second node's first rank do.
    Every rank reads its entry memory-mapped. On main both nodes' first ranks tokenized at
    once, whatever the storage."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join((DATA / "digits_train.jsonl").read_text().splitlines(True)[:300]))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = []
    for rank, local in ((0, 0), (1, 1), (2, 0), (3, 1)):
        cache = tmp_path / ("cache" if shared else f"node{rank // 2}-cache")
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(rank), str(local), "4", str(cache),
             str(tmp_path / "rendezvous"), str(DATA / "tokenizer"), str(data)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    tokenized = sorted(r["rank"] for r in results if r["tokenized"])
    assert tokenized == ([0] if shared else [0, 2])
    assert all(r["mapped"] for r in results)
    assert len({r["tokens"] for r in results}) == 1


RACE_SCRIPT = """
import hashlib, json, sys, time
from pathlib import Path
import numpy as np
from transformers import AutoTokenizer
from launcher.data.pipeline import prepare_data
from launcher.recipe.sections import DataSection

tok = AutoTokenizer.from_pretrained(sys.argv[1])
cfg = DataSection(train=sys.argv[2], format="instruction", val_fraction=0.1,
                  cache_dir=sys.argv[3], num_proc=2)
Path(sys.argv[4] + f".ready.{sys.argv[5]}").touch()
while not Path(sys.argv[4]).exists():
    time.sleep(0.01)
data = prepare_data(cfg, tok, seed=0)
h = hashlib.sha256()
for split in (data.train, data.validation):
    for array in split.arrays().values():
        h.update(np.ascontiguousarray(array).tobytes())
print(json.dumps({"digest": h.hexdigest()}), flush=True)
"""


def test_two_runs_racing_on_one_cache_both_succeed_with_the_same_data(tmp_path):
    """Two processes start tokenizing the same data into one cold cache at the same moment:
    both finish, with identical arrays, one entry is left and no temporary directory."""
    script = tmp_path / "race.py"
    script.write_text(RACE_SCRIPT)
    go, cache = tmp_path / "go", tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen([sys.executable, str(script), str(DATA / "tokenizer"),
                               str(DATA / "digits_train.jsonl"), str(cache), str(go), str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for n in range(2)]
    while len(list(tmp_path.glob("go.ready.*"))) < 2 and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    go.touch()  # both have imported and wait at the start line
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    digests = {json.loads(out.strip().splitlines()[-1])["digest"] for out, _ in outs}
    assert len(digests) == 1
    assert [p.name for p in cache.iterdir()] == [p.name for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(list(cache.iterdir())) == 1


def test_a_build_killed_mid_write_leaves_scratch_the_next_build_removes(tok, tmp_path):
    """SIGKILL (no clean-up runs) while a process writes a cache entry: its scratch directory
    stays; the next build on this host removes it, and only it: a live process's scratch,
    another host's and a name ftlaunch does not write are kept."""
    import signal
    import socket

    from launcher.data.pipeline import remove_abandoned_scratch

    script, go, cache = tmp_path / "race.py", tmp_path / "go", tmp_path / "cache"
    script.write_text(RACE_SCRIPT)
    go.touch()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, str(script), str(DATA / "tokenizer"),
                             str(DATA / "digits_train.jsonl"), str(cache), str(go), "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (cache.is_dir() and any(p.name.startswith(".") for p in cache.iterdir())):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    abandoned = [p for p in cache.iterdir() if p.name.startswith(".")]
    assert len(abandoned) == 1 and f".{proc.pid}." in abandoned[0].name
    host = socket.gethostname().replace(".", "_")
    kept = [cache / f".{'a' * 32}.{host}.{os.getpid()}.live", cache / f".{'b' * 32}.elsewhere.1.x",
            cache / ".not-ours", cache / f".{'c' * 32}.{host}.{proc.pid}.file"]
    for path in kept[:3]:
        path.mkdir()
    kept[3].write_text("a file, not a directory ftlaunch made")
    cfg = DataSection(train=str(DATA / "digits_train.jsonl"), format="instruction",
                      val_fraction=0.1, cache_dir=str(cache), num_proc=2)
    data = prepare_data(cfg, tok, seed=0)
    assert len(data.train) > 0
    assert not abandoned[0].exists()
    assert all(p.exists() for p in kept)
    assert remove_abandoned_scratch(cache) == []


def _bad_file(tmp_path: Path, line: str) -> tuple[Path, int]:
    """4,000 good rows with one bad row deep in the second process's half."""
    rows = (DATA / "digits_train.jsonl").read_text().splitlines()
    bad = 3500
    rows[bad - 1] = line
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path, bad


@pytest.mark.parametrize(("line", "message"), [
    ('{"instruction": "add", "input": "1 2"}', "missing field 'output'"),
    ('["not", "an", "object"]', "each line must be a JSON object, got an array"),
    ('{"instruction": "add", "output": 3}', "field 'output' must be a string, got int"),
], ids=["missing-field", "not-an-object", "wrong-type"])
def test_bad_row_in_a_tokenizing_process_names_its_line_and_writes_nothing(
    cli, tmp_path, line, message
):
    path, bad = _bad_file(tmp_path, line)
    cache = tmp_path / "cache"
    recipe = tiny_recipe(tmp_path / "run", data={"train": str(path), "validation": None,
                                                 "val_fraction": 0.1, "num_proc": 2,
                                                 "cache_dir": str(cache)})
    code, _, err = cli("check", write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 2 and f"{path}:{bad}: {message}" in err and "Traceback" not in err, err
    assert not cache.exists() or list(cache.iterdir()) == []


def brute_force_first_fit_decreasing(lengths: np.ndarray, max_length: int) -> list[tuple[int, ...]]:
    """The definition: longest first, each into the first row with room, scanning every row."""
    rows: list[list[int]] = []
    space: list[int] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        for b, free in enumerate(space):
            if n <= free:
                rows[b].append(i)
                space[b] -= n
                break
        else:
            rows.append([i])
            space.append(max_length - n)
    return [tuple(sorted(r)) for r in rows]


@pytest.mark.parametrize("seed", range(4))
def test_packing_plan_is_first_fit_decreasing(seed):
    rng = np.random.default_rng(seed)
    max_length = int(rng.choice([16, 64, 512]))
    lengths = rng.integers(1, max_length + 1, int(rng.integers(1, 3000)))
    packed = pack_examples(lengths, max_length)
    assert list(packed.rows) == brute_force_first_fit_decreasing(lengths, max_length)
    assert packed.members.dtype == np.int64 and len(packed.starts) == len(packed) + 1
