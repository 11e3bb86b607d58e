"""The recipe: one typed, frozen, documented schema for a fine-tuning run.

Every field's description is its documentation (``ftlaunch check --explain`` prints them).
Validation here is purely structural and arithmetic; checks that need the model, tokenizer or
hardware live in ``launcher/preflight.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from launcher.errors import UserInputError
from launcher.secret_env import SECRETS_HELP, is_secret_name, secret_key_paths
from launcher.yamlio import KeyPath, apply_overrides, load_yaml_with_lines

AttentionKernel = Literal["auto", "flash_attention_2", "flex", "sdpa", "eager"]
PositiveInt = Annotated[int, Field(gt=0)]


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


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
        description="Concatenate examples into rows of max_length with attention kept "
        "inside each example.",
    )
    shuffle: bool = Field(True, description="Shuffle the training set every epoch.")
    cache_dir: str | None = Field(
        None, description="Tokenization cache; default ~/.cache/ftlaunch/tokenized."
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


ADAPTER_SECTIONS = {
    "lora": "lora", "ia3": "ia3", "prompt_tuning": "prompt", "prefix_tuning": "prompt",
}
ADAPTER_METHODS = tuple(ADAPTER_SECTIONS)
TASK_FORMATS = {
    "causal_lm": ("instruction", "chat", "text"),
    "sequence_classification": ("classification",),
    "token_classification": ("tagging",),
}


class FreezeSection(Section):
    embeddings: bool = Field(
        False, description="Freeze the input embeddings (and position / token-type embeddings)."
    )
    first_layers: int = Field(0, ge=0, description="Freeze the first k transformer layers.")
    patterns: list[str] = Field(
        default_factory=list,
        description="Freeze every parameter whose name matches one of these regular "
        "expressions (re.search), e.g. ['^bert\\.pooler\\.']; each must match something.",
    )


class LrGroup(Section):
    pattern: str = Field(
        description="Regular expression (re.search) on parameter names, e.g. 'classifier|score'."
    )
    lr: float = Field(gt=0, description="Peak learning rate of the matching parameters.")


class TrainSection(Section):
    max_steps: PositiveInt | None = Field(
        None, description="Optimizer steps to run; default from train.epochs."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the data when max_steps is unset.")
    micro_batch_size: PositiveInt = Field(1, description="Examples per rank per forward pass.")
    grad_accum: PositiveInt = Field(1, description="Micro batches accumulated per step.")
    global_batch_size: PositiveInt | None = Field(
        None,
        description="Optional check: must equal micro_batch_size x grad_accum x num_workers.",
    )
    lr: float = Field(2e-5, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup."
    )
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps (overrides ratio).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warmup as a fraction of steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a fraction of lr.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null: off.")
    seed: int = Field(42, description="Seed for initialisation, shuffling and dropout.")
    freeze: FreezeSection = Field(
        default_factory=FreezeSection,
        description="Parameters kept frozen (method full or bitfit): embeddings, the first k "
        "layers, or names matching patterns.",
    )
    lr_groups: list[LrGroup] = Field(
        default_factory=list,
        description="Discriminative learning rates: a parameter takes the lr of the first group "
        "whose pattern matches its name, else train.lr; all follow the same schedule. E.g. "
        "[{pattern: classifier, lr: 1e-3}] for a faster new head.",
    )


class DeepSpeedSection(Section):
    config: str = Field(
        "zero2",
        description="A preset name from ds_configs/ (zero1, zero2, zero3, zero3_offload) or a "
        "path to a DeepSpeed JSON file; 'auto' values are filled from the recipe.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Deep-merged into the DeepSpeed config. Secret-looking keys (api_key, "
        "*_token, password, ...) are refused at any depth: the recipe and ds_config.json are "
        "stored in plain text.",
    )

    @model_validator(mode="after")
    def _no_secrets(self) -> DeepSpeedSection:
        for path in secret_key_paths(self.overrides, "deepspeed.overrides"):
            raise ValueError(
                f"{path}: looks like a secret and would be stored in plain text (recipe, "
                f"ds_config.json, ConfigMap); {SECRETS_HELP}"
            )
        return self


class ResourcesSection(Section):
    num_workers: PositiveInt = Field(1, description="Training processes (one per GPU).")
    use_gpu: bool = Field(True, description="One GPU per worker; false trains on CPU with gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places workers across nodes."
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables for every worker (e.g. NCCL_DEBUG: INFO). Names of "
        "secrets (*_TOKEN, *_KEY, *SECRET*, *PASSWORD) are refused: a recipe is stored in plain "
        "text, so set those in the environment of the Ray nodes.",
    )
    network_interface: str | None = Field(
        None,
        min_length=1,
        description="Network interface the workers' collectives use between nodes, e.g. eth0 or "
        "ib0 (sets NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME); default: NCCL's and gloo's choice.",
    )
    infiniband: bool | None = Field(
        None,
        description="false turns NCCL's InfiniBand/RoCE transport off (NCCL_IB_DISABLE=1), true "
        "keeps it on (NCCL_IB_DISABLE=0); default: NCCL decides.",
    )
    collective_timeout_s: PositiveInt = Field(
        1800,
        description="Seconds a collective (all-reduce, barrier) may wait before the process "
        "group fails the run instead of hanging (torch.distributed timeout).",
    )
    hang_dump_s: float | None = Field(
        None,
        ge=0,
        description="When no step completes for this many seconds, every rank writes its Python "
        "stacks (all threads) to RUN_DIR/hang/<UTC time>/rank<r>.txt and the run goes on; "
        "0 or null: off. Must be below collective_timeout_s; default: 300, or half of "
        "collective_timeout_s when that is 600 or less.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_hang_dump(cls, data: Any) -> Any:
        if isinstance(data, dict) and "hang_dump_s" not in data:
            timeout = data.get("collective_timeout_s", 1800)
            if isinstance(timeout, int | float) and not isinstance(timeout, bool):
                data = {**data, "hang_dump_s": min(300.0, timeout / 2)}
        return data

    @model_validator(mode="after")
    def _hang_dump_below_timeout(self) -> ResourcesSection:
        if self.hang_dump_s and self.hang_dump_s >= self.collective_timeout_s:
            raise ValueError(
                f"resources.hang_dump_s: {self.hang_dump_s:g} s must be below "
                f"resources.collective_timeout_s ({self.collective_timeout_s} s), or the "
                "collective fails the run before any stack is dumped; 0 turns the dump off"
            )
        return self

    @model_validator(mode="after")
    def _env_names(self) -> ResourcesSection:
        for name in self.env:
            if is_secret_name(name):
                raise ValueError(f"resources.env: {name} looks like a secret; {SECRETS_HELP}")
            if name in self.network_env():
                raise ValueError(
                    f"resources.env: {name} is also set by resources.network_interface or "
                    "resources.infiniband; set it in one place"
                )
        return self

    def network_env(self) -> dict[str, str]:
        """NCCL/gloo variables derived from network_interface and infiniband."""
        env: dict[str, str] = {}
        if self.network_interface:
            env["NCCL_SOCKET_IFNAME"] = env["GLOO_SOCKET_IFNAME"] = self.network_interface
        if self.infiniband is not None:
            env["NCCL_IB_DISABLE"] = "0" if self.infiniband else "1"
        return env

    def worker_env(self) -> dict[str, str]:
        """Every worker's extra environment: resources.env plus the network settings."""
        return self.env | self.network_env()


