"""What every task provides: examples per split, label names, a metric, and the text-to-text form."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from leantune.errors import ConfigError, LeantuneError

SPLITS = ("train", "validation", "test")


class DataError(LeantuneError, ValueError):
    """Task data is missing, empty or malformed; the message names the file, row or column."""


@dataclass(frozen=True)
class Example:
    """One input and its label (a class index, or a float for regression).

    ``text`` and ``text_pair`` are tokenised (``text`` is ``None`` for a model that takes no text); ``inputs``
    holds the non-text model inputs by keyword (an image path or tensor, visual features, audio), turned into
    batch tensors by the trainer's ``Encoder``. ``task`` names the task the example belongs to, for methods that
    take the batch's task in every call (per-task adapters) and for multi-task training.
    """

    text: str | None
    label: int | float
    text_pair: str | None = None
    task: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict, hash=False)


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    return float(accuracy_score(labels, predictions))


def matthews(predictions: Sequence, labels: Sequence) -> float:
    return float(matthews_corrcoef(labels, predictions))


def f1_accuracy(predictions: Sequence, labels: Sequence) -> float:
    """Mean of binary F1 (positive class 1) and accuracy, as GLUE reports for MRPC and QQP."""
    return float((f1_score(labels, predictions, zero_division=0.0) + accuracy_score(labels, predictions)) / 2)


def pearson_spearman(predictions: Sequence, labels: Sequence) -> float:
    """Mean of Pearson and Spearman correlation (STS-B); 0 where predictions are constant."""
    predictions, labels = np.asarray(predictions, dtype=float), np.asarray(labels, dtype=float)
    if np.all(predictions == predictions[0]) or np.all(labels == labels[0]):
        return 0.0
    return float((stats.pearsonr(predictions, labels)[0] + stats.spearmanr(predictions, labels)[0]) / 2)


METRICS = {
    "accuracy": accuracy,
    "matthews_correlation": matthews,
    "f1_accuracy": f1_accuracy,
    "pearson_spearman": pearson_spearman,
}


@dataclass
class Task:
    """A labelled dataset split into train/validation/test, with the metric that selects checkpoints.

    ``label_names`` is ``None`` for regression. ``prefix`` and ``input_names`` give the text-to-text input
    ``"<prefix> <input_names[0]>: text <input_names[1]>: pair"``; the target is the label name (regression:
    the value rounded to ``regression_step``). ``text_prefix`` (a run's per-task ``prefix``, VL-Adapter's
    ``"vqa:"``) is put in front of every text whatever the model form: it replaces ``prefix`` in the text-to-text
    form and is prepended, with a space, to the first text for a classification or regression head.
    """

    name: str
    splits: dict[str, list[Example]]
    label_names: list[str] | None
    metric: str = "accuracy"
    prefix: str = ""
    input_names: tuple[str, str] = ("sentence1", "sentence2")
    regression_step: float = 0.2
    source: dict = field(default_factory=dict)
    text_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"unknown metric {self.metric!r} for task {self.name!r}; known: {', '.join(METRICS)}")
        self.check_splits()

    def check_splits(self) -> None:
        """Raise :class:`DataError` naming the task and the split if a split has no examples."""
        for split in SPLITS:
            if not self.splits.get(split):
                raise DataError(f"task {self.name!r} has no {split} examples")

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    def score(self, predictions: Sequence, labels: Sequence) -> float:
        """The task's metric (higher is better)."""
        return METRICS[self.metric](list(predictions), list(labels))

    # --- text-to-text form ------------------------------------------------------------------------------
    def source_text(self, example: Example) -> str:
        first, second = self.input_names
        prefix = self.prefix if self.text_prefix is None else self.text_prefix
        parts = [prefix] if prefix else []
        if example.text is not None:
            parts.append(f"{first}: {example.text}")
        if example.text_pair is not None:
            parts.append(f"{second}: {example.text_pair}")
        return " ".join(parts)

    def head_text(self, text: str) -> str:
        """The first text as a classification or regression head model reads it (``text_prefix`` in front)."""
        return f"{self.text_prefix} {text}" if self.text_prefix else text

    def target_text(self, label: int | float) -> str:
        if self.label_names is None:
            step = self.regression_step
            return f"{round(float(label) / step) * step:.1f}"
        return self.label_names[int(label)]

    def parse_target(self, text: str) -> int | float:
        """A generated answer back to a label; an unknown word gives -1 (always wrong), a non-number 0.0."""
        text = text.strip()
        if self.label_names is None:
            try:
                value = float(text)
            except ValueError:
                return 0.0
            return value if math.isfinite(value) else 0.0
        return self.label_names.index(text) if text in self.label_names else -1

    def subset(self, sizes: dict[str, int | None]) -> Task:
        """The same task with each split cut to its first ``sizes[split]`` examples (None keeps all)."""
        splits = {s: examples[: sizes.get(s) or len(examples)] for s, examples in self.splits.items()}
        return dataclasses.replace(self, splits=splits)

    def describe(self) -> str:
        sizes = ", ".join(f"{s} {len(self.splits[s]):,d}" for s in SPLITS)
        kind = "regression" if self.is_regression else f"{self.num_labels} classes"
        return f"{self.name} ({kind}, metric {self.metric}): {sizes}"
