"""``leantune compare``: train several methods on the same data with the same budget; one table, JSON and plot.

Each method runs as its own ``leantune train`` process (so its process memory is its own) in
``OUTPUT_DIR/<method>``; any registered method can be compared, plugins included (the sub-processes find a
plugin method through ``LEANTUNE_PLUGINS``, which is extended with the module of every plugin method compared).
The table reports the test metric at the best validation step (several tasks: their average, then each task's
test metric), the trainable share, the peak tensor memory of one training step (``leantune.memory``), seconds
per step and wall time (loading and initialisation included). For classification, rows for the baselines follow
(majority class, logistic regression on the frozen model's features, TF-IDF + logistic regression for text;
``--no-baselines``: none), scored once on the same splits (``OUTPUT_DIR/baselines.json``).
With ``--seeds 0,1,2`` every method runs once per seed (in ``OUTPUT_DIR/<method>-seed<N>``) and the table gives
the mean ± standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leantune.commands.train import add_run_arguments, parse_assignments, spec_from_args
from leantune.errors import ConfigError, LeantuneError
from leantune.files import write_atomic_bytes, write_atomic_text
from leantune.registry import PLUGINS_VARIABLE, get_method, is_builtin, plugin_module_names

if TYPE_CHECKING:
    from leantune.train.run import RunSpec

DEFAULT_METHODS = "full,bitfit,lora,adapter,lst,fish"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compare", help="Train several methods on the same data; print a table, write "
                                   "JSON and a metric-vs-memory plot.", description=__doc__)
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"Comma-separated registered method names, "
                        f"plugins included (default: {DEFAULT_METHODS}).")
    parser.add_argument("--set", action="append", metavar="METHOD.KEY=VALUE",
                        help="An option of one method, e.g. --set lst.reduction_factor=4.")
    parser.add_argument("--seeds", metavar="N,N,...", help="Run every method once per seed (comma-separated, "
                        "e.g. 0,1,2) and report the mean ± standard deviation (default: the one --seed).")
    add_run_arguments(parser)
    parser.add_argument("--output-dir", help="Folder of the comparison: one run folder per method, compare.json, "
                        "compare.txt, compare.png (default: runs/compare-<time>).")
    parser.set_defaults(func=run)


def method_options(assignments: dict[str, Any], methods: list[str]) -> dict[str, dict[str, Any]]:
    options: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for key, value in assignments.items():
        method, sep, option = key.partition(".")
        if not sep or method not in options:
            raise ConfigError(f"--set {key}=...: compare options are METHOD.KEY=VALUE with METHOD one of "
                              f"{', '.join(methods)}")
        options[method][option] = value
    return options


def parse_seeds(text: str | None) -> list[int] | None:
    """``--seeds 0,1,2`` as a list of distinct integers (None when not given)."""
    if text is None:
        return None
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds takes distinct non-negative integers, e.g. 0,1,2; got {text!r}")
    return seeds


def child_environment(methods: list[str]) -> dict[str, str]:
    """The environment of the ``leantune train`` sub-processes: this one, with ``LEANTUNE_PLUGINS`` naming the
    module of every plugin method compared and ``PYTHONPATH`` the folder it was imported from, so a method
    registered here by importing its module is found there too."""
    environment = dict(os.environ)
    modules = plugin_module_names()
    search_path = [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    for method in methods:
        if is_builtin(method):
            continue
        module = get_method(method).__module__
        if module == "__main__":
            raise ConfigError(f"method {method!r} is defined in the __main__ script; leantune compare runs each "
                              "method in its own process, which cannot import it: move it into a module")
        if module not in modules:
            modules.append(module)
        root = import_root(module)
        if root is not None and root not in search_path:
            search_path.append(root)
    if modules:
        environment[PLUGINS_VARIABLE] = ",".join(modules)
    if search_path:
        environment["PYTHONPATH"] = os.pathsep.join(search_path)
    return environment


def import_root(module_name: str) -> str | None:
    """The ``sys.path`` folder the imported module ``module_name`` was found in (None for a built-in module)."""
    file = getattr(sys.modules.get(module_name), "__file__", None)
    if file is None:
        return None
    path = Path(file).resolve()
    depth = module_name.count(".") + (path.stem == "__init__")
    return str(path.parents[depth])


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import leantune
    from leantune.baselines import BASELINES_NAME, report_baselines
    from leantune.train.loop import phase
    from leantune.train.run import options_with_tasks, pinned

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods is empty")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods names a method twice: {args.methods}")
    options = method_options(parse_assignments(args.set, "--set"), methods)
    specs = {}
    for method in methods:
        spec = spec_from_args(args, method)
        spec = pinned(dataclasses.replace(spec, options={**spec.options, **options[method]}))
        if spec.train.get("cache_ladders") and method != "lst":  # an LST-only option: the others run without it
            spec.train = {**spec.train, "cache_ladders": False}
        # unknown method or option: fail before training anything
        leantune.make_config(method, **options_with_tasks(spec, spec.task_names()))
        specs[method] = spec
    out = Path(args.output_dir) if args.output_dir else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    environment = child_environment(methods)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(specs.values()))
    baselines = None
    if args.baselines:
        show = first.train_config().progress
        with phase("baselines (majority class, frozen features, TF-IDF), shared by every method", show):
            baselines = report_baselines(first, out / BASELINES_NAME, progress=show)
        print("\n".join(baselines.lines()), flush=True)
    seeds = parse_seeds(args.seeds)
    rows = []
    for method, spec in specs.items():
        if seeds is None:
            rows.append(train_one(method, spec, out / method, environment))
            continue
        results = [train_one(method, dataclasses.replace(spec, train={**spec.train, "seed": seed}),
                             out / f"{method}-seed{seed}", environment) for seed in seeds]
        failed = next((r for r in results if "error" in r), None)
        rows.append(failed or over_seeds(results, seeds))
    import torch

    report = {"model": first.model, "task": first.tasks or first.data or first.task, "train": first.train,
              "torch_threads": torch.get_num_threads(), "rows": rows + (baselines.rows if baselines else []),
              "baselines_not_applicable": baselines.not_applicable if baselines else None}
    write_atomic_text(out / "compare.json", json.dumps(report, indent=2) + "\n")
    table = format_table(report["rows"])
    write_atomic_text(out / "compare.txt", table + "\n")
    print(table)
    plotted = [r for r in rows if "error" not in r]
    if plotted:
        plot(plotted + (baselines.rows if baselines else []), out / "compare.png",
             f"{Path(first.model).name}, {run_title(first)}")
    print(f"wrote {out / 'compare.json'}, {out / 'compare.txt'}" + (f", {out / 'compare.png'}" if plotted else ""))
    if len(plotted) < len(rows):
        raise LeantuneError(f"{len(rows) - len(plotted)} method(s) failed: "
                            + ", ".join(r["method"] for r in rows if "error" in r))
    return 0


def train_one(method: str, spec: RunSpec, run_dir: Path, environment: dict[str, str]) -> dict[str, Any]:
    """One ``leantune train`` process for ``spec`` in ``run_dir`` (reused when finished with the same settings,
    resumed when stopped); its ``results.json`` as a table row, or the row of an error."""
    config_path = run_dir.with_name(f"{run_dir.name}.json")
    write_atomic_text(config_path, json.dumps(spec.to_dict(), indent=2) + "\n")
    set_aside_if_stale(run_dir, spec)
    command = [sys.executable, "-m", "leantune", "train", "--config", str(config_path), "--output-dir",
               str(run_dir), "--no-baselines"]
    if (run_dir / "run.json").is_file() and not (run_dir / "results.json").is_file():
        command.append("--resume")
    if not (run_dir / "results.json").is_file():
        print(f"== {run_dir.name}: {' '.join(command)}", flush=True)
        finished = subprocess.run(command, env=environment)
        if finished.returncode != 0:
            return {"method": method, "error": f"leantune train exited with {finished.returncode}"}
    return {"method": method, **json.loads((run_dir / "results.json").read_text())}


def over_seeds(results: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """One table row from a method's runs with several seeds: metrics as mean (``*_std``: sample standard
    deviation), per-seed test metrics in ``seed_test_metrics``, costs as the mean (peak memory: the largest)."""
    def spread(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    first = results[0]
    test, test_std = spread([r["test_metric"] for r in results])
    validation, validation_std = spread([r["validation_metric"] for r in results])
    per_step = [r["seconds_per_step"] for r in results if r.get("seconds_per_step") is not None]
    task_metrics = {name: {**entry, **{split: statistics.mean(r["task_metrics"][name][split] for r in results)
                                       for split in ("validation", "test")}}
                    for name, entry in (first.get("task_metrics") or {}).items()}
    return {**{key: value for key, value in first.items() if key not in ("history", "output_dir", "best_step",
                                                                         "best_epoch")},
            "seeds": seeds, "test_metric": test, "test_std": test_std, "validation_metric": validation,
            "validation_std": validation_std, "seed_test_metrics": [r["test_metric"] for r in results],
            "seconds_per_step": statistics.mean(per_step) if per_step else None,
            "wall_seconds": statistics.mean(r["wall_seconds"] for r in results),
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in results),
            "step_memory": next((r["step_memory"] for r in results if r.get("step_memory")), None),
            "task_metrics": task_metrics, "output_dirs": [r["output_dir"] for r in results]}


def set_aside_if_stale(run_dir: Path, spec: RunSpec) -> None:
    """Move a run in ``run_dir`` whose saved settings differ from ``spec`` to ``<run_dir>.previous-<n>`` (the
    first free n), printing one line with the settings that differ, so the method is rerun from scratch."""
    from leantune.train.run import RUN_NAME, RunSpec, describe_differences, spec_differences

    if not (run_dir / RUN_NAME).is_file():
        return
    try:
        differences = describe_differences(spec_differences(RunSpec.read(run_dir), spec))
    except LeantuneError as err:
        differences = f"its run.json cannot be used ({err})"
    if not differences:
        return
    number = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.previous-{number}")).exists():
        number += 1
    run_dir.rename(aside)
    print(f"== {run_dir.name}: rerunning, the run in {run_dir} has other settings ({differences}); moved it to "
          f"{aside}", flush=True)


def run_title(spec: RunSpec) -> str:
    """What the runs trained on, for the plot: each task's name, with its data file's name when it has one
    (``reviews.csv``, ``vqa (vqa.csv)``)."""
    names = []
    for entry, name in zip(spec.task_entries(), spec.task_names()):
        file = Path(entry.data).name if entry.data else None
        names.append(name if file is None else file if Path(file).stem == name else f"{name} ({file})")
    return " + ".join(names)


def step_memory_mib(row: dict[str, Any]) -> float:
    memory = row.get("step_memory") or {}
    return memory.get("peak_bytes", row["peak_memory_bytes"]) / 2**20


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per method; with several tasks, a column of test metric per task after the average. Baseline rows
    (``"baseline": True``) follow under their own heading, with only their metric and time."""
    metric = next((r["metric"] for r in rows if "metric" in r), "metric")
    width = max([10, *(len(r["method"]) for r in rows)])
    tasks = list(next((r["task_metrics"] for r in rows if len(r.get("task_metrics") or {}) > 1), {}))
    header = (f"{'method':<{width}} {'test ' + metric:>22} {'val':>7}"
              + "".join(f" {name[:12]:>12}" for name in tasks)
              + f" {'trainable%':>10} {'peak step MiB':>13} {'max RSS MiB':>11} {'s/step':>7} {'wall s':>7}")
    lines = [header, "-" * len(header)]
    baselines = [r for r in rows if r.get("baseline")]
    for r in rows:
        if r.get("baseline"):
            continue
        if "error" in r:
            lines.append(f"{r['method']:<{width}} {r['error']}")
            continue
        per_task = "".join(f" {r['task_metrics'][name]['test']:>12.4f}" for name in tasks)
        per_step = r.get("seconds_per_step")
        test = f"{r['test_metric']:.4f}" + (f" ± {r['test_std']:.4f}" if "test_std" in r else "")
        lines.append(f"{r['method']:<{width}} {test:>22} {r['validation_metric']:>7.4f}{per_task} "
                     f"{r['trainable_percent']:>10.4f} {step_memory_mib(r):>13,.1f} "
                     f"{r['peak_memory_bytes'] / 2**20:>11,.0f} {'-' if per_step is None else f'{per_step:.3f}':>7} "
                     f"{r['wall_seconds']:>7.0f}")
    if baselines:
        lines.append("baselines (no fine-tuning, same splits; docs/baselines.md):")
    for r in baselines:
        per_task = "".join(f" {r['task_metrics'][name]['test']:>12.4f}" for name in tasks)
        lines.append(f"{r['method']:<{width}} {r['test_metric']:>22.4f} {'-':>7}{per_task} {'-':>10} {'-':>13} "
                     f"{'-':>11} {'-':>7} {r['wall_seconds']:>7.0f}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Test metric against peak training memory, one labelled point per method (like LST's Figure 1); each
    baseline, which trains nothing, is a dashed horizontal line at its metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.2), dpi=120)
    methods = [r for r in rows if not r.get("baseline")]
    for r in methods:
        x, y = step_memory_mib(r), 100 * r["test_metric"]
        axes.scatter([x], [y], s=40 + 400 * r["trainable_percent"] / 100)
        if "test_std" in r:
            axes.errorbar([x], [y], yerr=[100 * r["test_std"]], color="black", capsize=3, linewidth=0.8)
        axes.annotate(f"{r['method']} ({r['trainable_percent']:.2f}%)", (x, y), textcoords="offset points",
                      xytext=(6, 4), fontsize=9)
    for r in rows:
        if r.get("baseline"):
            axes.axhline(100 * r["test_metric"], color="grey", linestyle="--", linewidth=0.8)
            axes.annotate(f"baseline: {r['label']}", (0.01, 100 * r["test_metric"]),
                          xycoords=("axes fraction", "data"), xytext=(0, 2), textcoords="offset points", fontsize=7,
                          color="grey")
    axes.set_xlabel("peak training memory of one step (MiB)")
    axes.set_ylabel(f"test {methods[0]['metric']} (x100)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.margins(x=0.2, y=0.1)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    write_atomic_bytes(path, buffer.getvalue())
