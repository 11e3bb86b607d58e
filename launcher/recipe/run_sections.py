"""The recipe's run sections: training, DeepSpeed, resources, checkpoints, evaluation and
logging (the model, method and data sections are sections.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from launcher.recipe.secrets import SECRETS_HELP, is_secret_name, secret_key_paths
from launcher.recipe.sections import PositiveInt, Section

Beta = Annotated[float, Field(ge=0, lt=1)]


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
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup."
    )
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps (overrides ratio).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warmup as a fraction of steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a fraction of lr.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null: off.")
    nonfinite_loss_steps: PositiveInt = Field(
        3,
        description="Consecutive steps with a NaN or infinite loss after which the run fails as "
        "diverged (a retry, up to checkpoint.max_failures, resumes from the newest committed "
        "checkpoint). No step whose loss is not finite is ever checkpointed, so a diverged run "
        "never rotates its good checkpoints out.",
    )
    seed: int = Field(
        42, ge=0, lt=2**63,
        description="Seed for initialisation, shuffling and dropout (what numpy and torch take).",
    )
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
