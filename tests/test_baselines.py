"""Classification baselines (majority class, frozen-feature and TF-IDF logistic regressions) and the probe method."""

from __future__ import annotations

import dataclasses
import json
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
    report_baselines,
    run_baselines,
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


def write_csv(path, task: Task) -> str:
    """``task``'s examples, every split, as one CSV (the run splits it again 80/10/10)."""
    rows = [f"{e.text},{task.label_names[e.label]}" for split in ("train", "validation", "test")
            for e in task.splits[split]]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return str(path)


def test_run_baselines_average_the_tasks_and_reuse_the_cache_only_for_the_same_settings(
        tmp_path, tiny_bert_dir) -> None:
    from leantune.train.run import RunSpec, load_tasks, pinned

    files = [write_csv(tmp_path / f"{name}.csv", separable_task(seed=seed))
             for name, seed in (("first", 1), ("second", 2))]
    spec = pinned(RunSpec(model=str(tiny_bert_dir), tasks=[{"data": f} for f in files],
                          train={"max_length": 16, "train_examples": 40, "test_examples": 10}))
    cache = tmp_path / "baselines.json"
    report = run_baselines(spec, cache, progress=False)
    rows = {row["method"]: row for row in report.rows}
    assert list(rows) == list(BASELINE_LABELS) and report.not_applicable is None
    tasks = load_tasks(spec).subset({"train": 40, "test": 10})
    expected = {task.name: majority_baseline(task) for task in tasks}
    majority = rows["majority"]
    assert majority["metric"] == "average" and majority["train_examples"] == {"first": 40, "second": 40}
    assert {name: m["test"] for name, m in majority["task_metrics"].items()} == expected
    assert majority["test_metric"] == pytest.approx(sum(expected.values()) / 2)
    # the same settings: the cached report is returned as written (tampered with here, to see it is read)
    saved = json.loads(cache.read_text())
    saved["rows"][0]["test_metric"] = -1.0
    cache.write_text(json.dumps(saved))
    assert run_baselines(spec, cache, progress=False).rows[0]["test_metric"] == -1.0
    fewer = dataclasses.replace(spec, train={**spec.train, "train_examples": 20})
    assert run_baselines(fewer, cache, progress=False).rows[0]["test_metric"] >= 0.0
    assert json.loads(cache.read_text())["settings"]["train_examples"] == 20


def test_run_baselines_of_a_regression_task_load_no_model(tmp_path) -> None:
    from leantune.train.run import RunSpec, pinned

    data = tmp_path / "scores.csv"
    data.write_text("text,label\n" + "".join(f"text {i},{i / 7:.3f}\n" for i in range(30)))
    spec = pinned(RunSpec(model="no-such-org/no-such-model", data={"data": str(data)}))  # never loaded
    report = run_baselines(spec, progress=False)
    assert report.rows == [] and "scores: regression task(s)" in report.not_applicable
    assert report.lines() == [f"baselines: n/a ({report.not_applicable})"]


def test_baselines_that_cannot_be_scored_say_why_instead_of_failing_the_run(tmp_path) -> None:
    from leantune.train.run import RunSpec, pinned

    data = write_csv(tmp_path / "toy.csv", separable_task())
    spec = pinned(RunSpec(model="no-such-org/no-such-model", data={"data": data}))
    report = report_baselines(spec, progress=False)
    assert report.rows == [] and report.not_applicable.startswith("they could not be scored: cannot load model")
