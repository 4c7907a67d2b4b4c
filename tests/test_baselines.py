"""Classification baselines (majority class, frozen-feature and TF-IDF logistic regressions) and the probe method."""

from __future__ import annotations

import random

import pytest
import torch
from tiny import make_inputs, make_model

import leantune
from leantune.baselines import (
    BASELINE_LABELS,
    FeatureExtractor,
    baseline_results,
    classification_baselines,
    majority_baseline,
    majority_class,
    tfidf_logreg_baseline,
)
from leantune.errors import ConfigError, UnsupportedMethodError
from leantune.tasks.core import Example, Task

GOOD = ["good", "great", "fine", "lovely", "superb", "nice"]
BAD = ["bad", "awful", "poor", "dreadful", "grim", "nasty"]
FILLER = ["the", "a", "film", "day", "food", "was", "really", "so", "today"]


def separable_task(sizes: tuple[int, int, int] = (60, 20, 20), seed: int = 0) -> Task:
    """Each text holds filler words and one word that gives its class away (positive or negative)."""
    rng = random.Random(seed)

    def example() -> Example:
        label = rng.randrange(2)
        words = rng.sample(FILLER, 4) + [rng.choice(GOOD if label else BAD)]
        rng.shuffle(words)
        return Example(" ".join(words), label)

    splits = {split: [example() for _ in range(size)] for split, size in zip(("train", "validation", "test"), sizes)}
    return Task("toy", splits, ["negative", "positive"])


def labelled_task(train: list[int], test: list[int], metric: str = "accuracy") -> Task:
    def examples(labels: list[int]) -> list[Example]:
        return [Example(f"text {i}", label) for i, label in enumerate(labels)]

    return Task("labels", {"train": examples(train), "validation": examples(test), "test": examples(test)},
                ["a", "b", "c"], metric=metric)


def test_majority_class_is_the_mode_of_the_training_labels_and_scores_the_test_split() -> None:
    task = labelled_task(train=[0, 2, 2, 1, 2, 0], test=[2, 2, 0, 1])
    assert majority_class(task.splits["train"]) == 2
    assert majority_baseline(task) == pytest.approx(2 / 4)
    assert majority_class(labelled_task([1, 0, 0, 1], [0]).splits["train"]) == 0  # ties: the smallest label


def test_majority_uses_the_tasks_own_metric() -> None:
    task = labelled_task(train=[1, 1, 0], test=[1, 0, 1, 0], metric="matthews_correlation")
    assert majority_baseline(task) == 0.0  # a constant prediction has no correlation


def test_tfidf_logistic_regression_fits_a_separable_set_perfectly() -> None:
    assert tfidf_logreg_baseline(separable_task()) == 1.0


def test_features_are_mean_pooled_over_real_tokens_only(tiny_bert_dir) -> None:
    task = separable_task()
    extractor = FeatureExtractor(str(tiny_bert_dir), None, task, max_length=32, batch_size=8, input_processor=None,
                                 device=None, progress=False)
    short, long = Example("fine", 1), Example("the food was really so very dreadful today", 0)
    alone = extractor([short])
    padded = extractor([short, long])  # the short text is padded to the long one's length
    assert alone.shape == (1, 32)
    assert abs(alone[0] - padded[0]).max() < 1e-5
    swapped = extractor([long, short])  # batches are formed by length; rows come back in the given order
    assert abs(swapped[::-1] - padded).max() < 1e-5


def test_cls_and_mean_patch_pooling_for_vit_like_models() -> None:
    model = make_model("dinov2")
    extractor = FeatureExtractor.__new__(FeatureExtractor)
    extractor.cls_token = True
    hidden = model.dinov2(pixel_values=make_inputs("dinov2")["pixel_values"]).last_hidden_state
    pooled = extractor._pool(hidden, None)
    assert pooled.shape == (2, 64)
    torch.testing.assert_close(pooled[:, :32], hidden[:, 0])
    torch.testing.assert_close(pooled[:, 32:], hidden[:, 1:].mean(dim=1))


def test_classification_baselines_returns_every_baseline_with_metric_and_time(tiny_bert_dir) -> None:
    task = separable_task()
    results = baseline_results(task, tiny_bert_dir, max_length=16, batch_size=16, progress=False)
    assert [r.name for r in results] == list(BASELINE_LABELS)
    assert all(0.0 <= r.metric <= 1.0 and r.seconds >= 0 for r in results)
    scores = classification_baselines(task, None)  # no model: no frozen-feature baseline
    assert set(scores) == {"majority", "tfidf_logreg"} and scores["tfidf_logreg"] == 1.0


def test_baselines_refuse_regression_and_bad_sizes() -> None:
    regression = Task("reg", {s: [Example("x", 0.5), Example("y", 1.5)] for s in ("train", "validation", "test")},
                      None, metric="pearson_spearman")
    with pytest.raises(ConfigError, match="regression task"):
        classification_baselines(regression, None)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        classification_baselines(separable_task(), None, batch_size=0)


def test_probe_trains_only_the_task_head() -> None:
    tuned = leantune.wrap(make_model("bert"), leantune.make_config("probe"))
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.classifier.weight", "base_model.classifier.bias"}
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    for seed in range(3):
        tuned(**make_inputs("bert", seed=seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    assert set(tuned.delta_state_dict()) == trainable
    assert tuned.merge() is tuned.base_model


def test_probe_facts_and_refusals() -> None:
    method = leantune.get_method("probe")
    assert method.mergeable and not method.identity_at_init
    with pytest.raises(ConfigError, match="train_head=False leaves nothing to train"):
        leantune.make_config("probe", train_head=False)
    with pytest.raises(UnsupportedMethodError, match="trains only a task head"):
        leantune.wrap(make_model("t5"), leantune.make_config("probe"))
