"""``leantune eval RUN_DIR``: score a saved run's best checkpoint on its test (or validation) split; a run with
several tasks is scored per task and on average."""

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
    from leantune.train.data import task_encoders
    from leantune.train.evaluation import average, evaluate_tasks
    from leantune.train.run import RunSpec, build

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    spec = RunSpec.read(run_dir)
    if not (run_dir / BEST).is_dir():
        raise CheckpointError(f"{run_dir / BEST} is missing: the run has not finished an evaluation yet")
    model, tokenizer, tasks, config = build(spec, for_loading=True)
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
