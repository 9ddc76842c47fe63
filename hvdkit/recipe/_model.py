"""The recipe: what to train, validated by pydantic. Framework-free.

A recipe says *what* (model, data, batch, optimizer, schedule); hvdkit supplies the Horovod *how*.
Every field has a default except ``name``, so a minimal YAML is a few lines.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

Framework = Literal["torch", "tensorflow"]
FRAMEWORKS: tuple[str, ...] = ("torch", "tensorflow")


class _Strict(BaseModel):
    # Unknown keys are typos, not extensions: reject them with the valid names.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    name: Literal["mlp", "cnn", "resnet", "custom"] = "mlp"
    hidden: list[PositiveInt] = Field(default_factory=lambda: [128], description="MLP hidden layer widths")
    channels: PositiveInt = Field(32, description="CNN/ResNet base channel count")
    blocks: PositiveInt = Field(2, description="ResNet residual blocks per stage")


class DataSpec(_Strict):
    # files: a folder of .npz/.parquet shards (`hvdkit data shard`), streamed, never held whole
    name: Literal["digits", "synthetic", "files", "custom"] = "digits"
    path: str | None = Field(None, description="data.name files: the shard folder")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    # synthetic images: generated, never downloaded
    image_size: PositiveInt = 32
    channels: PositiveInt = 3
    num_classes: PositiveInt = 10
    num_samples: PositiveInt = 2048
    # Streamed data (files, a Python recipe's own Dataset or tf.data pipeline): batches read ahead
    # of the step (a thread, or DataLoader workers) so reading overlaps compute.
    workers: NonNegativeInt = Field(0, description="torch DataLoader worker processes (0: read in the training process)")
    prefetch: NonNegativeInt = Field(2, description="batches read ahead of the training step (0: none)")
    # The last global batch when the samples do not fill it: drop it, or pad it with the epoch's
    # first samples (torch's DistributedSampler); either way every rank runs the same steps.
    uneven: Literal["drop", "pad"] = "drop"
    shuffle_buffer: PositiveInt = Field(10_000, description="tf.data pipelines: the shared-seed shuffle's buffer")


class OptimizerSpec(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: PositiveFloat = 0.05
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    # Clip the averaged gradients to this global L2 norm (after the allreduce, so every rank clips
    # the same gradient); None: no clipping.
    clip_norm: PositiveFloat | None = None


class LRSpec(_Strict):
    # linear: lr = base × world size (Goyal et al.), reached after a linear warm-up from base
    scale: Literal["linear", "sqrt", "none"] = "linear"
    warmup_epochs: float = Field(0.0, ge=0)
    # After the warm-up: hold the rate (none), or decay it over the remaining steps (hvdkit.core.lr)
    decay: Literal["none", "cosine", "linear", "step"] = "none"
    final_lr_fraction: float = Field(0.0, ge=0, le=1, description="cosine/linear: the last step's rate, as a fraction of the scaled rate")
    step_every_epochs: PositiveFloat = Field(10.0, description="step: epochs between two decays")
    step_gamma: float = Field(0.1, gt=0, le=1, description="step: factor applied at each decay")


class HorovodSpec(_Strict):
    compression: Literal["none", "fp16"] = "none"
    backward_passes_per_step: PositiveInt = 1
    # Horovod's background-thread knobs, for this recipe (None: Horovod's default). A launcher
    # flag (--cycle-time-ms, --fusion-threshold-mb) or the HOROVOD_* variable wins over these.
    cycle_time_ms: PositiveFloat | None = None
    fusion_threshold_mb: NonNegativeInt | None = None

    def env_defaults(self) -> dict[str, str]:
        """The HOROVOD_* variables these set, to apply before ``hvd.init()`` where unset."""
        out = {}
        if self.cycle_time_ms is not None:
            out["HOROVOD_CYCLE_TIME"] = repr(float(self.cycle_time_ms))
        if self.fusion_threshold_mb is not None:
            out["HOROVOD_FUSION_THRESHOLD"] = str(self.fusion_threshold_mb * 1024 * 1024)
        return out


class EvalSpec(_Strict):
    every_epochs: PositiveInt = 1
    enabled: bool = True


class EarlyStoppingSpec(_Strict):
    # Stop when this validation metric has not improved by more than min_delta for `patience`
    # evaluations in a row (decided on rank 0, broadcast). None: train every epoch.
    metric: Literal["val_loss", "val_accuracy"] | None = None
    patience: PositiveInt = 3
    min_delta: float = Field(0.0, ge=0)


class CheckpointSpec(_Strict):
    # Each job writes to its own folder <dir>/<job id>/; only `hvdkit run --resume` continues one.
    dir: str | None = None  # None: no checkpoints
    every_epochs: PositiveInt = 1


class LogSpec(_Strict):
    every_steps: PositiveInt = 10
    progress: bool = True
    # A child run per rank (true), none (false), or one for every k-th rank (k): at hundreds of
    # ranks a tracking server takes one request per child run per interval (docs/benchmarks.md).
    per_rank_runs: bool | PositiveInt = True
    # System metrics of each host (CPU, memory, network, disk; GPU with nvidia-ml-py): one sampler
    # thread per host, in its local rank 0, every this many seconds; 0 turns them off.
    system_metrics_interval_s: float = Field(10.0, ge=0, description="seconds between system-metric samples per host; 0: off")
    # The trained model, logged by rank 0 with MLflow's flavour for the framework (signature and
    # input example) on the job's run; false: not logged (the checkpoints still hold it).
    model: bool = True
    # Registers the logged model under this name in MLflow's model registry (a new version).
    register_model: str | None = Field(None, min_length=1, description="model registry name; None: not registered")


class ParallelSpec(_Strict):
    # Ranks that split one model copy between them (tensor model parallelism, docs/parallelism.md);
    # the np ranks form np / model data-parallel copies. 1: plain data parallelism.
    model: PositiveInt = Field(1, description="ranks per model copy; np must be a multiple")


class Recipe(_Strict):
    name: str = Field(..., min_length=1)
    framework: Framework = "torch"
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    batch_size: PositiveInt = Field(32, description="per-rank batch size")
    epochs: PositiveInt | None = 10
    steps: PositiveInt | None = Field(None, description="total optimizer steps; overrides epochs when set")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    lr_schedule: LRSpec = Field(default_factory=LRSpec)
    horovod: HorovodSpec = Field(default_factory=HorovodSpec)
    parallel: ParallelSpec = Field(default_factory=ParallelSpec)
    seed: int = 42
    # bf16: the forward pass (and its backward) in bfloat16 autocast, weights, gradients, their
    # allreduce and the optimizer in float32 (torch.autocast / Keras' mixed_bfloat16 policy).
    # fp16: float16 autocast with dynamic loss scaling (torch.amp.GradScaler; a loss scale in
    # hvdkit's TensorFlow step), decided on the averaged gradients so every rank skips the same
    # overflowing steps. Meant for GPUs (tensor cores); it runs on a CPU too, slowly.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="training loss against (1-e)*onehot + e/classes; 0: none")
    eval: EvalSpec = Field(default_factory=EvalSpec)
    early_stopping: EarlyStoppingSpec = Field(default_factory=EarlyStoppingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    log: LogSpec = Field(default_factory=LogSpec)
    threads: PositiveInt | None = Field(1, description="compute threads per rank (None: the framework's default)")
    keras_fit: bool = Field(False, description="tensorflow only: train with model.fit and hvdkit's Keras callbacks")
    python: str | None = Field(None, description="set for Python recipes: path.py:ClassName")

    @model_validator(mode="after")
    def _custom_needs_python(self) -> "Recipe":
        if (self.model.name == "custom" or self.data.name == "custom") and not self.python:
            raise ValueError("model/data 'custom' is only valid in a Python recipe (a class with build_model/build_data)")
        return self


    @model_validator(mode="after")
    def _early_stopping_needs_evaluation(self) -> "Recipe":
        if self.early_stopping.metric is not None and not self.eval.enabled:
            raise ValueError(
                f"early_stopping.metric={self.early_stopping.metric} is never logged: eval.enabled is false — fix: "
                "set eval.enabled: true, or unset early_stopping.metric")
        return self

    @model_validator(mode="after")
    def _files_need_a_path(self) -> "Recipe":
        if self.data.name == "files" and not self.data.path:
            raise ValueError("data.name files needs data.path, the shard folder — fix: set data.path: DIR "
                             "(write one with `hvdkit data shard digits DIR`)")
        return self

    @model_validator(mode="after")
    def _fp16_has_a_loss_scale(self) -> "Recipe":
        if self.precision == "fp16" and self.keras_fit:
            raise ValueError("precision=fp16 with keras_fit: Keras' own loss scaling decides on each rank's gradients "
                             "before they are averaged, so ranks could skip different steps — fix: keras_fit: false "
                             "(hvdkit's loop scales the loss itself), or precision: bf16")
        return self

    @model_validator(mode="after")
    def _split_model_is_supported(self) -> "Recipe":
        m = self.parallel.model
        if m == 1:
            return self
        refused = [
            (self.model.name in ("cnn", "resnet"),
             f"parallel.model={m}: the built-in model {self.model.name!r} cannot be split (only the MLP has "
             "tensor-parallel layers) — fix: use model.name: mlp, a Python recipe's own model, or parallel.model: 1"),
            # The loss scale's skip decision would have to be agreed over the model group too.
            (self.precision == "fp16",
             f"precision=fp16 with parallel.model={m}: a split model trains in fp32 or bf16 — fix: "
             "precision: bf16, or parallel.model: 1"),
        ]
        for bad, message in refused:
            if bad:
                raise ValueError(message)
        return self
