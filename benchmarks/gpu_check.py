"""GPU figures in one run (``make gpu-check``): at most 8 minutes on one H100/H200.

Parts, each with its own deadline (rows left when it passes are skipped, with the reason recorded):

``memory_fp32``  the README memory table at the LST paper's setting (T5-base architecture, random weights, batch
                 100, source 128, target 3, fp32, AdamW, eager attention): peak ``torch.cuda.max_memory_allocated``
                 of a warm training step, and the step time from CUDA events, for full, adapter, LoRA, BitFit,
                 prompt, LST and LST with a bf16 backbone (the rows of ``leantune bench memory``)
``memory_bf16``  the same rows under bf16 autocast
``fish``         FISH (sparse, keep 0.5%) against full fine-tuning at the same setting: memory and step time
``fisher``       Fisher scores of every parameter of all-MiniLM-L6-v2 (3-class head) from 256 tweets: the per-example
                 loop against the vectorised pass (``leantune.fisher``), seconds and agreement
``embedded``     N steps of the embedded default (all-MiniLM-L6-v2 + LST on the tweets, ``leantune.train`` with
                 the embedded default's settings cut to N steps) under bf16 autocast

Writes ``<out>/<part>.json`` and ``<out>/summary.json`` (the GPU's name, torch and transformers versions, the
command) and prints a table per part. ``--smoke`` runs every part on tiny sizes (t5-tiny, batch 2, 2 steps, a tiny
random BERT) on the CPU: the test suite runs it so that this script cannot rot.

    python benchmarks/gpu_check.py                    # on a GPU machine: benchmarks/results/gpu/*.json
    python benchmarks/gpu_check.py --smoke --out DIR  # anywhere, in seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leantune.commands.bench import PAPER_MEMORY_GB, VARIANTS, T5Setting, build_training, cannot_run, resolve_row
from leantune.files import write_atomic_text
from leantune.memory import measure_peak_training_memory

RESULTS = Path(__file__).resolve().parent / "results" / "gpu"
MEMORY_ROWS = ("full", "adapter", "lora", "bitfit", "prompt", "lst", "lst-bf16")
FISH_ROWS = ("full", "fish")
PART_BUDGET_S = {"memory_fp32": 130, "memory_bf16": 100, "fish": 70, "fisher": 60, "embedded": 90}
TOTAL_BUDGET_S = 450  # of the 8 minutes; the rest is start-up and writing


@dataclass(frozen=True)
class Sizes:
    """What one run measures: the T5 setting and batch of the memory parts, steps, the embedded run's sizes."""

    setting: T5Setting
    batch_size: int
    timed_steps: int
    train_steps: int
    text_model: str
    embedded_train: dict[str, Any]
    fisher_examples: int
    fisher_batch_size: int | None


def full_sizes(train_steps: int) -> Sizes:
    return Sizes(T5Setting("t5-base", 128, 3, "eager", 0), 100, 5, train_steps, "all-MiniLM-L6-v2", {}, 256, None)


def smoke_sizes(tiny_model: str) -> Sizes:
    train = {"train_examples": 16, "validation_examples": 8, "test_examples": 8, "batch_size": 2,
             "eval_batch_size": 8, "max_length": 16}
    return Sizes(T5Setting("t5-tiny", 12, 2, "eager", 0), 2, 2, 2, tiny_model, train, 8, 4)


@dataclass
class Part:
    """One part's result: rows of numbers, rows skipped (with the reason), the seconds it took."""

    name: str
    setting: dict[str, Any]
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self, environment: dict[str, Any]) -> dict[str, Any]:
        return {"part": self.name, "environment": environment, "setting": self.setting, "rows": self.rows,
                "skipped": self.skipped, "seconds": self.seconds}


# --- measuring one training step -----------------------------------------------------------------------------
def step_times_ms(step: Callable[[], Any], device: torch.device, steps: int) -> list[float]:
    """Milliseconds of each of ``steps`` steps: CUDA events on a GPU, the wall clock on a CPU."""
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            step()
            times.append(1000 * (time.perf_counter() - begin))
    return times


def with_autocast(step: Callable[[], Any], device: torch.device, precision: str) -> Callable[[], Any]:
    """``step`` under bf16 autocast (``precision`` bf16), or as it is (fp32)."""
    if precision == "fp32":
        return step

    def autocast_step() -> Any:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return step()

    return autocast_step


