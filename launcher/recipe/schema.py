"""The recipe: one typed, frozen, documented schema for a fine-tuning run, and the task enum.

Every field's description is its documentation (sections.py). Validation here is purely
structural and arithmetic; checks that need the model, tokenizer, data or hardware live in
``launcher/driver/prepare.py`` and ``launcher/driver/preflight/``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from launcher.recipe.output_dir import uri_problem
from launcher.recipe.run_sections import (
    CheckpointSection,
    DeepSpeedSection,
    EvalSection,
    FreezeSection,
    LoggingSection,
    ResourcesSection,
    TrainSection,
)
from launcher.recipe.sections import (
    DataSection,
    DistillSection,
    IA3Section,
    LabelsSection,
    LoraSection,
    ModelSection,
    PromptSection,
    Section,
)


ADAPTER_SECTIONS = {
    "lora": "lora", "ia3": "ia3", "prompt_tuning": "prompt", "prefix_tuning": "prompt",
}
ADAPTER_METHODS = tuple(ADAPTER_SECTIONS)


class TaskKind(BaseModel):
    """What the rest of the launcher needs to know of a task, by name: the data formats it
    trains on, the transformers Auto class and peft task type of its model, whether the model
    gets a new head (which trains in full beside an adapter), the label problem types it
    takes (none: no labels section) and whether its rows can be packed. The behaviour of
    each task lives in launcher/tasks/."""

    model_config = ConfigDict(frozen=True)
    formats: tuple[str, ...]
    auto_class: str
    peft_task_type: str
    new_head: bool
    problem_types: tuple[str, ...] = ()
    packing: bool = False
    generates: bool = False  # the model writes text (ftlaunch chat)


# The task enum: a new task adds its entry here and its behaviour in launcher/tasks/.
TASKS = {
    "causal_lm": TaskKind(
        formats=("instruction", "chat", "text"), auto_class="AutoModelForCausalLM",
        peft_task_type="CAUSAL_LM", new_head=False, packing=True, generates=True,
    ),
    "sequence_classification": TaskKind(
        formats=("classification",), auto_class="AutoModelForSequenceClassification",
        peft_task_type="SEQ_CLS", new_head=True,
        problem_types=("single_label", "multi_label", "regression"),
    ),
    "token_classification": TaskKind(
        formats=("tagging",), auto_class="AutoModelForTokenClassification",
        peft_task_type="TOKEN_CLS", new_head=True, problem_types=("single_label",),
    ),
}
TASK_NAMES = tuple(TASKS)
TASK_FORMATS = {name: kind.formats for name, kind in TASKS.items()}


class Recipe(Section):
    output_dir: str = Field(
        description="Run directory: checkpoints, metrics and final model. A path, or a prefix "
        "in object storage (s3://BUCKET/PREFIX, gs://BUCKET/PREFIX) for clusters without a "
        "shared filesystem: checkpoints and final/ are staged on node-local disk and uploaded; "
        "credentials and endpoint come from the environment (AWS_*, GOOGLE_*)."
    )
    task: Literal[TASK_NAMES] = Field(  # type: ignore[valid-type]
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

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, value: str) -> str:
        problem = uri_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_lora(cls, data: Any) -> Any:
        for method, section in ADAPTER_SECTIONS.items():
            if isinstance(data, dict) and data.get("method") == method and data.get(section) is None:
                data = {**data, section: {}}
        task = data.get("task", "causal_lm") if isinstance(data, dict) else None
        kind = TASKS.get(task) if isinstance(task, str) else None
        classifies = kind is not None and bool(kind.problem_types)
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
        return self

    @model_validator(mode="after")
    def _task_and_data(self) -> Recipe:
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
        kind = TASKS[self.task]
        if self.labels is not None and not kind.problem_types:
            raise ValueError("labels: the labels section is only for classification tasks")
        if self.labels is not None and self.labels.problem_type not in kind.problem_types:
            raise ValueError(
                f"labels.problem_type: {self.task} is {' or '.join(kind.problem_types)}"
            )
        if self.data.packing and not kind.packing:
            packable = [name for name, k in TASKS.items() if k.packing]
            raise ValueError(f"data.packing: packing is for {' or '.join(packable)} only")
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
    def task_kind(self) -> TaskKind:
        return TASKS[self.task]

    @property
    def adapter_section(self) -> LoraSection | IA3Section | PromptSection | None:
        """The settings section of the recipe's peft method (None without an adapter)."""
        return getattr(self, ADAPTER_SECTIONS[self.method]) if self.uses_adapter else None

    @property
    def global_batch_size(self) -> int:
        t = self.train
        return t.micro_batch_size * t.grad_accum * self.resources.num_workers


