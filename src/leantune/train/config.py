"""Training hyperparameters: one dataclass, readable from a YAML/JSON file and from ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from leantune.config import build_strict, check_choice, check_positive, check_range, check_types
from leantune.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """How to train. Defaults follow the LST paper's GLUE recipe where it applies (clip 1.0, linear decay)."""

    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate of AdamW."})
    new_module_learning_rate: float | None = field(default=None, metadata={
        "help": "Peak learning rate of the modules that start from scratch: the task head and a vision-language "
                "model's projection and answer head (None: learning_rate)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (never on biases and norms)."})
    adam_betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas."})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    batch_size: int = field(default=32, metadata={"help": "Examples per optimizer step (all processes together)."})
    grad_accumulation: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    epochs: int = field(default=1, metadata={"help": "Passes over the training set (ignored if max_steps is set)."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps."})
    warmup_steps: int | None = field(
        default=None, metadata={"help": "Linear warm-up steps (None: warmup_ratio of all steps)."})
    warmup_ratio: float = field(default=0.06, metadata={"help": "Warmup as a fraction of all steps."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Clip the gradient norm (None: no clip)."})
    eval_every: int | None = field(default=None, metadata={"help": "Evaluate every N steps (None: every epoch)."})
    max_length: int = field(default=128, metadata={"help": "Tokens per input (longer inputs are truncated)."})
    max_target_length: int = field(default=16, metadata={"help": "Target tokens for text-to-text tasks."})
    eval_batch_size: int = field(default=64, metadata={"help": "Examples per evaluation batch (per process)."})
    train_examples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    validation_examples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N validation examples."})
    test_examples: int | None = field(default=None, metadata={"help": "Test on the first N test examples."})
    precision: str = field(default="fp32", metadata={
        "help": "fp32; bf16 (autocast, CPU or GPU); fp16 (autocast with a gradient scaler, GPU only)."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, data order and dropout."})
    checkpoint_every: int | None = field(
        default=None, metadata={"help": "Save a resumable checkpoint every N steps (default: at each evaluation)."}
    )
    measure_memory: bool = field(
        default=False,
        metadata={"help": "After training, measure the tensor memory of one training step (leantune.memory)."},
    )
    fsdp: bool = field(default=False, metadata={
        "help": "Shard the model with FSDP2 under torchrun (checkpoints through torch.distributed.checkpoint)."})
    cache_ladders: bool = field(default=False, metadata={
        "help": "LST on an encoder classifier: store each training example's ladders (fp16, under the run's "
                "ladder_cache/) in the first epoch, so later epochs skip the backbone. Needs backbone dropout off "
                "(--set backbone_train_mode=false); see docs/lst.md."})
    progress: bool = field(default=True, metadata={
        "help": "Show progress on stderr: a bar for training and for each evaluation, a line per slow phase."})

    def __post_init__(self) -> None:
        if isinstance(self.adam_betas, list):
            self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]
        check_types(self)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field and its bad value."""
        check_positive(self, "learning_rate", "batch_size", "grad_accumulation", "epochs", "max_length",
                       "eval_batch_size", "max_target_length")
        if self.new_module_learning_rate is not None:
            check_positive(self, "new_module_learning_rate")
        for name in ("max_steps", "eval_every", "checkpoint_every", "train_examples", "validation_examples",
                     "test_examples", "warmup_steps"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "warmup_steps" else 1):
                raise ConfigError(f"TrainConfig.{name} must be a positive integer or None, got {value!r}")
        if self.batch_size % self.grad_accumulation:
            raise ConfigError(f"TrainConfig.batch_size ({self.batch_size}) must be a multiple of grad_accumulation "
                              f"({self.grad_accumulation})")
        check_choice(self, "precision", PRECISIONS)
        check_range(self, "warmup_ratio", 0, 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict; an unknown key raises :class:`UnknownOptionError` naming it and the valid ones."""
        return build_strict(cls, values, "training settings")

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})
