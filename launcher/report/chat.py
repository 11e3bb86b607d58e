"""``ftlaunch chat RUN_DIR``: greedy replies from the run's exported model (final/), streamed.

The prompt is built the way training built it: the instruction format's prompt_template, the
chat format's chat template (the conversation so far, then the generation prompt), or plain
text for the text format. Adapters load through peft, on the base the export names.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.data.encode import fill_prompt, resolve_chat_template
from launcher.errors import UserInputError
from launcher.run.export import EXPORT_MARK, load_exported
from launcher.model.build import DTYPES
from launcher.recipe import Recipe
from launcher.report.history import require_run_dir
from launcher.run.rundir import RESOLVED, RunDir, load_resolved


@dataclass
class Session:
    recipe: Recipe
    model: Any
    tokenizer: Any
    template: str | None  # chat format: the template training rendered with
    history: list[dict[str, str]] = field(default_factory=list)  # chat format: earlier turns


def open_session(run_dir: Path) -> Session:
    recipe = load_resolved(require_run_dir(run_dir))
    if not recipe.task_kind.generates:
        raise UserInputError(
            str(run_dir / RESOLVED), f"chat needs a causal_lm run; this run trains {recipe.task}"
        )
    final = RunDir(run_dir).final
    if not (final / EXPORT_MARK).is_file():
        raise UserInputError(
            str(final), "no verified export here; train to the end or run 'ftlaunch export RUN_DIR'"
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(final), trust_remote_code=recipe.model.trust_remote_code
    )
    template = resolve_chat_template(recipe.data, tokenizer) if recipe.data.format == "chat" else None
    model = load_exported(final, DTYPES[recipe.model.dtype], recipe.task)
    return Session(recipe, model, tokenizer, template)


def prompt_ids(session: Session, text: str) -> list[int]:
    """The token ids training would have put before the answer to ``text``."""
    data, tokenizer = session.recipe.data, session.tokenizer
    if data.format == "instruction":
        prompt = fill_prompt(data.prompt_template, {"instruction": text, "input": "", "input_block": ""})
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if data.format == "chat":
        messages = [*session.history, {"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=session.template
        )
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def reply(session: Session, text: str, max_new_tokens: int) -> str:
    """Greedy-decode an answer to ``text``, printing it to stdout as it is generated."""
    import torch
    from transformers import TextStreamer

    tokenizer = session.tokenizer
    ids = torch.tensor([prompt_ids(session, text)])
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = session.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, streamer=streamer, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if session.recipe.data.format == "chat":
        session.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
    return answer


def run(run_dir: Path, prompt: str | None, max_new_tokens: int) -> int:
    if max_new_tokens < 1:
        raise UserInputError("--max-new-tokens", "must be at least 1")
    session = open_session(run_dir)
    if prompt is not None:
        reply(session, prompt, max_new_tokens)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("[ftlaunch] one message per line; Ctrl-D to end", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if line.strip():
            reply(session, line.rstrip("\n"), max_new_tokens)