def measure_row(name: str, sizes: Sizes, device: torch.device, precision: str) -> dict[str, Any]:
    """Peak memory of a warm step (after one untimed step), then the median of the timed steps after it."""
    row = resolve_row(name)
    (step, model, optimizer), trainable, total = build_training(row, sizes.setting, device,
                                                                row.micro_batch(sizes.batch_size))
    step = with_autocast(step, device, precision)
    try:
        memory = measure_peak_training_memory(step, model, optimizer, warmup_steps=1)
        times = step_times_ms(step, device, sizes.timed_steps)
    finally:
        del step, model, optimizer
        release(device)
    return {"micro_batch_size": row.micro_batch(sizes.batch_size), "trainable_params": trainable,
            "total_params": total, "peak_bytes": memory["peak_bytes"], "peak_gib": memory["peak_gib"],
            "step_ms_median": statistics.median(times), "step_ms_min": min(times), "step_ms_max": max(times)}


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the parts ------------------------------------------------------------------------------------------------------
def run_rows(part: Part, names: tuple[str, ...], sizes: Sizes, device: torch.device, precision: str,
             deadline: float) -> None:
    """Measure each row until ``deadline``; rows that cannot run on T5 or come too late are skipped."""
    for name in names:
        if time.monotonic() > deadline:
            part.skipped[name] = "the part's deadline passed before this row started"
            continue
        reason = cannot_run(resolve_row(name), sizes.setting)
        if reason is not None:
            part.skipped[name] = reason
            continue
        try:
            part.rows[name] = measure_row(name, sizes, device, precision)
        except torch.OutOfMemoryError as err:
            release(device)
            part.skipped[name] = f"out of memory: {str(err).splitlines()[0]}"
        print(f"  {part.name} {name}: done" if name in part.rows else f"  {part.name} {name}: skipped",
              file=sys.stderr, flush=True)
    full = part.rows.get("full")
    for name, row in part.rows.items():
        if full is not None:
            row["percent_of_full"] = 100 * row["peak_bytes"] / full["peak_bytes"]
            row["step_time_x_full"] = row["step_ms_median"] / full["step_ms_median"]
        paper = VARIANTS[name].paper_row if name in VARIANTS else None
        if paper is not None:
            row["paper_percent_of_full"] = 100 * PAPER_MEMORY_GB[paper] / PAPER_MEMORY_GB["full"]


def memory_part(precision: str) -> Callable[[Sizes, torch.device, float], Part]:
    def run(sizes: Sizes, device: torch.device, deadline: float) -> Part:
        part = Part(f"memory_{precision}", {**t5_setting(sizes), "precision": precision})
        run_rows(part, MEMORY_ROWS, sizes, device, precision, deadline)
        return part

    return run


def fish_part(sizes: Sizes, device: torch.device, deadline: float) -> Part:
    part = Part("fish", {**t5_setting(sizes), "precision": "fp32", "fish": "default options: keep 0.5%, sparse"})
    run_rows(part, FISH_ROWS, sizes, device, "fp32", deadline)
    return part


def embedded_part(sizes: Sizes, device: torch.device, deadline: float) -> Part:
    """The embedded default (``leantune train`` with no arguments) cut to ``train_steps`` steps, bf16 autocast."""
    import leantune
    from leantune.train.run import DEFAULT_TRAIN_SETTINGS, RunSpec, build

    train = {**DEFAULT_TRAIN_SETTINGS, **sizes.embedded_train, "max_steps": sizes.train_steps, "precision": "bf16",
             "progress": False}
    spec = RunSpec(model=sizes.text_model, method="lst", options=dict(leantune.get_method("lst").budget_options),
                   train=train)
    part = Part("embedded", {"model": sizes.text_model, "method": "lst", "options": spec.options,
                             "train": train})
    start = time.perf_counter()
    tuned, tokenizer, tasks, config = build(spec)
    load_seconds = time.perf_counter() - start
    result = leantune.train(tuned, tasks, tokenizer, config)
    step_memory = result.step_memory or {}
    part.rows["lst"] = {
        "steps": result.steps, "seconds_per_step": result.seconds_per_step, "train_seconds": result.train_seconds,
        "load_and_init_seconds": load_seconds, "wall_seconds": time.perf_counter() - start,
        "peak_memory_bytes": result.peak_memory_bytes, "step_peak_bytes": step_memory.get("peak_bytes"),
        "trainable_params": result.trainable_parameters, f"test_{result.metric}": result.test_metric,
    }
    del tuned
    release(device)
    return part


