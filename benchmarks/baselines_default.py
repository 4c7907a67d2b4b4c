"""Baselines on the embedded default (all-MiniLM-L6-v2 features, tweet sentiment, the embedded budget's splits:
3,200 training, 500 validation and 1,000 test tweets, 64 tokens); writes benchmarks/results/baselines_default.json.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/baselines_default.py [--train-examples N]

With ``--train-examples N`` the baselines fit on the first N training tweets instead (same validation and test
tweets) and the results go to ``baselines_default_<N>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from leantune.baselines import baseline_results
from leantune.files import write_atomic_text
from leantune.tasks import get_task
from leantune.train.run import DEFAULT_TRAIN_SETTINGS


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-examples", type=int, default=None, help="Training tweets (default: the budget's).")
    args = parser.parse_args()
    settings = DEFAULT_TRAIN_SETTINGS
    train_examples = args.train_examples or settings["train_examples"]
    task = get_task("tweets").subset({"train": train_examples,
                                      "validation": settings["validation_examples"],
                                      "test": settings["test_examples"]})
    results = baseline_results(task, "all-MiniLM-L6-v2", max_length=settings["max_length"])
    rows = [dataclasses.asdict(r) for r in results]
    for row in rows:
        print(f"{row['name']:<16} test {task.metric} {row['metric']:.4f}  {row['seconds']:7.1f} s")
    suffix = "" if args.train_examples is None else f"_{args.train_examples}"
    out = Path(__file__).parent / "results" / f"baselines_default{suffix}.json"
    write_atomic_text(out, json.dumps({"task": task.describe(), "model": "all-MiniLM-L6-v2", "rows": rows},
                                      indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run())
