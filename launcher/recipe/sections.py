"""The recipe's sections: one frozen, documented model per component (each field's description
is its documentation); the Recipe that holds them is schema.py."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


AttentionKernel = Literal["auto", "flash_attention_2", "flex", "sdpa", "eager"]


PositiveInt = Annotated[int, Field(gt=0)]


class Section(BaseModel):
    """Every recipe section: frozen, no unknown keys, and no infinite or NaN number (YAML's
    ``.inf``, or ``1e309`` from ``--set``, would pass a bound such as ``gt=0``)."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", protected_namespaces=(), allow_inf_nan=False
    )


ARCHITECTURE_SIZES = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "d_model",
)


def _check_architecture_sizes(architecture: dict[str, Any]) -> None:
    """The sizes the launcher itself computes with (bucket sizes, FLOPs, memory) must be
    whole positive numbers before anything multiplies them."""
    for key in ARCHITECTURE_SIZES:
        if key not in architecture:
            continue
        value = architecture[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31:
            raise ValueError(
                f"model.architecture.{key}: must be a whole number from 1 to 2**31, got {value!r}"
            )


class ModelSection(Section):
    name_or_path: str | None = Field(
        None, description="Hugging Face hub id or local directory of a pretrained model."
    )
    architecture: dict[str, Any] | None = Field(
        None,
        description="Build a freshly initialised model from this config instead of loading "
        "weights, e.g. {model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}.",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer hub id or directory; defaults to model.name_or_path."
    )
    revision: str | None = Field(
        None, description="Git revision (commit, tag or branch) of the hub model to load."
    )
    trust_remote_code: bool = Field(
        False,
        description="Run modelling code shipped with the checkpoint. Requires a pinned "
        "model.revision so the code cannot change under you.",
    )
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "bf16", description="Training precision. bf16 needs an Ampere+ GPU or a CPU."
    )
    attention: AttentionKernel = Field(
        "auto",
        description="Attention kernel. auto picks flash_attention_2 on an sm80+ GPU with "
        "flash-attn installed, else sdpa. An explicit kernel this machine cannot run is an error.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass (non-reentrant); which layers "
        "is set by model.checkpoint_every.",
    )
    checkpoint_every: PositiveInt = Field(
        1,
        description="Activation checkpointing policy with gradient_checkpointing: checkpoint "
        "every k-th decoder layer (those whose index % k == 0). 1 checkpoints every layer; a "
        "larger k keeps the other layers' activations, trading memory for less recomputation.",
    )
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto",
        description="Fused training kernels. liger: Liger's Triton kernels (RMSNorm, SwiGLU, "
        "RoPE) for the model families liger-kernel supports, on GPU; auto: liger where that "
        "is possible here, else none. An explicit liger this machine cannot run is an error.",
    )
    loss: Literal["auto", "fused", "chunked", "plain"] = Field(
        "auto",
        description="Cross-entropy implementation. fused: Liger's fused linear cross-entropy "
        "(needs Liger kernels; not with ZeRO-3); chunked: output projection and cross-entropy "
        "over chunks of target tokens, recomputed in the backward pass, so [tokens, vocab] "
        "logits never exist; plain: full logits; auto: fused where possible, else chunked.",
    )
    loss_chunk_size: PositiveInt = Field(
        4096, description="Target tokens per chunk of the chunked loss."
    )
    quantization: Literal["none", "nf4"] = Field(
        "none",
        description="QLoRA: load the pretrained base in 4-bit NF4 with bitsandbytes (double "
        "quantization, compute in model.dtype) and train LoRA adapters on it. GPUs only; not "
        "with ZeRO-3, which cannot partition 4-bit weights.",
    )
    compile: bool = Field(
        False,
        description="Compile the model with torch.compile (DeepSpeed engine.compile()); the "
        "first steps are slow while it compiles.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.name_or_path is None) == (self.architecture is None):
            raise ValueError("set exactly one of model.name_or_path or model.architecture")
        if self.architecture is not None:
            if "model_type" not in self.architecture:
                raise ValueError("model.architecture needs a model_type, e.g. llama")
            if self.tokenizer is None:
                raise ValueError("model.tokenizer is required with model.architecture")
            _check_architecture_sizes(self.architecture)
        if self.trust_remote_code and self.revision is None:
            raise ValueError("model.trust_remote_code needs a pinned model.revision")
        if self.checkpoint_every > 1 and not self.gradient_checkpointing:
            raise ValueError("model.checkpoint_every: needs model.gradient_checkpointing: true")
        if self.loss == "fused" and self.kernels == "none":
            raise ValueError(
                "model.loss: fused comes with Liger kernels; set model.kernels to auto or liger"
            )
        return self


class LoraSection(Section):
    r: PositiveInt = Field(16, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module name suffixes to adapt (e.g. [q_proj, v_proj]) or all-linear. "
        "Every listed name must match a module of the model.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full beside the adapter."
    )
    use_dora: bool = Field(
        False,
        description="DoRA: decompose each adapted weight into magnitude and direction and "
        "adapt the direction with LoRA (peft use_dora).",
    )
    use_rslora: bool = Field(
        False, description="Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r."
    )


class DistillSection(Section):
    teacher: str = Field(
        description="The teacher: a directory (e.g. a previous run's final/) or hub id of a "
        "model for the same task, with the student's tokenizer (and label set)."
    )
    alpha: float = Field(
        0.5, ge=0, le=1,
        description="Weight of the hard-label cross-entropy; 1 - alpha weighs the KL divergence "
        "to the teacher's softened predictions.",
    )
    temperature: float = Field(
        2.0, gt=0, description="Softening temperature T of both distributions (the KL term is "
        "scaled by T^2)."
    )


class PromptSection(Section):
    num_virtual_tokens: PositiveInt = Field(
        16,
        description="Learned virtual tokens: prepended to the input embeddings (prompt_tuning) "
        "or to every layer's keys and values (prefix_tuning).",
    )


class IA3Section(Section):
    target_modules: list[str] | None = Field(
        None,
        description="Module name suffixes whose activations IA3 rescales; default: peft's "
        "choice for the model family (attention keys/values and the feed-forward output).",
    )
    feedforward_modules: list[str] | None = Field(
        None,
        description="Which of target_modules are feed-forward layers (their input is rescaled, "
        "not their output); default: peft's choice for the model family.",
    )


class DataSource(Section):
    path: str = Field(
        description="A local .jsonl/.json/.parquet/.csv file, a directory of them, or a hub "
        "dataset name."
    )
    split: str = Field("train", description="Split to read from a hub dataset or directory.")
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    revision: str | None = Field(None, description="Hub dataset revision.")


class FieldNames(Section):
    instruction: str = Field("instruction", description="instruction format: the task text.")
    input: str = Field("input", description="instruction format: optional extra input.")
    output: str = Field("output", description="instruction format: the target response.")
    text: str = Field("text", description="text format: the document.")
    messages: str | None = Field(
        None, description="chat format: the list of turns; default messages or conversations."
    )
    role: str | None = Field(None, description="chat format: turn role key; default role/from.")
    content: str | None = Field(
        None, description="chat format: turn text key; default content/value."
    )
    text_pair: str | None = Field(
        None,
        description="classification format: the second text of a pair task (e.g. sentence2 "
        "for MRPC); the first is fields.text.",
    )
    label: str = Field(
        "label",
        description="classification format: the label: a name or class index (single_label), "
        "a list of them (multi_label) or a number (regression).",
    )
    tokens: str = Field("tokens", description="tagging format: the list of words.")
    tags: str = Field(
        "tags", description="tagging format: one tag (name or index) per word, e.g. BIO tags."
    )


def _coerce_source(value: Any) -> Any:
    return {"path": value} if isinstance(value, str) else value


class DataSection(Section):
    train: DataSource = Field(description="Training data (a path string is shorthand).")
    validation: DataSource | None = Field(None, description="Validation data, if separate.")
    val_fraction: float = Field(
        0.0, ge=0, lt=0.5, description="Hold out this fraction of train as validation."
    )
    format: Literal["instruction", "chat", "text", "classification", "tagging"] = Field(
        description="instruction: alpaca-style instruction/input/output; chat: OpenAI "
        "messages (role/content) or ShareGPT conversations (from/value); text: plain documents; "
        "classification: a text (or text pair) and a label (task: sequence_classification); "
        "tagging: words and one tag per word (task: token_classification)."
    )
    fields: FieldNames = Field(default_factory=FieldNames, description="Column names.")
    chat_template: str | None = Field(
        None,
        description="Jinja chat template (inline or a file path) for tokenizers without one.",
    )
    prompt_template: str = Field(
        "### Instruction:\n{instruction}\n\n{input_block}### Response:\n",
        description="instruction format: how the prompt is rendered. {instruction}, {input} "
        "and {input_block} are replaced ({input_block} is '### Input:\\n{input}\\n\\n' when "
        "the row has an input, else empty); every other character, braces included, is literal.",
    )
    train_on_prompt: bool = Field(False, description="Train on prompt tokens too.")
    max_length: PositiveInt = Field(2048, description="Maximum tokens per example.")
    overflow: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with examples longer than max_length."
    )
    packing: bool = Field(
        False,
        description="Lay examples out without the padding of random batches, attention kept "
        "inside each example (see packing_layout).",
    )
    packing_layout: Literal["auto", "rows", "length_groups"] = Field(
        "auto",
        description="With packing: rows concatenates examples into rows of max_length "
        "(flash_attention_2: one padding-free row per micro batch; other kernels: a "
        "block-diagonal mask); length_groups puts examples of similar length side by side, "
        "right-padded, one group of at most micro_batch_size x max_length tokens per micro "
        "batch, with plain causal attention and no mask; auto: rows with flash_attention_2, "
        "else length_groups.",
    )
    shuffle: bool = Field(True, description="Shuffle the training set every epoch.")
    cache_dir: str | None = Field(
        None,
        description="Tokenization cache; default ~/.cache/ftlaunch/tokenized. On storage every "
        "node mounts, the data is tokenized once for the whole cluster; else once per node.",
    )
    num_proc: PositiveInt | None = Field(
        None,
        description="Processes that tokenize the data in parallel (datasets.map on a "
        "contiguous shard each); default, and at most, the CPUs this process may use. Does not "
        "change the tokens (nor the cache key).",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for key in ("train", "validation"):
                if key in data:
                    data[key] = _coerce_source(data[key])
        return data

    @model_validator(mode="after")
    def _one_validation(self) -> DataSection:
        if self.validation is not None and self.val_fraction > 0:
            raise ValueError("set data.validation or data.val_fraction, not both")
        if self.format == "instruction" and "{instruction}" not in self.prompt_template:
            raise ValueError("data.prompt_template: must contain the {instruction} placeholder")
        return self


class LabelsSection(Section):
    names: list[str] | None = Field(
        None,
        description="The label set, in class-index order (saved with the model as id2label / "
        "label2id). A label in the data is a name from this list or an integer index into it. "
        "Default: the distinct labels of the training data, sorted (tagging: 'O' first), "
        "resolved once before training and written to recipe.resolved.yaml.",
    )
    problem_type: Literal["single_label", "multi_label", "regression"] = Field(
        "single_label",
        description="single_label: one class per example (cross-entropy); multi_label: a list "
        "of classes per example (binary cross-entropy per class); regression: one number per "
        "example (mean squared error). token_classification is always single_label.",
    )

    @model_validator(mode="after")
    def _names(self) -> LabelsSection:
        if self.names is not None:
            if len(set(self.names)) != len(self.names):
                raise ValueError("labels.names: label names must be distinct")
            if self.problem_type == "regression":
                raise ValueError("labels.names: regression has no label names")
            if len(self.names) < 2 and self.problem_type == "single_label":
                raise ValueError("labels.names: a classification needs at least two labels")
        return self

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == "regression" else len(self.names or ())


