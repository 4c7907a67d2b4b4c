"""``leantune eval RUN_DIR``: score a saved run's best checkpoint on its test (or validation) split."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="Evaluate a saved run (its best checkpoint) on its test split.",
                                   description=__doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="A directory written by `leantune train`.")
    parser.add_argument("--split", choices=("test", "validation"), default="test", help="Split to score.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import leantune
    from leantune.errors import CheckpointError
    from leantune.train.checkpoint import BEST
    from leantune.train.data import Encoder
    from leantune.train.evaluation import evaluate
    from leantune.train.run import RunSpec, build

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    spec = RunSpec.read(run_dir)
    if not (run_dir / BEST).is_dir():
        raise CheckpointError(f"{run_dir / BEST} is missing: the run has not finished an evaluation yet")
    model, tokenizer, task, config = build(spec, for_loading=True)
    tuned = leantune.load(model, run_dir / BEST)
    task = task.subset({"validation": config.validation_examples, "test": config.test_examples})
    encoder = Encoder.for_model(task, tokenizer, tuned, config.max_length, config.max_target_length)
    metric = evaluate(tuned, encoder, task.splits[args.split], config)
    print(f"{run_dir}: {spec.model} + {spec.method} on {task.name}, {args.split} {task.metric} {metric:.4f} "
          f"({len(task.splits[args.split]):,d} examples)")
    return 0