class CheckpointSection(Section):
    every_steps: PositiveInt | None = Field(None, description="Save every N optimizer steps.")
    every_minutes: float | None = Field(
        None, gt=0, description="Also save when this many minutes passed since the last save."
    )
    resume_from: str | None = Field(
        None,
        description="A run directory or one checkpoints/step_N directory to start from when "
        "output_dir has no checkpoint yet (weights, optimizer and step are restored).",
    )
    keep_last: int = Field(2, ge=2, description="Committed checkpoints kept (at least 2).")
    max_failures: int = Field(
        0, ge=0, description="Restarts from the newest checkpoint after a worker failure."
    )
    on_preempt: bool = Field(
        True,
        description="On SIGINT or SIGTERM (Ctrl-C, preemption, pod deletion), commit a "
        "checkpoint of the step reached before stopping, when one fits in preempt_grace_s "
        "(a second signal stops at once, without it).",
    )
    preempt_grace_s: float = Field(
        20.0, gt=0,
        description="Seconds the workers get after SIGINT/SIGTERM to reach a step boundary "
        "(and save); then they are killed. Keep it below the scheduler's grace period "
        "(Kubernetes: terminationGracePeriodSeconds, 30 by default).",
    )


class GenerationEval(Section):
    max_new_tokens: PositiveInt = Field(32, description="Greedy decoding length limit.")
    num_examples: PositiveInt = Field(64, description="Validation examples to decode.")


