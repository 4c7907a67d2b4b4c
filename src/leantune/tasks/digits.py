"""Visual digits: a multi-task vision-and-language benchmark built at run time from labelled digit images (MNIST).

Three tasks in the shape of VL-Adapter's, each a :class:`leantune.tasks.vl.VLTask` whose examples name their
images by id (``inputs["visual_features"]``), so they train through the same feature store and batch encoders as
VQA, GQA and NLVR2:

- ``vqa`` (kind ``vqa``): a question about one digit image ("what digit is this?", "is this digit even or odd?",
  "is this digit larger than 6?");
- ``gqa`` (kind ``gqa``): a compositional question about a 2 x 2 grid of digits ("which digit is bottom-left?",
  "is the top-right digit even or odd?", "is the top-left digit larger than the bottom-right digit?");
- ``nlvr`` (kind ``nlvr``): a statement about two digit images, true or false ("the left digit is larger than the
  right one.", "both digits are even.").

Every image gets several questions from different templates, and templates carry numbers and words (odd/even,
left/right, a threshold) that change the answer, so neither the image nor the words alone give it. Yes/no
answers are drawn first (alternating) and the template's parameter then chosen to give them where the image
allows, and every NLVR2-style statement is generated for a drawn truth value, so those answers are balanced.

Images: a digit is its 28 x 28 image scaled to ``digit_size`` pixels (RGB); a grid is given by its four regions,
as VL-T5 reads GQA from one feature per detected object: four cell images of digits of the same split, in
reading order. Splits use disjoint source images (MNIST's own train, validation
and test splits in the demo). :func:`build_digit_tasks` returns the tasks, the images to write, and each image's
digits (so answers can be checked).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leantune.errors import ConfigError
from leantune.tasks.core import SPLITS, Example
from leantune.tasks.vl import SPECS, VISUAL_INPUT, VLRecord, VLTask

POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
YES_NO = ("yes", "no")
PARITY = ("even", "odd")
TRUE_FALSE = ("true", "false")
NUMBERS = tuple(str(n) for n in range(10))  # every numeric answer is a digit

Question = tuple[str, str, str]
"""``(template name, text, answer)``."""


# --- one digit (VQA-style) ----------------------------------------------------------------------------------------
def digit_question(template: str, digit: int, want_yes: bool, rng: random.Random) -> Question:
    """A question of ``template`` about an image of ``digit``; yes/no templates aim at ``want_yes``."""
    if template == "identity":
        return template, "what digit is this?", str(digit)
    if template == "parity":
        return template, "is this digit even or odd?", PARITY[digit % 2]
    if template == "larger":
        below, above = list(range(1, digit)), list(range(max(digit, 1), 9))  # thresholds k in 1..8
        options = below if (want_yes and below) or not above else above
        k = rng.choice(options)
        return template, f"is this digit larger than {k}?", "yes" if digit > k else "no"
    raise ConfigError(f"unknown digit question template {template!r}; templates: {', '.join(DIGIT_TEMPLATES)}")


DIGIT_TEMPLATES = ("identity", "parity", "larger")


# --- a 2 x 2 grid (GQA-style) -------------------------------------------------------------------------------------
def grid_question(template: str, digits: Sequence[int], want_yes: bool, rng: random.Random) -> Question:
    """A question of ``template`` about a grid whose digits are ``digits`` (top-left, top-right, bottom-left,
    bottom-right); yes/no templates aim at ``want_yes`` where the grid allows it."""
    if template == "position":
        p = rng.randrange(4)
        return template, f"which digit is {POSITIONS[p]}?", str(digits[p])
    if template == "parity":
        p = rng.randrange(4)
        return template, f"is the {POSITIONS[p]} digit even or odd?", PARITY[digits[p] % 2]
    if template == "exists":
        present = sorted(set(digits))
        absent = [d for d in range(10) if d not in present]
        k = rng.choice(present if want_yes or not absent else absent)
        return template, f"is there a {k} in the grid?", "yes" if k in digits else "no"
    if template == "compare":
        pairs = [(a, b) for a in range(4) for b in range(4) if digits[a] != digits[b]]
        if not pairs:
            return grid_question("position", digits, want_yes, rng)
        a, b = rng.choice(pairs)
        if (digits[a] > digits[b]) != want_yes:
            a, b = b, a
        return template, f"is the {POSITIONS[a]} digit larger than the {POSITIONS[b]} digit?", \
            "yes" if digits[a] > digits[b] else "no"
    raise ConfigError(f"unknown grid question template {template!r}; templates: {', '.join(GRID_TEMPLATES)}")


GRID_TEMPLATES = ("position", "parity", "exists", "compare")


# --- two digits (NLVR2-style) -------------------------------------------------------------------------------------
def pair_statement(template: str, rng: random.Random) -> tuple[str, Callable[[int, int], bool]]:
    """A statement of ``template`` with its parameters drawn, and its truth as a function of (left, right)."""
    if template == "order":
        side, other = rng.choice([("left", "right"), ("right", "left")])
        first = 0 if side == "left" else 1
        return f"the {side} digit is larger than the {other} one.", lambda a, b: (a, b)[first] > (a, b)[1 - first]
    if template == "parity":
        word = rng.choice(("even", "odd"))
        rest = 0 if word == "even" else 1
        return f"both digits are {word}.", lambda a, b: a % 2 == rest and b % 2 == rest
    if template == "same":
        return "the two digits are the same.", lambda a, b: a == b
    if template == "shows":
        side, k = rng.choice(("left", "right")), rng.randrange(10)
        return f"the {side} image shows a {k}.", lambda a, b: (a if side == "left" else b) == k
    raise ConfigError(f"unknown pair statement template {template!r}; templates: {', '.join(PAIR_TEMPLATES)}")


PAIR_TEMPLATES = ("order", "parity", "same", "shows")


def pair_example(template: str, truth: bool, rng: random.Random) -> tuple[str, int, int]:
    """``(statement, left digit, right digit)`` with the statement's truth equal to ``truth`` (rejection
    sampling over uniform digit pairs; a statement that cannot reach ``truth`` is drawn again)."""
    while True:
        text, holds = pair_statement(template, rng)
        for _ in range(200):
            left, right = rng.randrange(10), rng.randrange(10)
            if holds(left, right) == truth:
                return text, left, right


# --- building the tasks -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DigitSizes:
    """How many images and questions each split gets. Validation and test take ``eval_fraction`` of the
    training counts (at least one image and question)."""

    digit_images: int = 500
    grid_images: int = 400
    questions_per_image: int = 4
    pair_statements: int = 2000
    eval_fraction: float = 0.25

    def scaled(self, split: str) -> DigitSizes:
        if split == "train":
            return self
        f = self.eval_fraction
        return DigitSizes(max(10, int(self.digit_images * f)), max(1, int(self.grid_images * f)),
                          self.questions_per_image, max(2, int(self.pair_statements * f)), f)


@dataclass
class DigitBenchmark:
    """The three tasks, the images their examples name (id -> RGB uint8 array), and each image's digit. A grid
    is named by its four cell images (top-left, top-right, bottom-left, bottom-right): its regions."""

    tasks: list[VLTask]
    images: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # set ("digits", "cells") -> id -> RGB
    digits: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def write_images(self, folder: str | Path) -> dict[str, Path]:
        """Write every image set as PNGs into ``folder/<set>/`` (existing files are kept); return the folders."""
        from PIL import Image

        folders = {}
        for name, images in self.images.items():
            target = Path(folder) / name
            target.mkdir(parents=True, exist_ok=True)
            for image_id, pixels in images.items():
                path = target / f"{image_id}.png"
                if not path.is_file():
                    Image.fromarray(pixels).save(path)
            folders[name] = target
        return folders

    def image_digits(self, task: VLTask, example: Example) -> tuple[int, ...]:
        """The digits an example's images show, in image order (a grid: its four digits)."""
        return tuple(d for image_id in task.record(example).image_ids for d in self.digits[image_id])


