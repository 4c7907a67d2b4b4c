"""``leantune train``: fine-tune a model with one method on a task or several; with no arguments, the embedded
default (all-MiniLM-L6-v2 with LST on the built-in tweet-sentiment set, a few minutes on 2 CPU cores).

Several tasks: repeat ``--task NAME`` (a built-in or GLUE task) and/or ``--data FILE``; ``--task NAME --data
FILE`` is one task named NAME with local data. Per-task options (batch size, prefix, columns, validation and
test files) go in the config file's ``tasks:`` list."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from leantune.errors import CheckpointError, ConfigError
from leantune.registry import get_method
from leantune.train.config import TrainConfig

if TYPE_CHECKING:
    from leantune.baselines import BaselineReport
    from leantune.train.run import RunSpec

TASK_FLAGS = "task_flags"
"""Where ``--task`` and ``--data`` are kept, in command-line order: ``[("task", NAME) | ("data", FILE), ...]``."""
CLI_TRAIN_DEFAULTS: dict[str, Any] = {"measure_memory": True}
"""Training settings whose command-line default differs from :class:`TrainConfig`'s."""


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


class TaskFlag(argparse.Action):
    """Appends ``(kind, value)`` for ``--task`` and ``--data`` to one list, so their order is kept."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, TASK_FLAGS, [*(getattr(namespace, TASK_FLAGS, None) or []), (self.const, values)])


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``train`` and ``compare``: model, task(s) or local data, training settings, config."""
    parser.add_argument("--config", help="A YAML or JSON file with run settings (model, method, options, task, "
                        "glue_dir, data, tasks, train); command-line flags override it.")
    parser.add_argument("--model", help="Hugging Face model id or local folder (default: all-MiniLM-L6-v2).")
    parser.add_argument("--task", action=TaskFlag, const="task", dest=TASK_FLAGS, metavar="NAME",
                        help="Built-in task: tweets (default), bbc, or a GLUE task (cola, sst2, mrpc, qqp, stsb, "
                        "mnli, qnli, rte). Repeat for several tasks; followed by --data FILE: a task NAME with local "
                        "data.")
    parser.add_argument("--glue-dir", help="Folder with GLUE's TSV files (offline GLUE).")
    data = parser.add_argument_group("local data (replaces --task)")
    data.add_argument("--data", action=TaskFlag, const="data", dest=TASK_FLAGS, metavar="PATH",
                      help="Training data: a .csv, .tsv or .jsonl file, or an image folder with one sub-folder per "
                      "class. Repeat for several tasks.")
    data.add_argument("--validation", help="Validation file or image folder (default: split from --data).")
    data.add_argument("--test", help="Test file or image folder (default: split from the validation data).")
    data.add_argument("--text-column", help="Column with the text (default: text).")
    data.add_argument("--text-pair-column", help="Column with the second text of a pair.")
    data.add_argument("--label-column", help="Column with the label (default: label).")
    data.add_argument("--image-column", help="Column with image paths (relative to the file), for an image task; "
                      "a --data folder with one sub-folder per class needs none.")
    data.add_argument("--encoding", help="Text encoding of the data files (default: utf-8; e.g. latin-1).")
    group = parser.add_argument_group(
        "training settings (override the config file)", "The embedded default run (no --task, --data or "
        "--config) has its own short budget instead of these defaults: see docs/cli.md.")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "") + _default_text(f)
        if f.name == "adam_betas":
            continue
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=f"train_{f.name}", action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kind = float if f.type in ("float", "float | None") else int if "int" in str(f.type) else str
            group.add_argument(flag, dest=f"train_{f.name}", type=kind, metavar=f.name.upper(), help=help_text)
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                        help="Also score, on the same splits, the majority class, a logistic regression on the "
                        "frozen model's features (at most 4,096 training examples) and, for text, TF-IDF + "
                        "logistic regression (classification only; default: on).")


def _default_text(f: dataclasses.Field) -> str:
    """`` (default: ...)`` for a training setting's help, as the command line applies it."""
    if f.name == "learning_rate":
        return " (default: the method's default learning rate; `leantune inspect` shows it)"
    default = CLI_TRAIN_DEFAULTS.get(f.name, f.default)
    if default is None:
        return ""
    return f" (default: {'on' if default else 'off'})" if isinstance(default, bool) else f" (default: {default})"


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


