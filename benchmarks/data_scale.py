"""Data preparation at scale: ftlaunch's tokenization against a plain ``datasets.map``.

    python benchmarks/data_scale.py --out /tmp/ds --alpaca-rows 1000000 --chat-rows 200000

writes an alpaca-style JSON Lines file and a multi-turn chat file of made-up words, trains a
byte-level BPE fast tokenizer on a sample of them, and measures, each in a fresh process:

* ``ftlaunch check`` with a cold cache (a new ``data.cache_dir``): wall time, examples/s and
  the driver's peak resident set (``VmHWM`` of that process; the tokenizing subprocesses'
  largest peak is reported apart), and the same command on a 100-row file (the baseline the
  target "peak RSS above the 100-row run at most 2x the input file" is measured from);
* ftlaunch's data preparation alone (``prepare_data`` with a cold cache, timed from after the
  tokenizer is loaded, as the plain map below is: the fair throughput comparison, where the
  ``check`` wall time also holds the command's imports, model config and start-up);
* a plain ``datasets.load_dataset("json")`` + ``map(batched=True, num_proc=N)`` that builds the
  same prompts and masked labels with the tokenizer's batch call (chat: the tokenizer's chat
  template with ``return_assistant_tokens_mask``);
* per-rank memory: R processes each do what a training rank does with the data (load the warm
  cache, plan packed rows and steps, collate every unit once) and report their resident set
  split into anonymous memory (private to the rank), file-backed pages (the page cache the
  ranks of a node share) and PSS (the rank's share of both).

``--only`` picks measurements; ``--old`` leaves out settings an older ftlaunch lacks
(data.num_proc), to measure the code before a change with ``PYTHONPATH`` pointing at it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def _words(rng: np.random.Generator, vocab: list[str], n: int) -> str:
    return " ".join(vocab[i] for i in rng.zipf(1.3, n) % len(vocab))


def generate(out: Path, alpaca_rows: int, chat_rows: int, seed: int = 0) -> dict[str, Path]:
    """Alpaca rows of ~385 bytes (the real set's mean) and chat rows of 1-3 exchanges."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    vocab = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(20000)]
    paths = {"alpaca": out / "alpaca.jsonl", "chat": out / "chat.jsonl",
             "alpaca100": out / "alpaca100.jsonl", "chat100": out / "chat100.jsonl"}
    with paths["alpaca"].open("w") as f:
        for _ in range(alpaca_rows):
            extra = _words(rng, vocab, int(rng.integers(5, 25))) if rng.random() < 0.4 else ""
            row = {"instruction": _words(rng, vocab, int(rng.integers(5, 20))), "input": extra,
                   "output": _words(rng, vocab, int(rng.integers(10, 90)))}
            f.write(json.dumps(row) + "\n")
    with paths["chat"].open("w") as f:
        for _ in range(chat_rows):
            turns = [{"role": "system", "content": _words(rng, vocab, 8)}]
            for _ in range(int(rng.integers(1, 4))):
                turns.append({"role": "user", "content": _words(rng, vocab, int(rng.integers(5, 30)))})
                turns.append({"role": "assistant",
                              "content": _words(rng, vocab, int(rng.integers(10, 60)))})
            f.write(json.dumps({"messages": turns}) + "\n")
    for name in ("alpaca", "chat"):
        with paths[name].open() as src, paths[f"{name}100"].open("w") as dst:
            dst.writelines(line for _, line in zip(range(100), src))
    return paths


def build_tokenizer(sample: Path, out: Path) -> Path:
    """A byte-level BPE fast tokenizer (4096 tokens) trained on the first 20k rows."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    with sample.open() as f:
        texts = [line for _, line in zip(range(20000), f)]
    bpe = ByteLevelBPETokenizer()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(texts, vocab_size=4096, special_tokens=specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out


def write_recipe(path: Path, data: Path, fmt: str, tokenizer: Path, cache: Path,
                 num_proc: int | None, packing: bool) -> Path:
    import yaml

    recipe = {
        "output_dir": str(path.parent / "run"), "method": "full",
        "model": {"architecture": {"model_type": "llama", "vocab_size": 4096, "hidden_size": 32,
                                   "intermediate_size": 64, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "max_position_embeddings": 1024},
                  "tokenizer": str(tokenizer), "dtype": "fp32"},
        "data": {"train": str(data), "format": fmt, "max_length": 1024, "val_fraction": 0.01,
                 "packing": packing, "cache_dir": str(cache),
                 **({"num_proc": num_proc} if num_proc else {})},
        "train": {"max_steps": 2, "micro_batch_size": 1},
        "resources": {"num_workers": 1, "use_gpu": False},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def _memory() -> dict[str, float]:
    """This process's peak and current resident set, and its parts now, in MB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            fields["Pss"] = int(line.split()[1]) / 1024
    import resource

    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    fields["children_peak"] = kids.ru_maxrss / 1024
    fields["cpu_s"] = me.ru_utime + me.ru_stime
    fields["children_cpu_s"] = kids.ru_utime + kids.ru_stime
    return fields


def child_check(recipe: str) -> dict[str, object]:
    from launcher.cli import main

    start = time.perf_counter()
    code = main(["check", recipe])
    return {"code": code, "wall_s": time.perf_counter() - start, **_memory()}


def child_prepare(recipe_path: str) -> dict[str, object]:
    from launcher.data.pipeline import prepare_data
    from launcher.model.build import load_tokenizer
    from launcher.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    tok = load_tokenizer(recipe.model)
    start = time.perf_counter()
    data = prepare_data(recipe.data, tok, recipe.train.seed, recipe.labels)
    return {"examples": len(data.train), "wall_s": time.perf_counter() - start, **_memory()}


def child_plain(data: str, fmt: str, tokenizer: str, num_proc: int, cache: str) -> dict[str, object]:
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=data, split="train", cache_dir=cache)
    fn = _plain_instruction if fmt == "instruction" else _plain_chat
    out = ds.map(fn, batched=True, num_proc=num_proc, remove_columns=ds.column_names,
                 fn_kwargs={"tok": tok})
    return {"rows": len(out), "wall_s": time.perf_counter() - start, **_memory()}