def digit_pixels(image: np.ndarray, size: int) -> np.ndarray:
    """A (28, 28) uint8 digit as a (size, size, 3) RGB array, scaled with nearest-neighbour sampling."""
    rows = (np.arange(size) * image.shape[0]) // size
    cols = (np.arange(size) * image.shape[1]) // size
    return np.repeat(image[rows][:, cols][:, :, None], 3, axis=2)


def build_digit_tasks(source: Callable[[str], tuple[np.ndarray, np.ndarray]], sizes: DigitSizes = DigitSizes(),
                      seed: int = 0, digit_size: int = 56, prefixes: bool = True) -> DigitBenchmark:
    """The visual-digits benchmark from ``source(split) -> (images (N, 28, 28) uint8, labels (N,))`` (e.g.
    :func:`leantune.assets.mnist`). ``prefixes``: put VL-Adapter's task prefixes ("vqa:", ...) before the texts."""
    rng, image_rng = random.Random(seed), random.Random(f"images-{seed}")  # questions do not move the images
    bench = DigitBenchmark([])
    records: dict[str, list[VLRecord]] = {"vqa": [], "gqa": [], "nlvr": []}
    splits: dict[str, dict[str, list[Example]]] = {name: {} for name in records}
    bench.images = {"digits": {}, "cells": {}}
    for split in SPLITS:
        images, labels = source(split)
        by_digit = [np.flatnonzero(labels == d).tolist() for d in range(10)]
        if any(not ids for ids in by_digit):
            raise ConfigError(f"the {split} digit images do not cover every digit 0-9")
        split_sizes = sizes.scaled(split)
        singles = _digit_images(bench, split, images, by_digit, split_sizes.digit_images, digit_size, image_rng)
        grids = _grid_images(bench, split, images, by_digit, split_sizes.grid_images, digit_size, image_rng)
        made = {"vqa": _questions(bench, [(i,) for i in singles], digit_question, DIGIT_TEMPLATES, split_sizes, rng),
                "gqa": _questions(bench, grids, grid_question, GRID_TEMPLATES, split_sizes, rng),
                "nlvr": _pair_records(singles, bench, split_sizes.pair_statements, rng)}
        for name, split_records in made.items():
            start = len(records[name])
            records[name] += split_records
            splits[name][split] = [
                Example(r.text, start + i, task=name,
                        inputs={VISUAL_INPUT: r.image_ids[0] if len(r.image_ids) == 1 else r.image_ids})
                for i, r in enumerate(split_records)]
    vocabularies = {"vqa": [*NUMBERS, *PARITY, *YES_NO], "gqa": [*NUMBERS, *PARITY, *YES_NO], "nlvr": list(TRUE_FALSE)}
    bench.tasks = [VLTask(name, splits[name], vocabularies[name], metric=SPECS[name].metric,
                          prefix=SPECS[name].prefix.strip() if prefixes else "",
                          source={"digits": {"seed": seed, "sizes": vars(sizes)}}, kind=name, records=records[name])
                   for name in records]
    return bench