def task_entries_from_flags(flags: list[tuple[str, str]]) -> list[dict[str, str]]:
    """``--task``/``--data`` in command-line order as task entries: ``--task NAME`` alone is a built-in or GLUE
    task, ``--task NAME --data FILE`` a task NAME with local data, ``--data FILE`` alone a task named after FILE."""
    entries: list[dict[str, str]] = []
    pending: str | None = None  # a --task not yet paired
    for kind, value in flags:
        if kind == "task":
            if pending is not None:
                entries.append({"task": pending})
            pending = value
        else:
            entries.append({"name": pending, "data": value} if pending is not None else {"data": value})
            pending = None
    if pending is not None:
        entries.append({"task": pending})
    return entries


def _apply_task_flags(spec: RunSpec, args: argparse.Namespace) -> None:
    """``--task``/``--data`` and the local-data flags: one plain task sets ``task``/``data`` (merged with the
    file's data settings), anything else becomes the ``tasks`` list; either replaces the file's tasks."""
    from leantune.train.run import DATA_KEYS, DEFAULT_TASK, checked_local_data

    entries = task_entries_from_flags(getattr(args, TASK_FLAGS, None) or [])
    data_flags = {name: getattr(args, name) for name in DATA_KEYS
                  if name != "data" and getattr(args, name) is not None}
    several = len(entries) > 1 or (spec.tasks is not None and not entries)
    if data_flags and several:
        raise ConfigError(f"--{next(iter(data_flags)).replace('_', '-')} applies to one --data file; with several "
                          "tasks give each task's files and columns in the config file's 'tasks:' list")
    if len(entries) > 1 or (entries and "name" in entries[0]):
        spec.tasks, spec.task, spec.data = entries, DEFAULT_TASK, None
    elif entries and "task" in entries[0]:
        spec.tasks, spec.task, spec.data = None, entries[0]["task"], None
    elif entries:
        spec.tasks, spec.data = None, {**(spec.data or {}), **entries[0]}
    if data_flags:
        if spec.data is None:
            raise ConfigError(f"--{next(iter(data_flags)).replace('_', '-')} needs --data (the training file)")
        spec.data = {**spec.data, **data_flags}
    if spec.data is not None:
        spec.data = checked_local_data({"text_column": "text", "label_column": "label", **spec.data})


def spec_from_args(args: argparse.Namespace, method: str | None, base: dict[str, Any] | None = None) -> RunSpec:
    """The run spec: built-in defaults (or ``base``: a saved run's settings), then the config file, then
    command-line flags; paths as typed (:func:`leantune.train.run.pinned` makes them absolute)."""
    from leantune.train.run import DEFAULT_TASK, DEFAULT_TRAIN_SETTINGS, RunSpec

    values: dict[str, Any] = {**(base or {}), **(read_config_file(args.config) if args.config else {})}
    spec = RunSpec.from_dict(values)
    spec.train = dict(spec.train)
    if args.model:
        spec.model = args.model
    if method and method != spec.method:
        spec.method, spec.options = method, {}  # the file's options belong to the file's method
    if args.glue_dir:
        spec.glue_dir = args.glue_dir
    _apply_task_flags(spec, args)
    if spec.tasks is not None:
        spec.task_entries()  # fail now on a bad task entry
    builtin_default = spec.data is None and spec.tasks is None and spec.task == DEFAULT_TASK
    defaults = DEFAULT_TRAIN_SETTINGS if builtin_default else CLI_TRAIN_DEFAULTS
    overrides = {f.name: getattr(args, f"train_{f.name}") for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f"train_{f.name}", None) is not None}
    spec.train = {**defaults, **spec.train, **overrides}
    if builtin_default:  # the embedded default's short CPU budget: the method's options for it
        spec.options = {**get_method(spec.method).budget_options, **spec.options}
    spec.train_config()  # fail now on a bad setting
    return spec