class EarlyStoppingSection(Section):
    metric: str = Field(
        description="The evaluation metric to watch, as logged: eval_loss, eval_accuracy, "
        "eval_f1, eval_exact_match, ..."
    )
    mode: Literal["min", "max"] = Field(
        description="min: lower is better (losses); max: higher is better (accuracy, F1)."
    )
    patience: PositiveInt = Field(
        3, description="Stop after this many evaluations in a row without improvement."
    )
    min_delta: float = Field(
        0.0, ge=0, description="An improvement must beat the best value by more than this."
    )


class EvalSection(Section):
    every_steps: PositiveInt | None = Field(None, description="Evaluate every N steps.")
    at_start: bool = Field(False, description="Also evaluate before the first step (step 0).")
    at_end: bool = Field(True, description="Evaluate after the last step.")
    max_batches: PositiveInt | None = Field(None, description="Cap on validation batches.")
    early_stopping: EarlyStoppingSection | None = Field(
        None,
        description="Stop when eval.early_stopping.metric has not improved for `patience` "
        "evaluations. The checkpoint of the best evaluation is kept (beyond checkpoint.keep_last) "
        "and is the one exported to final/. The at_start evaluation is not a candidate.",
    )
    exact_match: GenerationEval | None = Field(
        None, description="Greedy-decode validation prompts and report eval_exact_match."
    )


class TensorBoardSection(Section):
    dir: str | None = Field(
        None, description="Event file directory. Default: RUN_DIR/tensorboard."
    )


class MlflowSection(Section):
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI. Default: MLFLOW_TRACKING_URI, else a local SQLite "
        "store in the run directory (sqlite:///RUN_DIR/mlflow.db, artifacts in "
        "RUN_DIR/mlartifacts).",
    )
    experiment: str | None = Field(
        None, description="Experiment name. Default: MLFLOW_EXPERIMENT_NAME, else 'ftlaunch'."
    )
    run_name: str | None = Field(None, description="Run name. Default: MLflow's generated one.")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags set on the run.")


class WandbSection(Section):
    project: str | None = Field(
        None, description="W&B project. Default: WANDB_PROJECT, else W&B's own default."
    )
    entity: str | None = Field(None, description="W&B entity. Default: WANDB_ENTITY.")
    mode: Literal["online", "offline"] | None = Field(
        None,
        description="online syncs as it runs (needs WANDB_API_KEY or 'wandb login' on the "
        "driver); offline writes the run locally for 'wandb sync'. Default: WANDB_MODE, else "
        "online.",
    )
    dir: str | None = Field(
        None, description="Where W&B writes its files. Default: WANDB_DIR, else RUN_DIR."
    )
    run_name: str | None = Field(None, description="Run name. Default: W&B's generated one.")
    tags: list[str] = Field(default_factory=list, description="Tags set on the run.")


class LoggingSection(Section):
    every_steps: PositiveInt = Field(1, description="Write metrics every N steps.")
    progress: bool = Field(True, description="Show a live progress line on the driver.")
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="Experiment trackers the driver feeds from metrics.jsonl (workers hold no "
        "tracker code). Each needs its extra: pip install 'ftlaunch[tensorboard]' (or mlflow, "
        "wandb; 'trackers' for all three). The tracker run id is kept in RUN_DIR/trackers.json, "
        "so a resumed run continues the same tracker run.",
    )
    tensorboard: TensorBoardSection = Field(
        default_factory=TensorBoardSection, description="TensorBoard settings."
    )
    mlflow: MlflowSection = Field(default_factory=MlflowSection, description="MLflow settings.")
    wandb: WandbSection = Field(
        default_factory=WandbSection, description="Weights & Biases settings."
    )
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="Peak dense TFLOP/s of one device at the training precision, for the mfu "
        "metric. Default: looked up from the GPU's name (H100, H200, A100, L4, ...); on CPU, "
        "and on GPUs not in the table, mfu is reported only when this is set.",
    )


