"""Tasks: GLUE's LST splits and metrics on hand-made TSV fixtures, local files, the tweet set, bad input."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from leantune.tasks import get_task, task_names
from leantune.tasks import glue as glue_module
from leantune.tasks.core import DataError, Example
from leantune.tasks.glue import GLUE_TASKS, load_glue
from leantune.tasks.local import load_local

FIXTURES = Path(__file__).parent / "fixtures"
GLUE_DIR = FIXTURES / "glue"


def _shuffled_halves(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(42)).tolist()
    half = len(examples) // 2
    return [examples[i] for i in order[:half]], [examples[i] for i in order[half:]]


@pytest.mark.parametrize("name,train,validation,test", [
    ("cola", 4, 3, 3), ("mrpc", 3, 2, 2), ("stsb", 3, 3, 3), ("rte", 3, 2, 3),
])
def test_small_tasks_halve_the_validation_set(name: str, train: int, validation: int, test: int) -> None:
    task = load_glue(name, GLUE_DIR)
    sizes = {s: len(task.splits[s]) for s in ("train", "validation", "test")}
    assert sizes == {"train": train, "validation": validation, "test": test}
    original = glue_module._read_tsv(GLUE_TASKS[name], GLUE_DIR / GLUE_TASKS[name].folder / "dev.tsv")
    first, second = _shuffled_halves(original)
    assert task.splits["validation"] == first and task.splits["test"] == second
    assert sorted(map(repr, first + second)) == sorted(map(repr, original))


@pytest.mark.parametrize("name,n_train,n_dev", [("sst2", 8, 4), ("qqp", 5, 2), ("qnli", 4, 2)])
def test_large_tasks_hold_out_training_examples_and_test_on_validation(
    monkeypatch: pytest.MonkeyPatch, name: str, n_train: int, n_dev: int
) -> None:
    monkeypatch.setattr(glue_module, "HELD_OUT_TRAIN", 2)  # 1,000 in the paper; the fixtures are tiny
    task = load_glue(name, GLUE_DIR)
    spec = GLUE_TASKS[name]
    original_train = glue_module._read_tsv(spec, GLUE_DIR / spec.folder / "train.tsv")
    original_dev = glue_module._read_tsv(spec, GLUE_DIR / spec.folder / "dev.tsv")
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(42)).tolist()
    assert task.splits["validation"] == [original_train[i] for i in order[:2]]
    assert task.splits["train"] == [original_train[i] for i in order[2:]]
    assert task.splits["test"] == original_dev and len(original_dev) == n_dev


def test_mnli_validates_on_mismatched_and_tests_on_matched() -> None:
    task = load_glue("mnli", GLUE_DIR)
    assert [len(task.splits[s]) for s in ("train", "validation", "test")] == [3, 2, 3]
    assert task.splits["validation"][0] == Example("Your gift is appreciated.", 0, "Thanks for the gift.")
    assert task.splits["test"][1].label == task.label_names.index("contradiction") == 2


def test_tsv_labels_columns_and_text_to_text_form() -> None:
    cola = load_glue("cola", GLUE_DIR)
    assert {e.text for e in cola.splits["train"]} >= {"They drank the pub."}
    assert cola.source_text(Example("They drank the pub.", 0)) == "cola sentence: They drank the pub."
    assert cola.target_text(0) == "unacceptable" and cola.parse_target("acceptable") == 1
    rte = load_glue("rte", GLUE_DIR)
    assert rte.splits["train"][0] == Example("No weapons were found in Iraq.", 1, "Weapons were found in Iraq.")
    assert rte.source_text(rte.splits["train"][0]) == (
        "rte sentence1: No weapons were found in Iraq. sentence2: Weapons were found in Iraq.")
    stsb = load_glue("sts-b", GLUE_DIR)
    assert stsb.is_regression and stsb.num_labels == 1
    assert [stsb.target_text(v) for v in (3.8, 4.75, 2.43, 0.0)] == ["3.8", "4.8", "2.4", "0.0"]
    assert stsb.parse_target("3.6") == 3.6 and stsb.parse_target("three") == 0.0
    mrpc = load_glue("mrpc", GLUE_DIR)
    assert mrpc.source_text(Example("a", 1, "b")) == "mrpc sentence1: a sentence2: b"
    assert set(task_names()) >= {"tweets", *GLUE_TASKS}


def test_metrics_match_scipy_and_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 2, 50).tolist(), rng.integers(0, 2, 50).tolist()
    cola, mrpc, rte = (load_glue(n, GLUE_DIR) for n in ("cola", "mrpc", "rte"))
    assert cola.score(predictions, labels) == pytest.approx(matthews_corrcoef(labels, predictions))
    assert mrpc.score(predictions, labels) == pytest.approx(
        (f1_score(labels, predictions) + accuracy_score(labels, predictions)) / 2)
    assert rte.score(predictions, labels) == pytest.approx(accuracy_score(labels, predictions))
    gold, guess = rng.uniform(0, 5, 40), rng.uniform(0, 5, 40)
    stsb = load_glue("stsb", GLUE_DIR)
    expected = (stats.pearsonr(guess, gold)[0] + stats.spearmanr(guess, gold)[0]) / 2
    assert stsb.score(guess.tolist(), gold.tolist()) == pytest.approx(expected)
    assert stsb.score([1.0] * 5, [0.0, 1.0, 2.0, 3.0, 4.0]) == 0.0  # constant predictions: no correlation
    # hand-checked: 3 of 4 right, one false negative -> F1 = 2/3, accuracy 3/4
    assert mrpc.score([1, 0, 0, 1], [1, 1, 0, 1]) == pytest.approx((0.8 + 0.75) / 2)


def test_missing_glue_files_and_unknown_tasks(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dev\.tsv is missing"):
        (tmp_path / "RTE").mkdir()
        (tmp_path / "RTE" / "train.tsv").write_text((GLUE_DIR / "RTE" / "train.tsv").read_text())
        load_glue("rte", tmp_path)
    with pytest.raises(DataError, match="unknown task 'wnli'"):
        get_task("wnli")
    bad = tmp_path / "bad"
    (bad / "RTE").mkdir(parents=True)
    (bad / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    (bad / "RTE" / "dev.tsv").write_text((GLUE_DIR / "RTE" / "dev.tsv").read_text())
    with pytest.raises(DataError, match=r"train\.tsv line 2: label 'maybe' is not entailment / not_entailment"):
        load_glue("rte", bad)


def test_local_csv_infers_labels_and_splits_deterministically() -> None:
    first = load_local(FIXTURES / "local" / "reviews.csv")
    second = load_local(FIXTURES / "local" / "reviews.csv")
    assert first.label_names == ["negative", "neutral", "positive"] and first.metric == "accuracy"
    assert [len(first.splits[s]) for s in ("train", "validation", "test")] == [8, 1, 1]
    assert first.splits == second.splits
    all_texts = sorted(e.text for s in first.splits.values() for e in s)
    assert len(all_texts) == 10 and "great food, friendly staff" in all_texts


def test_local_tsv_pairs_with_validation_file_and_jsonl_regression(tmp_path: Path) -> None:
    pairs = load_local(FIXTURES / "local" / "pairs.tsv", text_column="premise", text_pair_column="hypothesis",
                       validation=FIXTURES / "local" / "pairs.tsv")
    assert pairs.label_names == ["0", "1"]
    assert pairs.splits["train"][0] == Example("A dog runs.", 1, "An animal moves.")
    assert len(pairs.splits["validation"]) == len(pairs.splits["test"]) == 2
    scores = load_local(FIXTURES / "local" / "scores.jsonl", text_column="sentence", label_column="score",
                        validation=FIXTURES / "local" / "scores.jsonl", test=FIXTURES / "local" / "scores.jsonl")
    assert scores.is_regression and scores.metric == "pearson_spearman"
    assert [e.label for e in scores.splits["test"]] == [0.5, 1.25, 3.0, 4.75, 2.5]


def test_local_bad_input_names_file_row_and_column(tmp_path: Path) -> None:
    reviews = FIXTURES / "local" / "reviews.csv"
    with pytest.raises(DataError, match=r"data file .*nope\.csv does not exist"):
        load_local(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"reviews\.csv has no column 'sentiment'"):
        load_local(reviews, label_column="sentiment")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(DataError, match=r"empty\.csv has no examples"):
        load_local(empty)
    validation = tmp_path / "val.csv"
    validation.write_text("text,label\nok,positive\nhmm,surprised\n")
    with pytest.raises(DataError, match=r"val\.csv line 3: label 'surprised' in column 'label' does not occur in "
                                        r"the training data"):
        load_local(reviews, validation=validation)
    with pytest.raises(DataError, match="unknown data format '.txt'"):
        (tmp_path / "a.txt").write_text("x")
        load_local(tmp_path / "a.txt")


def test_tweet_sentiment_is_deduplicated_with_a_fixed_split() -> None:
    task = get_task("tweets")
    sizes = [len(task.splits[s]) for s in ("train", "validation", "test")]
    assert sizes[1] == sizes[2] == sum(sizes) // 10
    texts = [e.text for s in task.splits.values() for e in s]
    assert len(texts) == len(set(texts))
    assert task.splits["test"][:5] == get_task("tweets").splits["test"][:5]
    assert task.label_names == ["negative", "neutral", "positive"]
    assert {e.label for e in random.Random(0).sample(task.splits["train"], 300)} == {0, 1, 2}


def test_bbc_news_is_deduplicated_with_a_fixed_split() -> None:
    task = get_task("bbc")
    sizes = [len(task.splits[s]) for s in ("train", "validation", "test")]
    assert sizes[1] == sizes[2] == sum(sizes) // 10
    texts = [e.text for s in task.splits.values() for e in s]
    assert len(texts) == len(set(texts)) == sum(sizes) and 2_000 < sum(sizes) <= 2_225
    assert task.splits["test"][:5] == get_task("bbc").splits["test"][:5]
    assert task.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert {e.label for e in task.splits["validation"]} == set(range(5))
    assert "bbc" in task_names()


def test_a_text_prefix_goes_in_front_of_the_text_in_both_model_forms() -> None:
    import dataclasses

    task = load_local(FIXTURES / "local" / "reviews.csv")
    example = task.splits["train"][0]
    assert task.head_text(example.text) == example.text and task.source_text(example).startswith("text: ")
    prefixed = dataclasses.replace(task, text_prefix="review:")
    assert prefixed.head_text(example.text) == f"review: {example.text}"
    assert prefixed.source_text(example) == f"review: text: {example.text}"
    assert prefixed.subset({"train": 2}).text_prefix == "review:"