def resumed_spec(saved: RunSpec, args: argparse.Namespace) -> RunSpec:
    """The saved run's settings with the display-only flags given applied; any other flag that would change the
    result is refused, naming each difference (a longer ``--max-steps``/``--epochs`` too: see :data:`LONGER_RUN`)."""
    from leantune.train.run import describe_differences, pinned, spec_differences, with_absolute_paths

    requested = spec_from_args(args, args.method, base=saved.to_dict())
    requested.options = {**requested.options, **parse_assignments(args.set, "--set")}
    requested = pinned(requested)
    if saved.data_sha256 is None:  # a run saved before data hashes were recorded
        requested.data_sha256 = None
    differences = spec_differences(with_absolute_paths(saved), requested)
    if differences:
        longer = LONGER_RUN if {"max_steps", "epochs"} & set(differences) else ""
        raise ConfigError(f"--resume keeps the run's settings; these differ: {describe_differences(differences)}"
                          f"{longer}")
    train = dict(saved.train)
    if args.train_progress is not None:
        train["progress"] = args.train_progress
    return dataclasses.replace(saved, train=train)


LONGER_RUN = ("; a longer run cannot be resumed exactly, because the learning rate decays linearly to 0 at the "
              "run's last step, so the steps already taken would have had other rates: start a new run")


