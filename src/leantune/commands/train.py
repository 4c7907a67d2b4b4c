"""``leantune train``: fine-tune a model with one method on a task; with no arguments, the embedded default
(all-MiniLM-L6-v2 with LST on the built-in tweet-sentiment set, a few minutes on 2 CPU cores)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from leantune.errors import CheckpointError, ConfigError
from leantune.registry import get_method
from leantune.train.config import TrainConfig
from leantune.train.run import DATA_KEYS, DEFAULT_TRAIN_SETTINGS, RunSpec, checked_local_data


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalars and lists (``8``, ``3e-3``, ``true``, ``[q, v]``), else the string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_assignments(items: list[str] | None, flag: str) -> dict[str, Any]:
    values = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        values[key.strip()] = parse_value(value)
    return values


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``train`` and ``compare``: model, task or local data, training settings, config."""
    parser.add_argument("--config", help="A YAML or JSON file with run settings (model, method, options, task, "
                        "glue_dir, data, train); command-line flags override it.")
    parser.add_argument("--model", help="Hugging Face model id or local folder (default: all-MiniLM-L6-v2).")
    parser.add_argument("--task", help="Built-in task: tweets (default) or a GLUE task (cola, sst2, mrpc, qqp, "
                        "stsb, mnli, qnli, rte).")
    parser.add_argument("--glue-dir", help="Folder with GLUE's TSV files (offline GLUE).")
    data = parser.add_argument_group("local data (replaces --task)")
    data.add_argument("--data", help="Training file: .csv, .tsv or .jsonl.")
    data.add_argument("--validation", help="Validation file (default: split from --data).")
    data.add_argument("--test", help="Test file (default: split from the validation data).")
    data.add_argument("--text-column", help="Column with the text (default: text).")
    data.add_argument("--text-pair-column", help="Column with the second text of a pair.")
    data.add_argument("--label-column", help="Column with the label (default: label).")
    group = parser.add_argument_group("training settings (override the config file)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.name == "adam_betas":
            continue
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=f"train_{f.name}", action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kind = float if f.type in ("float", "float | None") else int if "int" in str(f.type) else str
            group.add_argument(flag, dest=f"train_{f.name}", type=kind, metavar=f.name.upper(), help=help_text)
    parser.add_argument("--output-dir", help="Run directory (default: runs/<method>-<task>-<time>).")


def read_config_file(path: str) -> dict[str, Any]:
    """The settings in a YAML or JSON config file; a missing, unreadable or malformed file is a ConfigError."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {file} does not exist")
    try:
        text = file.read_text()
        values = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {file} cannot be read ({err})") from None
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {file} cannot be parsed ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {file} must hold a mapping of settings, got {type(values).__name__}")
    return values


def spec_from_args(args: argparse.Namespace, method: str | None) -> RunSpec:
    """The run spec: built-in defaults, then the config file, then command-line flags."""
    values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    spec = RunSpec.from_dict(values)
    spec.train = dict(spec.train)
    if args.model:
        spec.model = args.model
    if method and method != spec.method:
        spec.method, spec.options = method, {}  # the file's options belong to the file's method
    if args.task:
        spec.task, spec.data = args.task, None
    if args.glue_dir:
        spec.glue_dir = args.glue_dir
    flags = {name: getattr(args, name) for name in DATA_KEYS if getattr(args, name) is not None}
    if flags:
        if "data" not in flags and spec.data is None:
            raise ConfigError(f"--{next(iter(flags)).replace('_', '-')} needs --data (the training file)")
        spec.data = {**(spec.data or {}), **flags}
    if spec.data is not None:
        spec.data = checked_local_data({"text_column": "text", "label_column": "label", **spec.data})
    builtin_default = spec.data is None and spec.task == "tweets"
    defaults = DEFAULT_TRAIN_SETTINGS if builtin_default else {"measure_memory": True}
    overrides = {f.name: getattr(args, f"train_{f.name}") for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f"train_{f.name}", None) is not None}
    spec.train = {**defaults, **spec.train, **overrides}
    if builtin_default:  # the embedded default's short CPU budget: the method's options for it
        spec.options = {**get_method(spec.method).budget_options, **spec.options}
    spec.train_config()  # fail now on a bad setting
    return spec


def default_output_dir(spec: RunSpec) -> Path:
    task = Path(spec.data["data"]).stem if spec.data else spec.task
    return Path("runs") / f"{spec.method}-{task}-{time.strftime('%Y%m%d-%H%M%S')}"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="Fine-tune a model with one method (no arguments: all-MiniLM-L6-v2 + LST on tweets).",
        description=__doc__,
    )
    parser.add_argument("--method", help="Tuning method (default: lst); see `leantune inspect`.")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="A method option, e.g. --set r=16.")
    add_run_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="Continue the run in --output-dir from its latest "
                        "checkpoint, with the settings saved there.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from leantune.train.loop import train
    from leantune.train.run import RUN_NAME, build

    # Under torchrun every process runs this command; the first one (RANK 0) checks, writes and prints.
    main_process = int(os.environ.get("RANK", "0")) == 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.output_dir:
        raise ConfigError("under torchrun every process must train the same run: pass --output-dir")
    if args.resume:
        if not args.output_dir:
            raise ConfigError("--resume needs --output-dir (the run to continue)")
        run_dir = Path(args.output_dir)
        if not (run_dir / RUN_NAME).is_file():
            raise CheckpointError(f"{run_dir / RUN_NAME} is missing: nothing to resume there")
        spec = RunSpec.read(run_dir)
        if main_process:
            print(f"resuming {run_dir} with its saved settings")
    else:
        spec = spec_from_args(args, args.method)
        spec.options = {**spec.options, **parse_assignments(args.set, "--set")}
        run_dir = Path(args.output_dir) if args.output_dir else default_output_dir(spec)
        if main_process and (run_dir / RUN_NAME).is_file():
            raise ConfigError(f"{run_dir} already holds a run; continue it with --resume or choose another "
                              "--output-dir")
    tuned, tokenizer, task, config = build(spec)
    if main_process:
        print(f"{spec.model} + {spec.method} on {task.describe()}")
        tuned.print_trainable_parameters()
        spec.write(run_dir)
    result = train(tuned, task, tokenizer, config, output_dir=run_dir, resume=args.resume)
    if main_process:
        print(summary(result, spec))
    return 0


def summary(result: Any, spec: RunSpec) -> str:
    """The lines ``leantune train`` prints at the end."""
    lines = [
        f"test {result.metric}: {result.test_metric:.4f} (best validation {result.validation_metric:.4f} at step "
        f"{result.best_step}, epoch {result.best_epoch:g})",
        f"trainable parameters: {result.trainable_parameters:,d} of {result.total_parameters:,d} "
        f"({result.trainable_percent:.4f}%)",
    ]
    if result.step_memory:
        lines.append(f"peak training memory (one step, {result.step_memory['source']}): "
                     f"{result.step_memory['peak_bytes'] / 2**20:,.1f} MiB")
    lines.append(f"peak process memory ({result.peak_memory_source}): {result.peak_memory_bytes / 2**20:,.1f} MiB")
    lines.append(f"time: {result.wall_seconds:.1f} s ({result.steps} steps, {result.seconds_per_step:.3f} s/step)")
    lines.append(f"run saved in {result.output_dir} (best/ loads with leantune.load; `leantune eval "
                 f"{result.output_dir}`)")
    return "\n".join(lines)