def _plain_instruction(batch: dict, tok) -> dict:
    prompts = [PROMPT.format(instruction=i, input_block=f"### Input:\n{x}\n\n" if x else "")
               for i, x in zip(batch["instruction"], batch["input"])]
    p = tok(prompts)["input_ids"]
    a = tok(batch["output"], add_special_tokens=False)["input_ids"]
    ids = [x + y + [tok.eos_token_id] for x, y in zip(p, a)]
    labels = [[-100] * len(x) + y + [tok.eos_token_id] for x, y in zip(p, a)]
    return {"input_ids": ids, "labels": labels}


def _plain_chat(batch: dict, tok) -> dict:
    enc = tok.apply_chat_template(batch["messages"], return_dict=True,
                                  return_assistant_tokens_mask=True)
    labels = [[t if m else -100 for t, m in zip(ids, mask)]
              for ids, mask in zip(enc["input_ids"], enc["assistant_masks"])]
    return {"input_ids": enc["input_ids"], "labels": labels}


def child_rank(recipe_path: str, barrier: str, ranks: int) -> dict[str, object]:
    """What a training rank does with the data, then this process's memory."""
    import torch
    from transformers import AutoTokenizer

    from launcher.data.batch import Batches, StepPlan
    from launcher.data.pack import pack_examples
    from launcher.data.pipeline import prepare_data
    from launcher.recipe import load_recipe

    recipe = load_recipe(recipe_path, [], None)
    tok = AutoTokenizer.from_pretrained(recipe.model.tokenizer)
    before = _memory()
    data = prepare_data(recipe.data, tok, recipe.train.seed, recipe.labels)
    packed = (pack_examples(data.train.lengths(), recipe.data.max_length)
              if recipe.data.packing else None)
    batches = Batches(data.train, packed, tok.pad_token_id, torch.float32, "flash_attention_2")
    plan = StepPlan(batches.units(), 8, 1, 1, 0, True)
    tokens = 0
    for step in range(plan.steps_per_epoch):
        for micro in plan.micro_batches(step, 0):
            tokens += int(batches.make(micro, torch.device("cpu"))["input_ids"].numel())
    Path(barrier, str(os.getpid())).touch()  # hold the mappings until every rank is done
    while len(os.listdir(barrier)) < ranks:
        time.sleep(0.05)
    after = _memory()
    return {"tokens": tokens, "units": batches.units(),
            **{f"{k}": after[k] - before[k] for k in ("RssAnon", "RssFile", "Pss")},
            "VmHWM": after["VmHWM"]}


