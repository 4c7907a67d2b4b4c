"""Baselines for a classification task, scored with the task's own metric on its test split.

A tuned model is worth its training only if it beats what costs (almost) nothing:

``majority``         always the most frequent training label
``features_logreg``  scikit-learn logistic regression on the frozen model's pooled features (the mean of the
                     last hidden states over the real tokens for text; the CLS token beside the mean of the patch
                     tokens for ViT-like image models), fitted in seconds
``tfidf_logreg``     scikit-learn TF-IDF (words and word pairs) + logistic regression, for text

The regularisation ``C`` of both regressions is chosen on the validation split; the test split is only scored.
The head-only method ``probe`` (``leantune train --method probe``) is the trained linear probe.

``classification_baselines(task, model, tokenizer)`` returns ``{name: test metric}``; :func:`baseline_results`
also says how long each took. :func:`run_baselines` scores them for a whole run (``leantune train`` and
``leantune compare`` print them beside the tuned methods): the run's splits as the run cuts them, every task of a
run with several (the average, as for the run's metric), cached in a JSON file.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leantune.errors import ConfigError, LeantuneError
from leantune.files import write_atomic_text

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from leantune.tasks.core import Example, Task
    from leantune.tasks.multitask import MultiTask
    from leantune.train.data import InputProcessor
    from leantune.train.run import RunSpec

BASELINE_LABELS = {
    "majority": "majority class",
    "features_logreg": "logistic regression on frozen features",
    "tfidf_logreg": "TF-IDF + logistic regression",
}
C_GRID = (0.1, 1.0, 10.0)
RUN_MAX_TRAIN_EXAMPLES = 4096
"""A run's frozen-feature baseline reads the features of at most this many of its training examples."""
BASELINES_NAME = "baselines.json"
# ViT-like image models: the first token is a CLS token, the others are patches.
CLS_TOKEN_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers", "deit", "beit", "data2vec-vision")


@dataclass(frozen=True)
class BaselineResult:
    """One baseline: its name (a key of :data:`BASELINE_LABELS`), test metric and the seconds it took."""

    name: str
    metric: float
    seconds: float

    @property
    def label(self) -> str:
        return BASELINE_LABELS[self.name]


def classification_baselines(
    task: Task,
    model: str | os.PathLike | nn.Module | None,
    tokenizer: Any = None,
    **options: Any,
) -> dict[str, float]:
    """``{baseline name: test metric}`` for a classification ``task``; see :func:`baseline_results`."""
    return {result.name: result.metric for result in baseline_results(task, model, tokenizer, **options)}


def baseline_results(
    task: Task,
    model: str | os.PathLike | nn.Module | None,
    tokenizer: Any = None,
    *,
    max_train_examples: int = 4096,
    max_validation_examples: int = 1000,
    max_length: int = 128,
    batch_size: int = 64,
    input_processor: InputProcessor | None = None,
    device: str | None = None,
    progress: bool = True,
) -> list[BaselineResult]:
    """The baselines of a classification ``task``, each with its test metric and the seconds it took.

    ``model``: a model id or folder (loaded with ``AutoModel``, its tokenizer too when ``tokenizer`` is None), a
    loaded model (a task model or a ``TunedModel``: the backbone under its head is used, as it is), or None to
    skip ``features_logreg``. Features are extracted in batches of ``batch_size`` (``max_length`` tokens) from at most
    ``max_train_examples`` training and ``max_validation_examples`` validation examples, under a progress bar;
    TF-IDF uses every training example. ``input_processor`` turns non-text inputs (images) into tensors, as for
    ``leantune.train``. Regression tasks have no baselines here (``ConfigError``).
    """
    if task.is_regression:
        raise ConfigError(f"task {task.name!r} is a regression task; classification baselines need class labels")
    for name, value in (("max_train_examples", max_train_examples), ("batch_size", batch_size),
                        ("max_validation_examples", max_validation_examples), ("max_length", max_length)):
        if value < 1:
            raise ConfigError(f"baselines: {name} must be >= 1, got {value}")
    results = [_timed("majority", lambda: majority_baseline(task))]
    if model is not None:
        extractor = FeatureExtractor(model, tokenizer, task, max_length, batch_size, input_processor, device, progress)
        results.append(_timed("features_logreg", lambda: features_logreg_baseline(
            task, extractor, max_train_examples, max_validation_examples)))
    if has_text(task):
        results.append(_timed("tfidf_logreg", lambda: tfidf_logreg_baseline(task)))
    return results


