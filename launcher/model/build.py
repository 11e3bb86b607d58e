"""Tokenizer and model construction: weights or a fresh config, dtype, attention kernel,
LoRA through peft, gradient checkpointing, and the ZeRO-3 construction order."""

from __future__ import annotations

import importlib.util
import re
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from launcher.errors import UserInputError
from launcher.recipe import TASKS
from launcher.recipe.sections import ModelSection

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_ATTENTION = {
    "flash_attention_2": "flash_attention_2",
    "flex": "flex_attention",
    "sdpa": "sdpa",
    "eager": "eager",
}
COMMIT = re.compile(r"^[0-9a-f]{40}$")
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
def auto_model_class(task: str) -> Any:
    """The transformers Auto class that builds, saves and reloads a model for ``task``."""
    import transformers

    return getattr(transformers, TASKS[task].auto_class)


def flash_attention_available() -> bool:
    if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
        return False
    return torch.cuda.get_device_capability() >= (8, 0)


def resolve_attention(requested: str, on_gpu: bool) -> str:
    """The transformers attn_implementation for a recipe's model.attention on this machine."""
    if requested == "auto":
        return "flash_attention_2" if on_gpu and flash_attention_available() else "sdpa"
    if requested == "flash_attention_2" and not flash_attention_available():
        raise UserInputError(
            "model.attention",
            "flash_attention_2 needs a CUDA GPU of compute capability 8.0+ and the flash-attn "
            "package (pip install 'ftlaunch[gpu]'); use auto or sdpa",
        )
    if requested == "flex" and not on_gpu:
        raise UserInputError(
            "model.attention", "flex attention has no backward pass on CPU; use auto or sdpa"
        )
    return HF_ATTENTION[requested]


def remote_code_sources(cfg: ModelSection) -> dict[str, str]:
    """Recipe field -> what is loaded from it: the config and weights, and the tokenizer."""
    sources = {"model.tokenizer": cfg.tokenizer or cfg.name_or_path}
    if cfg.name_or_path is not None:
        sources["model.name_or_path"] = cfg.name_or_path
    return sources


def check_remote_code_pins(cfg: ModelSection) -> None:
    """With trust_remote_code every object loaded runs code it ships, so each must be pinned.

    A local directory runs the code it holds (model.revision does not apply to it). A hub
    repository must be model.name_or_path at a full commit hash in model.revision: a branch or
    tag can be moved to other code, and model.revision pins no other repository, so a
    tokenizer from a different hub repository is refused.
    """
    if not cfg.trust_remote_code:
        return
    for field, source in remote_code_sources(cfg).items():
        if Path(source).is_dir():
            continue
        if source != cfg.name_or_path:
            raise UserInputError(
                field,
                f"'{source}' is a hub repository other than model.name_or_path, so "
                "model.revision does not pin it, and with model.trust_remote_code its code "
                "would run unpinned: use a local directory (a snapshot you checked) or leave "
                "model.tokenizer unset to take the pinned model's tokenizer",
            )
        if not COMMIT.match(cfg.revision or ""):
            raise UserInputError(
                "model.revision",
                f"'{cfg.revision}' is not a full commit hash (40 hex digits); with "
                "model.trust_remote_code a branch or tag could be moved to other code",
            )


def remote_code_kwargs(cfg: ModelSection) -> dict[str, Any]:
    """What building a model from a config loaded with :func:`load_model_config` needs to run
    the code that config names: the recipe's trust, and for a hub repository its pinned commit
    (a local directory runs the code it holds)."""
    if not cfg.trust_remote_code:
        return {}
    kwargs: dict[str, Any] = {"trust_remote_code": True}
    if cfg.name_or_path is not None and not Path(cfg.name_or_path).is_dir():
        kwargs["code_revision"] = cfg.revision
    return kwargs