def run_child(*args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"{k}.jsonl" for k in ("alpaca", "chat", "alpaca100", "chat100")}
    if not all(p.exists() for p in paths.values()):
        paths = generate(out, args.alpaca_rows, args.chat_rows)
    tok = out / "tokenizer"
    if not tok.exists():
        build_tokenizer(paths["alpaca"], tok)
    tag = f"{args.tag}-{int(time.time())}"
    results = []
    for name in args.data:
        fmt = "instruction" if name.startswith("alpaca") else "chat"
        rows = sum(1 for _ in paths[name].open())
        size_mb = paths[name].stat().st_size / 2**20
        report = {"data": name, "rows": rows, "file_mb": round(size_mb, 1)}
        if "check" in args.only:
            for small in ("", "100"):
                src = paths[name + small] if small else paths[name]
                recipe = write_recipe(out / f"{tag}-{name}{small}.yaml", src, fmt, tok,
                                      out / f"cache-{tag}-{name}{small}",
                                      None if args.old else args.num_proc, args.packing)
                r = run_child("_check", str(recipe))
                report[f"check{small}"] = r
            report["check_rows_per_s"] = rows / report["check"]["wall_s"]
            report["peak_above_100_rows_mb"] = report["check"]["VmHWM"] - report["check100"]["VmHWM"]
            report["peak_above_100_rows_x_file"] = report["peak_above_100_rows_mb"] / size_mb
        if "prepare" in args.only:
            recipe = write_recipe(out / f"{tag}-{name}-prepare.yaml", paths[name], fmt, tok,
                                  out / f"cache-{tag}-{name}-prepare",
                                  None if args.old else args.num_proc, args.packing)
            report["prepare"] = run_child("_prepare", str(recipe))
            report["prepare_rows_per_s"] = rows / report["prepare"]["wall_s"]
        if "plain" in args.only:
            r = run_child("_plain", str(paths[name]), fmt, str(tok), str(args.num_proc),
                          str(out / f"hf-{tag}-{name}"))
            report["plain"] = r
            report["plain_rows_per_s"] = rows / r["wall_s"]
        if "ranks" in args.only:
            recipe = write_recipe(out / f"{tag}-{name}-ranks.yaml", paths[name], fmt, tok,
                                  out / f"cache-{tag}-{name}-ranks",
                                  None if args.old else args.num_proc, args.packing)
            run_child("_check", str(recipe))  # warm the cache
            report["ranks"] = {str(n): measure_ranks(recipe, n, out / f"barrier-{tag}-{name}-{n}")
                               for n in args.ranks}
        results.append(report)
        print(json.dumps(report, indent=1), flush=True)
    load = os.getloadavg()
    print(json.dumps({"load_avg": load, "num_proc": args.num_proc, "tag": tag}))


def measure_ranks(recipe: Path, ranks: int, barrier: Path) -> list[dict[str, object]]:
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, __file__, "_rank", str(recipe), str(barrier),
                               str(ranks)], stdout=subprocess.PIPE, text=True)
             for _ in range(ranks)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("a rank failed")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        kind, rest = sys.argv[1], sys.argv[2:]
        if kind == "_check":
            result = child_check(*rest)
        elif kind == "_prepare":
            result = child_prepare(*rest)
        elif kind == "_plain":
            result = child_plain(rest[0], rest[1], rest[2], int(rest[3]), rest[4])
        else:
            result = child_rank(rest[0], rest[1], int(rest[2]))
        print(json.dumps(result), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--alpaca-rows", type=int, default=1_000_000)
    parser.add_argument("--chat-rows", type=int, default=200_000)
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--data", nargs="+", default=["alpaca", "chat"],
                        choices=["alpaca", "chat"])
    parser.add_argument("--only", nargs="+", default=["check", "prepare", "plain", "ranks"],
                        choices=["check", "prepare", "plain", "ranks"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--old", action="store_true")
    parser.add_argument("--packing", action="store_true",
                        help="pack examples (the code before the change packed in quadratic time)")
    parser.add_argument("--tag", default="run")
    measure(parser.parse_args())


if __name__ == "__main__":
    main()