def _timed(name: str, compute: Any) -> BaselineResult:
    start = time.perf_counter()
    metric = compute()
    return BaselineResult(name, float(metric), time.perf_counter() - start)


def has_text(task: Task) -> bool:
    return all(e.text is not None for e in task.splits["train"][:1] + task.splits["test"][:1])


def majority_class(examples: Sequence[Example]) -> int:
    """The most frequent label (the smallest one among ties)."""
    counts = Counter(int(e.label) for e in examples)
    return min(counts, key=lambda label: (-counts[label], label))


def majority_baseline(task: Task) -> float:
    """The test metric of always predicting the training split's most frequent label."""
    label = majority_class(task.splits["train"])
    test = task.splits["test"]
    return task.score([label] * len(test), [e.label for e in test])


def tfidf_logreg_baseline(task: Task) -> float:
    """TF-IDF of words and word pairs (of the text, and of the pair text beside it) + logistic regression."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    columns = ["text"] + (["text_pair"] if task.splits["train"][0].text_pair is not None else [])
    vectorizers = {c: TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1) for c in columns}

    def features(split: str, fit: bool = False) -> Any:
        parts = []
        for column, vectorizer in vectorizers.items():
            texts = [getattr(e, column) or "" for e in task.splits[split]]
            parts.append(vectorizer.fit_transform(texts) if fit else vectorizer.transform(texts))
        return hstack(parts).tocsr()

    train = features("train", fit=True)
    return _fit_and_score(task, train, features("validation"), features("test"), task.splits["train"],
                          task.splits["validation"])


def features_logreg_baseline(task: Task, extractor: FeatureExtractor, max_train_examples: int,
                             max_validation_examples: int) -> float:
    """Logistic regression on standardised frozen features of (at most) the first training examples."""
    from sklearn.preprocessing import StandardScaler

    train_examples = task.splits["train"][:max_train_examples]
    validation_examples = task.splits["validation"][:max_validation_examples]
    scaler = StandardScaler()
    train = scaler.fit_transform(extractor(train_examples))
    validation = scaler.transform(extractor(validation_examples))
    test = scaler.transform(extractor(task.splits["test"]))
    return _fit_and_score(task, train, validation, test, train_examples, validation_examples)


def _fit_and_score(task: Task, train: Any, validation: Any, test: Any, train_examples: Sequence[Example],
                   validation_examples: Sequence[Example]) -> float:
    """Fit a logistic regression per ``C`` of :data:`C_GRID`, keep the best on validation, score it on test."""
    from sklearn.linear_model import LogisticRegression

    labels = [int(e.label) for e in train_examples]
    if len(set(labels)) < 2:
        raise ConfigError(f"task {task.name!r}: the training examples hold one class only; a classifier needs two")
    best, best_metric = None, -float("inf")
    for c in C_GRID:
        classifier = LogisticRegression(C=c, max_iter=2000).fit(train, labels)
        metric = task.score(classifier.predict(validation).tolist(), [e.label for e in validation_examples])
        if metric > best_metric:
            best, best_metric = classifier, metric
    return task.score(best.predict(test).tolist(), [e.label for e in task.splits["test"]])


class FeatureExtractor:
    """Pooled last hidden states of a frozen model, in batches, as a ``(examples, features)`` float array."""

    def __init__(self, model: str | os.PathLike | nn.Module, tokenizer: Any, task: Task, max_length: int,
                 batch_size: int, input_processor: InputProcessor | None, device: str | None,
                 progress: bool) -> None:
        import torch

        from leantune.train.data import Encoder

        if isinstance(model, (str, os.PathLike)):
            model, tokenizer = _load(str(model), tokenizer, task)
        self.backbone = _backbone(model)
        self.device = torch.device(device) if device is not None else _device_of(self.backbone)
        self.encoder = Encoder(task, tokenizer, False, max_length, 16, input_processor)
        self.batch_size, self.progress = batch_size, progress
        config = getattr(self.backbone, "config", None)
        self.cls_token = getattr(config, "model_type", None) in CLS_TOKEN_MODEL_TYPES

    def __call__(self, examples: Sequence[Example]) -> np.ndarray:
        """Features of ``examples``, in their order; batches are formed by text length (less padding)."""
        import numpy as np
        import torch
        from tqdm import tqdm

        from leantune.train.data import to_device

        order = sorted(range(len(examples)), key=lambda i: _text_length(examples[i]))
        was_training = self.backbone.training
        self.backbone.eval()
        pooled = []
        try:
            with torch.inference_mode():
                for start in tqdm(range(0, len(order), self.batch_size), desc="frozen features", unit="batch",
                                  leave=False, disable=not self.progress):
                    chunk = [examples[i] for i in order[start:start + self.batch_size]]
                    inputs = to_device(self.encoder.inputs(chunk), self.device)
                    inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
                    hidden = self.backbone(**inputs).last_hidden_state.float()
                    pooled.append(self._pool(hidden, inputs.get("attention_mask")).cpu().numpy())
        finally:
            self.backbone.train(was_training)
        features = np.concatenate(pooled)
        unsorted = np.empty_like(features)
        unsorted[order] = features
        return unsorted

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        import torch

        if self.cls_token and mask is None:
            return torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=-1)
        if mask is None:
            return hidden.mean(dim=1)
        from leantune.layers.pooling import masked_mean

        return masked_mean(hidden, mask)


def _text_length(example: Example) -> int:
    return len(example.text or "") + len(example.text_pair or "")


def _load(path: str, tokenizer: Any, task: Task) -> tuple[nn.Module, Any]:
    """A model folder or id as a headless ``AutoModel``, and its tokenizer (text tasks) when none is given;
    ``all-MiniLM-L6-v2`` is the packaged copy, as for ``leantune train``."""
    from transformers import AutoModel, AutoTokenizer

    from leantune.train.run import model_path

    path = model_path(path)
    try:
        model = AutoModel.from_pretrained(path)
        if tokenizer is None and has_text(task):
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"baselines: cannot load model {path!r}: {reason}") from None
    return model, tokenizer


def _backbone(model: nn.Module) -> nn.Module:
    """The module whose output has ``last_hidden_state``: a ``TunedModel``'s base model's backbone (a task
    model's ``base_model``), the encoder of an encoder-decoder model."""
    model = getattr(model, "base_model", model)  # TunedModel -> the Hugging Face model
    model = getattr(model, "base_model", model)  # task model -> its backbone (a backbone returns itself)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return model.get_encoder()
    return model


def _device_of(model: nn.Module) -> torch.device:
    import torch

    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@dataclass
class BaselineReport:
    """A run's baselines: one row per baseline (``rows``), or why there are none (``not_applicable``).

    A row: ``method`` (the baseline's name), ``baseline: True``, ``label``, ``metric`` (the run's metric name),
    ``test_metric`` (several tasks: their average), ``task_metrics`` (``{task: {"metric", "test"}}``),
    ``wall_seconds`` and ``train_examples`` (per task, the training examples it was fitted on). ``settings``: what
    the baselines depend on (:func:`baseline_settings`), so a cached report is reused only for the same ones."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    not_applicable: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The report as the lines ``leantune train`` prints."""
        if self.not_applicable is not None:
            return [f"baselines: n/a ({self.not_applicable})"]
        width = max(len(row["label"]) for row in self.rows)
        lines = ["baselines (no fine-tuning; same splits):"]
        for row in self.rows:
            examples = ", ".join(f"{n:,d}" for n in row["train_examples"].values())
            lines.append(f"  {row['label']:<{width}}  test {row['metric']} {row['test_metric']:.4f}  "
                         f"({row['wall_seconds']:.1f} s, fitted on {examples} training examples)")
        return lines


def report_baselines(spec: RunSpec, cache: Path | None = None, progress: bool = True,
                     tasks: MultiTask | None = None) -> BaselineReport:
    """:func:`run_baselines`, with a baseline that cannot be scored (a model ``AutoModel`` cannot load, say)
    reported as not applicable, with the reason, instead of failing the command after its training."""
    try:
        return run_baselines(spec, cache, progress, tasks)
    except LeantuneError as err:
        return BaselineReport(not_applicable=f"they could not be scored: {err}")


def baseline_settings(spec: RunSpec) -> dict[str, Any]:
    """What a run's baselines depend on: the model, the data (and its content), the split sizes and tokens."""
    train = spec.train_config()
    return {"model": spec.model, "task": spec.task, "glue_dir": spec.glue_dir, "data": spec.data,
            "tasks": spec.tasks, "data_sha256": spec.data_sha256, "train_examples": train.train_examples,
            "validation_examples": train.validation_examples, "test_examples": train.test_examples,
            "max_length": train.max_length}


def not_applicable_reason(tasks: MultiTask) -> str | None:
    """Why a run's tasks have no classification baselines (regression, vision and language), or None."""
    from leantune.tasks.vl import VLTask

    vl = [t.name for t in tasks if isinstance(t, VLTask)]
    if vl:
        return f"{', '.join(vl)}: vision-and-language tasks"
    regression = [t.name for t in tasks if t.is_regression]
    if regression:
        return f"{', '.join(regression)}: regression task(s); baselines are for classification"
    return None


def run_baselines(spec: RunSpec, cache: Path | None = None, progress: bool = True,
                  tasks: MultiTask | None = None) -> BaselineReport:
    """The baselines of the run ``spec`` describes, on its splits as the run cuts them (``train_examples`` and
    the like; the frozen features of at most :data:`RUN_MAX_TRAIN_EXAMPLES` training examples per task), with the
    frozen base model the run starts from. ``tasks``: the run's tasks when already loaded (default: loaded from
    ``spec``). A ``cache`` file holding a report for the same :func:`baseline_settings` is reused; a new report
    is written to it."""
    from leantune.train.data import MODEL_INPUT_PROCESSOR
    from leantune.train.run import build, load_tasks

    settings = baseline_settings(spec)
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("settings") == settings:
            return BaselineReport(**saved)
    config = spec.train_config()
    loaded = tasks if tasks is not None else load_tasks(spec)
    used = loaded.subset({"train": config.train_examples, "validation": config.validation_examples,
                          "test": config.test_examples})
    reason = not_applicable_reason(used)
    report = BaselineReport(not_applicable=reason, settings=settings)
    if reason is None:
        model, tokenizer, _, _ = build(spec, for_loading=True, tasks=loaded)
        per_task = {task.name: baseline_results(
            task, model, tokenizer, max_train_examples=RUN_MAX_TRAIN_EXAMPLES, max_length=config.max_length,
            batch_size=config.eval_batch_size, input_processor=getattr(model, MODEL_INPUT_PROCESSOR, None),
            progress=progress) for task in used}
        report.rows = _combined_rows(used, per_task)
    if cache is not None:
        write_atomic_text(cache, json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _combined_rows(tasks: MultiTask, per_task: dict[str, list[BaselineResult]]) -> list[dict[str, Any]]:
    """One row per baseline every task has: the tasks' mean metric (a single task's own), the time they took."""
    from leantune.train.loop import AVERAGE

    names = [n for n in BASELINE_LABELS if all(n in {r.name for r in results} for results in per_task.values())]
    rows = []
    for name in names:
        results = {task: next(r for r in found if r.name == name) for task, found in per_task.items()}
        train_sizes = {t.name: len(t.splits["train"]) for t in tasks}
        if name == "features_logreg":
            train_sizes = {task: min(size, RUN_MAX_TRAIN_EXAMPLES) for task, size in train_sizes.items()}
        rows.append({
            "method": name, "baseline": True, "label": BASELINE_LABELS[name],
            "metric": tasks.tasks[0].metric if len(tasks) == 1 else AVERAGE,
            "test_metric": sum(r.metric for r in results.values()) / len(results),
            "task_metrics": {t.name: {"metric": t.metric, "test": results[t.name].metric} for t in tasks},
            "wall_seconds": sum(r.seconds for r in results.values()), "train_examples": train_sizes,
        })
    return rows