def load_tokenizer(cfg: ModelSection, padding_side: str | None = None) -> Any:
    """The recipe's tokenizer; a ``padding_side`` given here is saved with it."""
    from transformers import AutoTokenizer

    check_remote_code_pins(cfg)
    source = cfg.tokenizer or cfg.name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source,
            revision=cfg.revision if source == cfg.name_or_path else None,
            trust_remote_code=cfg.trust_remote_code,
            **({"padding_side": padding_side} if padding_side else {}),
        )
    except (OSError, ValueError) as e:
        raise UserInputError("model.tokenizer", f"cannot load tokenizer '{source}': {e}") from None
    if tokenizer.eos_token_id is None:
        raise UserInputError("model.tokenizer", f"tokenizer '{source}' has no eos token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(cfg: ModelSection) -> Any:
    from transformers import AutoConfig

    check_remote_code_pins(cfg)
    if cfg.architecture is not None:
        spec = dict(cfg.architecture)
        model_type = spec.pop("model_type")
        from huggingface_hub.errors import StrictDataclassError

        try:
            return AutoConfig.for_model(model_type, **spec)
        except (KeyError, ValueError, TypeError, StrictDataclassError) as e:
            raise UserInputError("model.architecture", str(e)) from None
    try:
        return AutoConfig.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise UserInputError("model.name_or_path", f"cannot load '{cfg.name_or_path}': {e}") from None


def max_positions(config: Any) -> int | None:
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def hidden_size(config: Any) -> int | None:
    value = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    return value if isinstance(value, int) else None


def meta_model(
    config: Any, task: str = "causal_lm", remote: dict[str, Any] | None = None
) -> torch.nn.Module:
    """The model's module tree without allocating weights (for name checks on the driver);
    ``remote`` is :func:`remote_code_kwargs` for a config whose classes are remote code."""
    try:
        with torch.device("meta"):
            return auto_model_class(task).from_config(config, **(remote or {}))
    except (TypeError, ValueError, ArithmeticError) as e:  # a config value of the wrong kind
        raise UserInputError("model", f"the model cannot be built from its config: {e}") from None


def zero3_init_context(ds_config: dict[str, Any]) -> AbstractContextManager[Any]:
    """Under ZeRO-3, transformers partitions weights at construction while this object lives,
    so no rank materialises the whole model. Keep it alive until deepspeed.initialize."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        return nullcontext()
    from transformers.integrations import HfDeepSpeedConfig

    holder = HfDeepSpeedConfig(ds_config)
    return _KeepAlive(holder)


class _KeepAlive(AbstractContextManager[Any]):
    def __init__(self, obj: Any):
        self.obj = obj

    def __exit__(self, *exc: Any) -> None:
        self.obj = None


def build_model(
    cfg: ModelSection, config: Any, attention: str, task: str = "causal_lm"
) -> torch.nn.Module:
    """The model for ``task``; a classification head missing from the checkpoint is freshly
    initialised (``config`` carries its labels, see the task's configure)."""
    check_remote_code_pins(cfg)
    auto = auto_model_class(task)
    dtype = DTYPES[cfg.dtype]
    if cfg.architecture is not None:
        return auto.from_config(config, attn_implementation=attention, dtype=dtype)
    return auto.from_pretrained(
        cfg.name_or_path,
        config=config,
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=attention,
        dtype=dtype,
        **quantization_kwargs(cfg),
    )


def quantization_kwargs(cfg: ModelSection) -> dict[str, Any]:
    """QLoRA's base: 4-bit NF4 weights with double quantization, on this rank's GPU."""
    if cfg.quantization == "none":
        return {}
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[cfg.dtype],
    )
    return {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}


def enable_gradient_checkpointing(model: Any, every: int = 1) -> None:
    """Non-reentrant activation checkpointing of every ``every``-th decoder layer (index % every
    == 0), through transformers' own per-layer switch."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs, every_n_layers=every
        )
    elif every == 1:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise UserInputError(
            "model.checkpoint_every",
            "checkpointing every k-th layer needs a transformers release with "
            "activation_checkpointing_enable(every_n_layers=...); use 1",
        )
    model.config.use_cache = False


def head_module_names(model: torch.nn.Module) -> list[str]:
    """A task head's top-level modules (``classifier`` for BERT, ``score`` for Llama): the
    children with parameters that are not the pretrained body."""
    body = getattr(model, "base_model_prefix", "")
    return [
        name
        for name, child in model.named_children()
        if name != body and any(True for _ in child.parameters())
    ]