def _digit_images(bench: DigitBenchmark, split: str, images: np.ndarray, by_digit: list[list[int]], count: int,
                  size: int, rng: random.Random) -> list[str]:
    """``count`` single-digit images, digits balanced (0, 1, ..., 9, 0, ...), each a different source image."""
    ids = []
    for i in range(count):
        digit = i % 10
        source = by_digit[digit][rng.randrange(len(by_digit[digit]))]
        image_id = f"digit-{split}-{i:05d}"
        bench.images["digits"][image_id] = digit_pixels(images[source], size)
        bench.digits[image_id] = (digit,)
        ids.append(image_id)
    return ids


def _grid_images(bench: DigitBenchmark, split: str, images: np.ndarray, by_digit: list[list[int]], count: int,
                 size: int, rng: random.Random) -> list[tuple[str, ...]]:
    """``count`` 2 x 2 grids of uniformly drawn digits, each as the ids of its four cell images (in ``cells``)."""
    grids = []
    for i in range(count):
        cells = []
        for position in range(4):
            digit = rng.randrange(10)
            cell_id = f"cell-{split}-{i:05d}-{position}"
            source = by_digit[digit][rng.randrange(len(by_digit[digit]))]
            bench.images["cells"][cell_id] = digit_pixels(images[source], size)
            bench.digits[cell_id] = (digit,)
            cells.append(cell_id)
        grids.append(tuple(cells))
    return grids


def _questions(bench: DigitBenchmark, scenes: Sequence[tuple[str, ...]], make: Callable[..., Question],
               templates: Sequence[str], sizes: DigitSizes, rng: random.Random) -> list[VLRecord]:
    """``questions_per_image`` questions per scene (the image ids of one digit, or of a grid's cells), each from a
    different template. Yes/no aims alternate per template and first digit, so they are balanced and independent
    of the digits (alternating per template alone, digits drawn in order 0, 1, ... would tie "yes" to even ones)."""
    records: list[VLRecord] = []
    asked: Counter = Counter()
    count = min(sizes.questions_per_image, len(templates))
    for image_ids in scenes:
        digits = tuple(d for image_id in image_ids for d in bench.digits[image_id])
        for template in rng.sample(list(templates), count):
            want_yes = asked[template, digits[0]] % 2 == 0
            asked[template, digits[0]] += 1
            name, text, answer = make(template, digits[0] if len(digits) == 1 else digits, want_yes, rng)
            records.append(VLRecord(f"{image_ids[0]}#{len(records)}", text, image_ids, {answer: 1.0}))
    return records


def _pair_records(single_ids: list[str], bench: DigitBenchmark, count: int, rng: random.Random) -> list[VLRecord]:
    """``count`` statements about two single-digit images, true and false alternating."""
    by_digit: dict[int, list[str]] = {}
    for image_id in single_ids:
        by_digit.setdefault(bench.digits[image_id][0], []).append(image_id)
    records = []
    for i in range(count):
        truth = i % 2 == 0
        text, left, right = pair_example(rng.choice(PAIR_TEMPLATES), truth, rng)
        images = (rng.choice(by_digit[left]), rng.choice(by_digit[right]))
        answer = TRUE_FALSE[0] if truth else TRUE_FALSE[1]
        records.append(VLRecord(f"pair-{i}", text, images, {answer: 1.0}))
    return records


def blind_accuracy(bench: DigitBenchmark, task: VLTask, key: str, split: str = "test") -> float:
    """Accuracy on ``split`` of the majority answer of the training examples with the same question text
    (``key="text"``) or the same image digits (``key="digits"``); an unseen text or digits gets the overall
    majority. How far a model blind to the images (or to the words) gets."""
    def value(example: Example) -> Any:
        return example.text if key == "text" else bench.image_digits(task, example)

    groups: dict[Any, Counter] = {}
    for example in task.splits["train"]:
        groups.setdefault(value(example), Counter())[task.target_text(example.label)] += 1
    overall = sum(groups.values(), Counter()).most_common(1)[0][0]
    guesses = {v: c.most_common(1)[0][0] for v, c in groups.items()}
    examples = task.splits[split]
    return sum(guesses.get(value(e), overall) == task.target_text(e.label) for e in examples) / len(examples)
