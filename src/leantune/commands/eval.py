"""``leantune eval RUN_DIR``: score a saved run's best checkpoint on its test (or validation) split; a run with
several tasks is scored per task and on average."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leantune.tasks.multitask import MultiTask
    from leantune.train.config import TrainConfig
    from leantune.train.run import RunSpec


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="Evaluate a saved run (its best checkpoint) on its test split.",
                                   description=__doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="A directory written by `leantune train`.")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="Split to score (default: test).")
    parser.add_argument("--allow-changed-data", action="store_true",
                        help="Evaluate even if a data file's content changed since the run (a loud warning instead "
                        "of a refusal: the test split may then overlap the training data).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import leantune
    from leantune.errors import CheckpointError
    from leantune.train.checkpoint import BEST
    from leantune.train.data import task_encoders
    from leantune.train.evaluation import average, evaluate_tasks
    from leantune.train.run import RunSpec, build

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    spec = RunSpec.read(run_dir)
    if not (run_dir / BEST).is_dir():
        raise CheckpointError(f"{run_dir / BEST} is missing: the run has not finished an evaluation yet")
    check_data_unchanged(spec, args.allow_changed_data)
    model, tokenizer, tasks, config = build(spec, for_loading=True)
    check_split_sizes(spec, tasks, config)
    tuned = leantune.load(model, run_dir / BEST)
    tasks = tasks.subset({"validation": config.validation_examples, "test": config.test_examples})
    encoders = task_encoders(tasks, tokenizer, tuned, config.max_length, config.max_target_length)
    metrics = evaluate_tasks(tuned, encoders, args.split, config)
    if len(tasks) == 1:
        task = tasks.tasks[0]
        print(f"{run_dir}: {spec.model} + {spec.method} on {task.name}, {args.split} {task.metric} "
              f"{metrics[task.name]:.4f} ({len(task.splits[args.split]):,d} examples)")
        return 0
    print(f"{run_dir}: {spec.model} + {spec.method} on {len(tasks)} tasks, {args.split} average "
          f"{average(metrics):.4f}")
    for task in tasks:
        print(f"  {task.name}: {args.split} {task.metric} {metrics[task.name]:.4f} "
              f"({len(task.splits[args.split]):,d} examples)")
    return 0


def check_data_unchanged(spec: RunSpec, allow_changed: bool) -> None:
    """Refuse (or, with ``allow_changed``, warn loudly) when a data file's content differs from the run's."""
    from leantune.tasks.core import DataError
    from leantune.train.run import changed_data, data_sha256

    if not spec.data_sha256:
        return
    changed = changed_data(spec.data_sha256, data_sha256(spec))
    if not changed:
        return
    if not allow_changed:
        raise DataError(f"data file {changed[0]}; its splits may now overlap what the run trained on: evaluate with "
                        "the run's data, or pass --allow-changed-data to score anyway")
    for phrase in changed:
        print(f"WARNING: data file {phrase}; scoring anyway (--allow-changed-data): the numbers are not the "
              "run's, and the test split may overlap its training data", file=sys.stderr)


def check_split_sizes(spec: RunSpec, tasks: MultiTask, config: TrainConfig) -> None:
    """Warn when the splits rebuilt now differ in size from those the run recorded."""
    from leantune.train.run import split_sizes

    now = split_sizes(tasks, config)
    if spec.split_sizes is not None and now != spec.split_sizes:
        print(f"WARNING: the data's split sizes differ from the run's: now {now}, the run had {spec.split_sizes}",
              file=sys.stderr)
