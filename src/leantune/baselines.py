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
also says how long each took.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from leantune.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from leantune.tasks.core import Example, Task
    from leantune.train.data import InputProcessor

BASELINE_LABELS = {
    "majority": "majority class",
    "features_logreg": "logistic regression on frozen features",
    "tfidf_logreg": "TF-IDF + logistic regression",
}
C_GRID = (0.1, 1.0, 10.0)
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
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


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