class Recipe(Section):
    output_dir: str = Field(description="Run directory: checkpoints, metrics and final model.")
    task: Literal["causal_lm", "sequence_classification", "token_classification"] = Field(
        "causal_lm",
        description="What is trained. causal_lm: next-token prediction; "
        "sequence_classification: one label (or several, or a number) per text or text pair "
        "through a new classification head; token_classification: one tag per word (e.g. NER).",
    )
    method: Literal[
        "full", "lora", "ia3", "prompt_tuning", "prefix_tuning", "bitfit", "distill"
    ] = Field(
        description="full fine-tuning; peft adapters on a frozen base: LoRA (also DoRA, rsLoRA, "
        "QLoRA), IA3 (learned rescaling of activations), prompt_tuning (learned input "
        "embeddings), prefix_tuning (learned keys and values in every layer); or bitfit (train "
        "only the biases); or distill (train the whole student on a frozen teacher's "
        "softened predictions, see distill). A new classification head always trains in full."
    )
    model: ModelSection
    lora: LoraSection | None = Field(None, description="LoRA settings (method: lora only).")
    ia3: IA3Section | None = Field(None, description="IA3 settings (method: ia3 only).")
    prompt: PromptSection | None = Field(
        None, description="Virtual tokens of method: prompt_tuning or prefix_tuning."
    )
    distill: DistillSection | None = Field(
        None, description="Teacher and loss weights of method: distill."
    )
    labels: LabelsSection | None = Field(
        None,
        description="Label set and problem type for sequence_classification and "
        "token_classification (defaults apply when omitted).",
    )
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    @model_validator(mode="before")
    @classmethod
    def _default_lora(cls, data: Any) -> Any:
        for method, section in ADAPTER_SECTIONS.items():
            if isinstance(data, dict) and data.get("method") == method and data.get(section) is None:
                data = {**data, section: {}}
        classifies = isinstance(data, dict) and data.get("task") in (
            "sequence_classification", "token_classification"
        )
        if classifies and data.get("labels") is None:
            data = {**data, "labels": {}}
        return data

    @model_validator(mode="after")
    def _cross_field(self) -> Recipe:
        if self.lora is not None and self.method != "lora":
            raise ValueError("lora: the lora section is only allowed with method: lora")
        if self.ia3 is not None and self.method != "ia3":
            raise ValueError("ia3: the ia3 section is only allowed with method: ia3")
        if self.prompt is not None and self.method not in ("prompt_tuning", "prefix_tuning"):
            raise ValueError("prompt: only with method: prompt_tuning or prefix_tuning")
        if (self.distill is not None) != (self.method == "distill"):
            raise ValueError("distill: method: distill needs a distill section (and only it)")
        if self.method == "distill" and self.labels and self.labels.problem_type != "single_label":
            raise ValueError("labels.problem_type: distillation needs single_label classes")
        if self.uses_adapter and self.train.freeze != FreezeSection():
            raise ValueError(f"train.freeze: with method: {self.method} only the adapter trains")
        if self.model.quantization != "none":
            if self.method != "lora":
                raise ValueError("model.quantization: a 4-bit base trains through LoRA (QLoRA); "
                                 "use method: lora")
            if not self.resources.use_gpu:
                raise ValueError("model.quantization: 4-bit bitsandbytes weights need GPUs "
                                 "(resources.use_gpu)")
            if self.model.name_or_path is None:
                raise ValueError("model.quantization: quantizes pretrained weights; it needs "
                                 "model.name_or_path, not model.architecture")
        if self.eval.early_stopping is not None:
            if not self.eval.every_steps:
                raise ValueError("eval.early_stopping: needs eval.every_steps")
            if self.data.validation is None and self.data.val_fraction == 0:
                raise ValueError("eval.early_stopping: needs validation data")
        if self.data.format not in TASK_FORMATS[self.task]:
            raise ValueError(
                f"data.format: {self.data.format} data cannot train task {self.task}; use "
                + " or ".join(TASK_FORMATS[self.task])
            )
        if self.labels is not None and self.task == "causal_lm":
            raise ValueError("labels: the labels section is only for classification tasks")
        if (
            self.task == "token_classification"
            and self.labels is not None
            and self.labels.problem_type != "single_label"
        ):
            raise ValueError("labels.problem_type: token_classification is single_label")
        if self.data.packing and self.task != "causal_lm":
            raise ValueError("data.packing: packing is for causal_lm only")
        if self.data.packing and self.method in ("prompt_tuning", "prefix_tuning"):
            raise ValueError(
                f"data.packing: not with method: {self.method}, whose virtual tokens would be "
                "shared by every example packed into a row; set data.packing: false"
            )
        if self.eval.exact_match is not None and (
            self.data.format not in ("instruction", "chat") or self.data.train_on_prompt
        ):
            raise ValueError(
                "eval.exact_match: decodes an answer from its prompt, so it needs data.format "
                "instruction or chat with data.train_on_prompt: false (here format "
                f"{self.data.format}, train_on_prompt {str(self.data.train_on_prompt).lower()})"
            )
        expected = self.train.micro_batch_size * self.train.grad_accum * self.resources.num_workers
        if self.train.global_batch_size is not None and self.train.global_batch_size != expected:
            raise ValueError(
                f"train.global_batch_size: {self.train.global_batch_size} but micro_batch_size "
                f"({self.train.micro_batch_size}) x grad_accum ({self.train.grad_accum}) x "
                f"resources.num_workers ({self.resources.num_workers}) = {expected}"
            )
        if self.model.dtype == "fp16" and not self.resources.use_gpu:
            raise ValueError("model.dtype: fp16 needs GPUs; use fp32 or bf16 on CPU")
        if self.model.attention == "flash_attention_2" and not self.resources.use_gpu:
            raise ValueError("model.attention: flash_attention_2 needs GPUs (resources.use_gpu)")
        if self.model.kernels == "liger" and not self.resources.use_gpu:
            raise ValueError("model.kernels: liger kernels need GPUs (resources.use_gpu)")
        return self

    @property
    def uses_adapter(self) -> bool:
        """Whether peft adapters train on a frozen base (and final/ holds the adapter)."""
        return self.method in ADAPTER_METHODS

    @property
    def global_batch_size(self) -> int:
        t = self.train
        return t.micro_batch_size * t.grad_accum * self.resources.num_workers