def fisher_part(sizes: Sizes, device: torch.device, deadline: float) -> Part:
    """Seconds of ``fisher_scores`` over every parameter: one backward per example, then vectorised."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from leantune.fisher import fisher_scores
    from leantune.tasks import get_task
    from leantune.train.data import Encoder
    from leantune.train.run import model_path

    path = model_path(sizes.text_model)
    task = get_task("tweets")
    examples = task.splits["train"][:sizes.fisher_examples]
    encoder = Encoder(task, AutoTokenizer.from_pretrained(path), False, 64, 16)
    batches = [encoder.batch(examples[i:i + 8]) for i in range(0, len(examples), 8)]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=task.num_labels).to(device)
    params = dict(model.named_parameters())
    part = Part("fisher", {"model": sizes.text_model, "examples": len(examples), "max_length": 64,
                           "parameters": sum(p.numel() for p in params.values())})
    scores = {}
    for name, batch_size in (("loop", 1), ("vectorised", sizes.fisher_batch_size)):
        if time.monotonic() > deadline:
            part.skipped[name] = "the part's deadline passed before this row started"
            continue
        start = time.perf_counter()
        scores[name] = fisher_scores(model, params, batches, len(examples), batch_size=batch_size, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        part.rows[name] = {"seconds": seconds, "examples_per_second": len(examples) / seconds}
    if len(scores) == 2:
        scale = max(float(v.abs().max()) for v in scores["loop"].values())
        difference = max(float((scores["vectorised"][k] - v).abs().max()) for k, v in scores["loop"].items())
        part.setting["max_difference_over_largest_score"] = difference / scale
    del model, scores
    release(device)
    return part


PARTS: dict[str, Callable[[Sizes, torch.device, float], Part]] = {
    "memory_fp32": memory_part("fp32"), "memory_bf16": memory_part("bf16"), "fish": fish_part,
    "fisher": fisher_part, "embedded": embedded_part,
}


def t5_setting(sizes: Sizes) -> dict[str, Any]:
    s = sizes.setting
    return {"model": s.model, "weights": "random", "batch_size": sizes.batch_size, "source_length": s.source_length,
            "target_length": s.target_length, "attention": s.attention, "optimizer": "AdamW",
            "timed_steps": sizes.timed_steps}


# --- running, writing, printing -------------------------------------------------------------------------------------
def environment(device: torch.device, smoke: bool) -> dict[str, Any]:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'cpu'})"
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "smoke": smoke, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def run_parts(names: list[str], sizes: Sizes, device: torch.device, total_budget_s: float) -> list[Part]:
    """Every part in turn, each until its own deadline (its budget, and never past the total budget)."""
    end = time.monotonic() + total_budget_s
    parts = []
    for name in names:
        start = time.monotonic()
        if start >= end:
            parts.append(Part(name, {}, skipped={"*": "the total time budget was spent before this part"}))
            continue
        part = PARTS[name](sizes, device, min(end, start + PART_BUDGET_S[name]))
        part.seconds = time.monotonic() - start
        parts.append(part)
    return parts


def write(parts: list[Part], out: Path, env: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for part in parts:
        write_atomic_text(out / f"{part.name}.json", json.dumps(part.to_dict(env), indent=2) + "\n")
    summary = {"environment": env, "parts": {p.name: p.to_dict(env) for p in parts}}
    write_atomic_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")


def format_part(part: Part) -> str:
    lines = [f"{part.name} ({part.seconds:.0f} s): " + ", ".join(f"{k} {v}" for k, v in part.setting.items()
                                                                  if not isinstance(v, dict))]
    if part.name in ("embedded", "fisher"):
        for name, row in part.rows.items():
            lines.append(f"  {name}: " + ", ".join(f"{k} {_number(v)}" for k, v in row.items()))
    else:
        lines.append(f"  {'method':<10} {'trainable':>12} {'peak GiB':>9} {'% full':>7} {'paper %':>8} "
                     f"{'step ms':>9} {'x full':>7}")
        for name, row in part.rows.items():
            percent, paper = row.get("percent_of_full"), row.get("paper_percent_of_full")
            lines.append(f"  {name:<10} {row['trainable_params']:>12,d} {row['peak_gib']:>9.3f} "
                         f"{_number(percent, 7, 1)} {_number(paper, 8, 1)} {row['step_ms_median']:>9.1f} "
                         f"{_number(row.get('step_time_x_full'), 7, 2)}")
    lines += [f"  {name}: skipped ({reason})" for name, reason in part.skipped.items()]
    return "\n".join(lines)


def _number(value: Any, width: int = 0, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:>{width}.{digits}f}"
    return f"{'' if value is None else value:>{width}}"


def tiny_bert(path: Path) -> str:
    """A tiny random BERT encoder with a byte-level tokenizer, saved like a hub model (for ``--smoke``)."""
    import transformers as hf

    torch.manual_seed(0)
    config = hf.BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    hf.BertModel(config).save_pretrained(path)
    hf.ByT5Tokenizer().save_pretrained(path)
    return str(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes on the CPU (seconds): checks the script.")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"Folder for the JSON files (None: {RESULTS}; with --smoke a temporary folder).")
    parser.add_argument("--device", default=None, help="Device (None: cuda; with --smoke cpu).")
    parser.add_argument("--parts", default=",".join(PARTS), help="Comma-separated parts to run.")
    parser.add_argument("--train-steps", type=int, default=50, help="Steps of the embedded default (not --smoke).")
    parser.add_argument("--tiny-model", default=None,
                        help="--smoke: a tiny model folder for the embedded part (None: one is made).")
    parser.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="Total time budget of the parts.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or args.train_steps < 1:
        print(f"gpu_check: unknown parts {unknown} (parts: {', '.join(PARTS)})" if unknown else
              "gpu_check: --train-steps must be >= 1", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine, or use --smoke", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            sizes = smoke_sizes(args.tiny_model or tiny_bert(Path(scratch) / "tiny-bert"))
            out = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-smoke-"))
            torch.set_num_threads(1)  # tiny tensors: threads only contend
        else:
            sizes, out = full_sizes(args.train_steps), args.out or RESULTS
        env = environment(device, args.smoke)
        try:
            parts = run_parts(names, sizes, device, args.budget_s)
        finally:
            torch.set_num_threads(threads)
    write(parts, out, env)
    print(f"{env['device_name']}, torch {env['torch']}, transformers {env['transformers']}")
    for part in parts:
        print(format_part(part))
    print(f"wrote {out}/*.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