def default_output_dir(spec: RunSpec) -> Path:
    return Path("runs") / f"{spec.method}-{'+'.join(spec.task_names())}-{time.strftime('%Y%m%d-%H%M%S')}"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="Fine-tune a model with one method (no arguments: all-MiniLM-L6-v2 + LST on tweets).",
        description=__doc__,
    )
    parser.add_argument("--method", help="Tuning method (default: lst); see `leantune inspect`.")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="A method option, e.g. --set r=16.")
    add_run_arguments(parser)
    parser.add_argument("--output-dir", help="Run directory (default: runs/<method>-<task>-<time>).")
    parser.add_argument("--resume", action="store_true", help="Continue the run in --output-dir from its latest "
                        "checkpoint, with the settings saved there; other flags that would change the result are "
                        "refused (--progress/--no-progress apply).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()  # the reported wall time counts imports, loading and initialisation too
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from leantune.baselines import BASELINES_NAME, report_baselines
    from leantune.train import distributed
    from leantune.train.loop import phase, train
    from leantune.train.run import build, checkpoint_delta, split_sizes

    # Under torchrun every process runs this command; the first one (RANK 0) checks, writes and prints.
    main_process = int(os.environ.get("RANK", "0")) == 0
    spec, run_dir = run_spec_and_dir(args, main_process)
    show = spec.train_config().progress and main_process
    saved = checkpoint_delta(run_dir) if args.resume else None  # it replaces any data-driven initialisation
    with phase(f"loading {spec.model} and the data, attaching {spec.method}"
               + ("" if saved is None else " (resuming: no data-driven initialisation)"), show):
        tuned, tokenizer, tasks, config = build(spec) if saved is None else build(spec, initialise=False,
                                                                                    saved=saved)
    spec.split_sizes, spec.train = split_sizes(tasks, config), {**spec.train, "seed": config.seed}  # data identity
    if main_process:
        used = tasks.subset({"train": config.train_examples, "validation": config.validation_examples,
                             "test": config.test_examples})
        print(f"{spec.model} + {spec.method} on {used.describe()}")
        tuned.print_trainable_parameters()
        spec.write(run_dir)
    result = train(tuned, tasks, tokenizer, config, output_dir=run_dir, resume=args.resume, wall_start=started)
    del tuned  # the baselines load the frozen base model afresh
    distributed.close()  # after success only: a failed process must not wait in a barrier for the others
    if main_process:
        report = None
        if args.baselines:
            with phase("baselines (majority class, frozen features, TF-IDF)", show):
                report = report_baselines(spec, run_dir / BASELINES_NAME, progress=show, tasks=tasks)
        print(summary(result, spec, report))
    return 0


def run_spec_and_dir(args: argparse.Namespace, main_process: bool) -> tuple[RunSpec, Path]:
    """The run's settings and directory: a saved run's (``--resume``) or the flags', pinned (absolute paths,
    data hashes); a directory that already holds a run is refused without ``--resume``."""
    from leantune.train.run import RUN_NAME, RunSpec, pinned

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.output_dir:
        raise ConfigError("under torchrun every process must train the same run: pass --output-dir")
    if args.resume:
        if not args.output_dir:
            raise ConfigError("--resume needs --output-dir (the run to continue)")
        run_dir = Path(args.output_dir)
        if not (run_dir / RUN_NAME).is_file():
            raise CheckpointError(f"{run_dir / RUN_NAME} is missing: nothing to resume there")
        spec = resumed_spec(RunSpec.read(run_dir), args)
        if main_process:
            print(f"resuming {run_dir} with its saved settings")
    else:
        spec = spec_from_args(args, args.method)
        spec = pinned(dataclasses.replace(spec, options={**spec.options, **parse_assignments(args.set, "--set")}))
        run_dir = Path(args.output_dir) if args.output_dir else default_output_dir(spec)
        if main_process and (run_dir / RUN_NAME).is_file():
            raise ConfigError(f"{run_dir} already holds a run; continue it with --resume or choose another "
                              "--output-dir")
    return spec, run_dir


def summary(result: Any, spec: RunSpec, baselines: BaselineReport | None = None) -> str:
    """The lines ``leantune train`` prints at the end (several tasks: the average, then one line per task), with
    the baselines when they were scored, and where the time went."""
    lines = [
        f"test {result.metric}: {result.test_metric:.4f} (best validation {result.validation_metric:.4f} at step "
        f"{result.best_step}, epoch {result.best_epoch:g})",
    ]
    if len(result.task_metrics) > 1:
        lines += [f"  {name}: test {m['metric']} {m['test']:.4f} (validation {m['validation']:.4f})"
                  for name, m in result.task_metrics.items()]
    if baselines is not None:
        lines += baselines.lines()
        if baselines.rows:
            best = max(baselines.rows, key=lambda row: row["test_metric"])
            lines.append(f"{spec.method} vs the best baseline ({best['label']} {best['test_metric']:.4f}): "
                         f"{100 * (result.test_metric - best['test_metric']):+.2f} points")
    lines.append(f"trainable parameters: {result.trainable_parameters:,d} of {result.total_parameters:,d} "
                 f"({result.trainable_percent:.4f}%)")
    if result.step_memory:
        lines.append(f"peak training memory (one step, {result.step_memory['source']}): "
                     f"{result.step_memory['peak_bytes'] / 2**20:,.1f} MiB")
    lines.append(f"peak process memory ({result.peak_memory_source}): {result.peak_memory_bytes / 2**20:,.1f} MiB")
    lines.append(time_line(result))
    lines.append(f"run saved in {result.output_dir} (best/ loads with leantune.load; `leantune eval "
                 f"{result.output_dir}`)")
    return "\n".join(lines)


PHASE_NAMES = {"load_and_init": "start-up, loading and initialisation", "set_up": "set-up", "evaluate": "evaluation",
               "checkpoint": "checkpoints", "measure_memory": "memory measurement"}


def time_line(result: Any) -> str:
    """``time: 245.3 s in all (loading and initialisation 12.0 s, training 200.1 s: 200 steps at 1.000 s/step,
    ...)``; a resumed run counts only the steps it trained itself, and one with none left says so."""
    phases = result.phase_seconds
    if result.steps_run == 0:
        training = f"no step left to train (the run had finished its {result.steps} steps)"
    else:
        resumed = "" if result.steps_run == result.steps else (
            f" of {result.steps} (resumed at step {result.steps - result.steps_run})")
        training = (f"training {result.train_seconds:.1f} s: {result.steps_run} steps{resumed} at "
                    f"{result.seconds_per_step:.3f} s/step")
    parts = [f"{PHASE_NAMES[name]} {phases[name]:.1f} s" for name in ("load_and_init", "set_up") if name in phases]
    parts.append(training)
    parts += [f"{PHASE_NAMES[name]} {phases[name]:.1f} s" for name in ("evaluate", "checkpoint", "measure_memory")
              if name in phases]
    return f"time: {result.wall_seconds:.1f} s in all ({', '.join(parts)})"