def _field_path(loc: tuple[Any, ...]) -> KeyPath:
    """Pydantic locations include validator names for unions; keep only real keys."""
    return tuple(p for p in loc if isinstance(p, int) or not str(p).startswith(("function-",)))


def validate_recipe(
    data: Any, source: str = "recipe", lines: dict[KeyPath, int] | None = None
) -> Recipe:
    """Validate plain data into a Recipe, turning the first error into a UserInputError."""
    if not isinstance(data, dict):
        raise UserInputError(source, "a recipe must be a YAML mapping of sections")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        path = _field_path(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        named = re.match(r"^([a-z_]+(?:\.[a-z_]+)*): (.*)$", message, re.S)
        if named and err["type"] == "value_error":
            path = (*path, *named.group(1).split(".")[len(path):])
            message = named.group(2)
        dotted = ".".join(str(p) for p in path) or "recipe"
        line = _nearest_line(lines or {}, path)
        where = f"{source}:{line}: {dotted}" if line else f"{source}: {dotted}"
        if err["type"] == "extra_forbidden":
            message = f"unknown field '{path[-1]}'" + _suggest(path, data)
        raise UserInputError(where, message) from None


def _nearest_line(lines: dict[KeyPath, int], path: KeyPath) -> int | None:
    for end in range(len(path), -1, -1):
        if path[:end] in lines and end > 0:
            return lines[path[:end]]
    return None


def _suggest(path: KeyPath, data: dict[str, Any]) -> str:
    import difflib

    model: type[BaseModel] = Recipe
    for key in path[:-1]:
        info = model.model_fields.get(str(key))
        if info is None:
            return ""
        annotation = info.annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if _is_model(a)]
        if not candidates:
            return ""
        model = candidates[0]
    close = difflib.get_close_matches(str(path[-1]), list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def load_recipe(path: str | Path, overrides: list[str] = (), output_dir: str | None = None) -> Recipe:
    """Read a YAML recipe, apply ``--set`` overrides (YAML values) and ``--output-dir``
    (taken literally: a path may hold '#', ': ', spaces), and validate it."""
    path = Path(path)
    data, lines = load_yaml_with_lines(path)
    if data is None:
        raise UserInputError(str(path), "the recipe is empty")
    if not isinstance(data, dict):
        raise UserInputError(str(path), "a recipe must be a YAML mapping of sections")
    data = apply_overrides(data, list(overrides))
    if output_dir is not None:
        data["output_dir"] = output_dir
    return validate_recipe(data, str(path), lines)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json")
