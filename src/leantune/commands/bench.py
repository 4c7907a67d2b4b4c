"""``leantune bench memory`` and ``leantune bench speed``: peak training memory and seconds per step per method.

``bench memory`` reproduces the memory column of Table 1 of the LST paper (Sung et al. 2022): T5-base
architecture with random weights, batch 100, source length 128, target length 3, fp32, AdamW, one row per
method in the paper's settings, plus peft's LoRA on the same setting. ``bench speed`` times training steps of
full fine-tuning, LoRA and LST on a model small enough for a CPU, interleaving the methods round by round.
``--methods`` takes those rows or the name of any registered method (plugins included), run with its default
options; a row whose method cannot attach to T5 (its ``unsupported_reason``) is skipped from the default list and
refused when named.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import leantune
from leantune.errors import ConfigError, LeantuneError, UnsupportedMethodError
from leantune.files import write_atomic

if TYPE_CHECKING:  # torch, transformers and leantune's model code load when a benchmark runs, not for --help
    import torch
    from torch import nn

    from leantune.config import MethodConfig
    from leantune.memory import TrainingSetup

# T5 architectures with random weights: t5-base and t5-small have the released checkpoints' dimensions.
T5_SIZES: dict[str, dict[str, int]] = {
    "t5-base": {"d_model": 768, "d_ff": 3072, "num_layers": 12, "num_heads": 12, "d_kv": 64, "vocab_size": 32128},
    "t5-small": {"d_model": 512, "d_ff": 2048, "num_layers": 6, "num_heads": 8, "d_kv": 64, "vocab_size": 32128},
    "t5-tiny": {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16, "vocab_size": 256},
}

# Table 1 / Fig. 1 of the LST paper, T5-base, GLUE, batch 100: training memory in GB, as read from the paper.
PAPER_MEMORY_GB = {"full": 17.6, "adapter": 13.0, "lora": 12.7, "bitfit": 10.7, "prompt": 11.6, "lst": 5.5}

LEARNING_RATE = 3e-4  # the paper's rate for the baselines; memory and step time do not depend on it


@dataclass(frozen=True)
class Variant:
    """One benchmark row: a method in the paper's setting. ``config`` builds the leantune config for a model
    with ``num_layers`` blocks per stack; ``uses_peft`` rows wrap the model with peft instead. A row with
    ``accumulation`` > 1 runs micro-batches of batch / accumulation examples (gradient accumulation), as the
    paper did for prompt tuning; its peak is that of one micro-batch step."""

    name: str
    description: str
    config: Callable[[int], MethodConfig] | None = None
    uses_peft: bool = False
    paper_row: str | None = None
    accumulation: int = 1

    def micro_batch(self, batch_size: int) -> int:
        return max(1, batch_size // self.accumulation)


def lst_side_layers(num_layers: int) -> list[int]:
    """The paper's 9 of 12 side layers ([1, 2, 3, 5, 6, 7, 9, 10, 11]): every block whose index is not a
    multiple of 4. Other depths drop the same pattern."""
    return [i for i in range(num_layers) if i % 4 != 0]


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("full", "full fine-tuning", lambda n: leantune.make_config("full"), paper_row="full"),
        Variant(
            "adapter", "adapters, reduction 16, norms trained",
            lambda n: leantune.make_config("adapter", reduction_factor=16, train_norms=True), paper_row="adapter",
        ),
        Variant(
            "lora", "LoRA r=32 on q,v, biases trained",
            lambda n: leantune.make_config("lora", r=32, alpha=32, train_biases=True), paper_row="lora",
        ),
        Variant("peft-lora", "peft LoRA r=32 on q,v, bias='all' (reference)", uses_peft=True),
        Variant("bitfit", "BitFit (zero biases added to T5)", lambda n: leantune.make_config("bitfit"),
                paper_row="bitfit"),
        Variant("prompt", "prompt tuning, 100 tokens, batch as 2 accumulated halves",
                lambda n: leantune.make_config("prompt", num_tokens=100), paper_row="prompt", accumulation=2),
        Variant(
            "lst", "LST r=8, side layers [i % 4 != 0]",
            lambda n: leantune.make_config("lst", reduction_factor=8, side_layers=lst_side_layers(n), init="random"),
            paper_row="lst",
        ),
        Variant(
            "lst-bf16", "LST r=8, side layers [i % 4 != 0], bf16 backbone",
            lambda n: leantune.make_config(
                "lst", reduction_factor=8, side_layers=lst_side_layers(n), init="random", backbone_dtype="bfloat16"
            ),
        ),
    )
}
MEMORY_DEFAULT = "full,adapter,lora,peft-lora,bitfit,prompt,lst,lst-bf16"
SPEED_DEFAULT = "full,lora,lst"


MEMORY_DESCRIPTION = """Peak training memory of one AdamW step per method: every live tensor (parameters,
gradients, optimizer state, activations, temporaries), what torch.cuda.max_memory_allocated counts. The defaults
are the LST paper's Table 1 setting: T5-base architecture with random weights, batch 100, source 128 and target 3
tokens, fp32, eager attention, one row per method in the paper's options. --mode estimate runs the step on fake
tensors (seconds, no memory used); --mode measure runs it for real on --device."""

SPEED_DESCRIPTION = """Seconds per training step (forward, backward, AdamW step) per method on random T5 weights and
inputs. The methods take turns within each round (who goes first rotates), and the median over --rounds timed
rounds is reported, after --warmup untimed ones."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="Benchmarks: peak training memory and training-step time.",
                                   description=__doc__)
    bench = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)

    memory = bench.add_parser(
        "memory", help="Peak training memory per method (the LST paper's Table 1 setting by default).",
        description=MEMORY_DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_common_options(memory, model="t5-base", batch=100, methods=MEMORY_DEFAULT)
    memory.add_argument(
        "--mode", choices=("estimate", "measure"), default="estimate",
        help="estimate = run the step on fake tensors (seconds, no memory used); measure = run it for real "
             "(CPU: torch's memory tracker; CUDA: max_memory_allocated).",
    )
    memory.add_argument("--device", default="cpu", help="Device for --mode measure: cpu or cuda[:N].")
    memory.set_defaults(func=run_memory)

    speed = bench.add_parser("speed", help="Seconds per training step per method, interleaved rounds, median.",
                             description=SPEED_DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_common_options(speed, model="t5-small", batch=16, methods=SPEED_DEFAULT)
    speed.add_argument("--rounds", type=int, default=5, help="Timed rounds; each round runs one step per method.")
    speed.add_argument("--warmup", type=int, default=1, help="Untimed rounds first.")
    speed.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (None: unchanged).")
    speed.add_argument("--device", default="cpu", help="cpu or cuda[:N].")
    speed.set_defaults(func=run_speed)


def _add_common_options(parser: argparse.ArgumentParser, model: str, batch: int, methods: str) -> None:
    """Options of both benchmarks; the parser's formatter appends every default to its help."""
    parser.add_argument("--model", choices=tuple(T5_SIZES), default=model,
                        help="T5 architecture, random weights.")
    parser.add_argument("--methods", default=methods, help=f"Comma-separated rows: the paper's settings "
                        f"{', '.join(VARIANTS)}, or any registered method name (its default options). Full "
                        "fine-tuning is always run: it is the baseline.")
    parser.add_argument("--batch-size", type=int, default=batch, help="Examples per step.")
    parser.add_argument("--source-length", type=int, default=128, help="Encoder tokens per example.")
    parser.add_argument("--target-length", type=int, default=3, help="Decoder tokens per example.")
    parser.add_argument(
        "--attention", choices=("eager", "sdpa"), default="eager",
        help="Attention kernel of the T5 model: eager keeps every softmax map for backward (as the paper's "
             "transformers 4.6 did); sdpa uses torch's fused attention.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for the random weights and inputs.")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON instead of a table.")
    parser.add_argument("--out", type=Path, default=None,
                        help="Also write <out>/<name>.json and <out>/<name>.png (a bar chart).")
    parser.add_argument("--name", default=None, help="File stem for --out (None: derived from the setting).")


# --- building one training setup ------------------------------------------------------------------------------
def resolve_row(name: str) -> Variant:
    """The row ``name``: one of the paper's settings (:data:`VARIANTS`), else a registered method with its
    default options, so a new method is benchmarked without editing this file."""
    if name in VARIANTS:
        return VARIANTS[name]
    if name in leantune.methods():
        return Variant(name, f"{name}, default options", lambda n: leantune.make_config(name))
    raise ConfigError(f"--methods: unknown row or method {name!r}; rows: {', '.join(VARIANTS)}; registered "
                      f"methods: {', '.join(leantune.methods())}")


@dataclass(frozen=True)
class T5Setting:
    """The benchmarked model and inputs: a T5 architecture with random weights, random tokens."""

    model: str = "t5-base"
    source_length: int = 128
    target_length: int = 3
    attention: str = "eager"
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> T5Setting:
        return cls(args.model, args.source_length, args.target_length, args.attention, args.seed)

    @property
    def num_layers(self) -> int:
        return T5_SIZES[self.model]["num_layers"]

    def config(self) -> Any:
        from transformers import T5Config

        return T5Config(**T5_SIZES[self.model], decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                        attn_implementation=self.attention)


def _variants(args: argparse.Namespace, default: str) -> tuple[dict[str, Variant], dict[str, str]]:
    """Rows to run, full first, and rows of the default list skipped because they cannot run here."""
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if "full" not in names:
        names.insert(0, "full")
    rows = {name: resolve_row(name) for name in names}
    skipped = {}
    for name, row in list(rows.items()):
        reason = cannot_run(row, T5Setting.from_args(args))
        if reason is None:
            continue
        if args.methods != default:
            raise LeantuneError(f"--methods: row {name!r} cannot run: {reason}")
        del rows[name]
        skipped[name] = reason
    return rows, skipped


def cannot_run(row: Variant, setting: T5Setting) -> str | None:
    """Why ``row`` cannot run: peft missing, its method not registered, or the method's ``unsupported_reason``
    on the benchmarked T5 (its architecture map, built on the meta device: no memory, no time)."""
    if row.uses_peft:
        try:
            import peft  # noqa: F401
        except ImportError:
            return "peft is not installed (pip install peft)"
        return None
    try:
        config = row.config(setting.num_layers)
    except UnsupportedMethodError as err:
        return str(err)
    import torch
    from transformers import T5ForConditionalGeneration

    from leantune.backbones import resolve

    with torch.device("meta"):
        backbone = resolve(T5ForConditionalGeneration(setting.config()))
    return leantune.get_method(config.method)(config).unsupported_reason(backbone)


def build_training(
    row: Variant, setting: T5Setting, device: torch.device, batch_size: int
) -> tuple[TrainingSetup, int, int]:
    """A fresh model with the row's method attached, its AdamW, a random batch and the step
    (:func:`leantune.memory.training_step`); also the trainable and total parameter counts."""
    import torch
    from transformers import T5ForConditionalGeneration

    from leantune.memory import training_step

    torch.manual_seed(setting.seed)
    config = setting.config()
    model = T5ForConditionalGeneration(config)
    if device.type != "cpu":
        model.to(device)
    vocab = config.vocab_size
    input_ids = torch.randint(2, vocab, (batch_size, setting.source_length), device=device)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.randint(2, vocab, (batch_size, setting.target_length), device=device),
    }
    tuned = _attach(row, model, config.num_layers, batch)
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    tuned.train()
    counts = (sum(p.numel() for p in trainable), sum(p.numel() for p in tuned.parameters()))
    return (training_step(tuned, optimizer, batch), tuned, optimizer), *counts


def _attach(row: Variant, model: nn.Module, num_layers: int, batch: dict[str, torch.Tensor]) -> nn.Module:
    """The model with the row's method: leantune's (given ``batch`` as data where the method needs data) or
    peft's LoRA."""
    if row.uses_peft:
        from peft import LoraConfig, TaskType, get_peft_model

        peft_config = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=32, lora_alpha=32, lora_dropout=0.0,
                                 target_modules=["q", "v"], bias="all")
        return get_peft_model(model, peft_config)
    config = row.config(num_layers)
    needs_data = leantune.get_method(config.method)(config).needs_data()
    return leantune.wrap(model, config, data=[batch] if needs_data else None)


def _check_sizes(args: argparse.Namespace) -> None:
    for option in ("batch_size", "source_length", "target_length"):
        if getattr(args, option) <= 0:
            raise ConfigError(f"--{option.replace('_', '-')} must be > 0, got {getattr(args, option)}")


def _device(spec: str) -> torch.device:
    import torch

    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device: {spec!r} is not a device (use cpu or cuda[:N])") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device: {spec!r}; use cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {spec}: CUDA is not available on this machine")
    return device


def _setting(args: argparse.Namespace, benchmark: str, device: torch.device) -> dict[str, Any]:
    import torch
    import transformers

    setting = {
        "benchmark": benchmark,
        "model": args.model,
        "architecture": {**T5_SIZES[args.model], "weights": "random"},
        "batch_size": args.batch_size,
        "source_length": args.source_length,
        "target_length": args.target_length,
        "dtype": "float32",
        "optimizer": "AdamW",
        "attention": args.attention,
        "device": str(device),
        "seed": args.seed,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": _command_line(args, benchmark),
    }
    try:
        import peft

        setting["peft"] = peft.__version__
    except ImportError:
        pass
    return setting


def _command_line(args: argparse.Namespace, benchmark: str) -> str:
    """The ``leantune bench`` command that reproduces this run (every option spelled out, --json/--out left off)."""
    import torch

    options = {"model": args.model, "methods": args.methods, "batch-size": args.batch_size,
               "source-length": args.source_length, "target-length": args.target_length,
               "attention": args.attention, "seed": args.seed, "device": args.device}
    if benchmark == "memory":
        options["mode"] = args.mode
    else:
        options.update({"rounds": args.rounds, "warmup": args.warmup, "threads": torch.get_num_threads()})
    return f"leantune bench {benchmark} " + " ".join(f"--{key} {value}" for key, value in options.items())


def name_width(names: list[str]) -> int:
    """Width of the method column: 10, or the longest name."""
    return max([10, *map(len, names)])


# --- bench memory -----------------------------------------------------------------------------------------------
def run_memory(args: argparse.Namespace) -> int:
    import torch

    from leantune.memory import estimate_peak_training_memory, measure_peak_training_memory

    _check_sizes(args)
    setting = T5Setting.from_args(args)
    device = _device(args.device)
    if args.mode == "estimate" and device.type != "cpu":
        raise ConfigError("--device applies to --mode measure; the estimate runs on fake CPU tensors")
    variants, skipped = _variants(args, MEMORY_DEFAULT)
    rows: dict[str, dict[str, Any]] = {}
    for name, row in variants.items():
        counts: dict[str, int] = {}

        def setup(row: Variant = row, counts: dict[str, int] = counts) -> TrainingSetup:
            micro_batch = row.micro_batch(args.batch_size)
            training, counts["trainable"], counts["total"] = build_training(row, setting, device, micro_batch)
            return training

        start = time.perf_counter()
        if args.mode == "estimate":
            stats = estimate_peak_training_memory(setup)
        else:
            stats = measure_peak_training_memory(*setup())
        rows[name] = {
            "description": row.description,
            "micro_batch_size": row.micro_batch(args.batch_size),
            "trainable_params": counts["trainable"],
            "trainable_percent": 100 * counts["trainable"] / counts["total"],
            "peak_bytes": stats["peak_bytes"],
            "peak_gib": stats["peak_gib"],
            "breakdown": stats["breakdown"],
            "source": stats["source"],
            "seconds": time.perf_counter() - start,
        }
        if not args.json:
            print(f"  {name:<10} {stats['peak_gib']:8.3f} GiB  ({rows[name]['seconds']:.1f} s)", file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    full_bytes = rows["full"]["peak_bytes"]
    for name, row in rows.items():
        row["percent_of_full"] = 100 * row["peak_bytes"] / full_bytes
        paper_row = variants[name].paper_row
        row["paper_percent_of_full"] = (
            100 * PAPER_MEMORY_GB[paper_row] / PAPER_MEMORY_GB["full"] if paper_row is not None else None
        )
    result = {"setting": {**_setting(args, "memory", device), "mode": args.mode}, "methods": rows,
              "skipped": skipped}
    report(args, result, format_memory_table, plot_memory,
           f"memory_{args.model}_b{args.batch_size}_{args.attention}_{args.mode}")
    return 0


def format_memory_table(result: dict[str, Any]) -> str:
    """The memory table as text: one line per method."""
    s = result["setting"]
    width = name_width([*result["methods"], *result["skipped"]])
    lines = [
        f"Peak training memory ({s['mode']}), {s['model']} architecture (random weights), batch {s['batch_size']}, "
        f"source {s['source_length']}, target {s['target_length']}, fp32, AdamW, {s['attention']} attention, "
        f"{s['device']}",
        f"{'method':<{width}} {'batch':>5} {'trainable':>12} {'trainable%':>10} {'peak GiB':>9} {'% of full':>9} "
        f"{'paper %':>8}",
    ]
    for name, row in result["methods"].items():
        paper = row["paper_percent_of_full"]
        lines.append(
            f"{name:<{width}} {row['micro_batch_size']:>5} {row['trainable_params']:>12,d} "
            f"{row['trainable_percent']:>10.2f} {row['peak_gib']:>9.3f} "
            f"{row['percent_of_full']:>9.1f} {'' if paper is None else f'{paper:.1f}':>8}"
        )
    for name, reason in result["skipped"].items():
        lines.append(f"{name:<{width}} skipped: {reason}")
    lines.append("paper %: LST paper Table 1 / Fig. 1 (T5-base, batch 100, GLUE), memory as % of full fine-tuning")
    return "\n".join(lines)


def plot_memory(result: dict[str, Any], path: Path) -> None:
    """Bar chart of peak memory as % of full fine-tuning, the paper's figures beside where it has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["methods"])
    ours = [result["methods"][n]["percent_of_full"] for n in names]
    paper = [result["methods"][n]["paper_percent_of_full"] for n in names]
    s = result["setting"]
    positions = range(len(names))
    figure, axes = plt.subplots(figsize=(8, 4))
    axes.bar([p - 0.2 for p in positions], ours, width=0.4, label=f"leantune ({s['mode']})")
    axes.bar([p + 0.2 for p, v in zip(positions, paper) if v is not None], [v for v in paper if v is not None],
             width=0.4, label="LST paper, Table 1", color="0.7")
    for p, value, name in zip(positions, ours, names):
        axes.text(p - 0.2, value + 1, f"{result['methods'][name]['peak_gib']:.1f} GiB", ha="center",
                  fontsize=7)
    axes.set_xticks(list(positions), names, rotation=20)
    axes.set_ylabel("peak training memory, % of full")
    axes.set_title(f"{s['model']} (random), batch {s['batch_size']}, {s['source_length']}/{s['target_length']} "
                   f"tokens, fp32, AdamW, {s['attention']} attention", fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=120)
    plt.close(figure)


# --- bench speed ------------------------------------------------------------------------------------------------
def run_speed(args: argparse.Namespace) -> int:
    import torch

    _check_sizes(args)
    setting = T5Setting.from_args(args)
    if args.rounds <= 0 or args.warmup < 0:
        raise ConfigError(f"--rounds must be > 0 and --warmup >= 0, got {args.rounds} and {args.warmup}")
    if args.threads is not None:
        if args.threads <= 0:
            raise ConfigError(f"--threads must be > 0, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    variants, skipped = _variants(args, SPEED_DEFAULT)
    names = list(variants)
    setups, counts = {}, {}
    for name, row in variants.items():
        (step, _, _), trainable, total = build_training(row, setting, device, args.batch_size)
        setups[name], counts[name] = step, (trainable, total)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.warmup + args.rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]  # rotate who goes first
        for name in order:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            setups[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - start)
        if not args.json:
            print(f"  round {round_index + 1}/{args.warmup + args.rounds}"
                  f"{' (warm-up)' if round_index < args.warmup else ''}", file=sys.stderr)
    full_median = statistics.median(times["full"])
    rows = {
        name: {
            "trainable_params": counts[name][0],
            "median_s": statistics.median(samples),
            "min_s": min(samples),
            "max_s": max(samples),
            "times_s": samples,
            "ratio_to_full": statistics.median(samples) / full_median,
        }
        for name, samples in times.items()
    }
    setting = {**_setting(args, "speed", device), "rounds": args.rounds, "warmup": args.warmup,
               "threads": torch.get_num_threads()}
    result = {"setting": setting, "methods": rows, "skipped": skipped}
    report(args, result, format_speed_table, plot_speed,
           f"speed_{args.model}_b{args.batch_size}_l{args.source_length}_{args.attention}")
    return 0


def format_speed_table(result: dict[str, Any]) -> str:
    s = result["setting"]
    width = name_width([*result["methods"], *result["skipped"]])
    lines = [
        f"Seconds per training step, {s['model']} architecture (random weights), batch {s['batch_size']}, source "
        f"{s['source_length']}, target {s['target_length']}, fp32, AdamW, {s['attention']} attention, {s['device']}, "
        f"{s['threads']} threads, median of {s['rounds']} interleaved rounds",
        f"{'method':<{width}} {'trainable':>12} {'median s':>9} {'min s':>7} {'max s':>7} {'x full':>7}",
    ]
    for name, row in result["methods"].items():
        lines.append(f"{name:<{width}} {row['trainable_params']:>12,d} {row['median_s']:>9.3f} {row['min_s']:>7.3f} "
                     f"{row['max_s']:>7.3f} {row['ratio_to_full']:>7.2f}")
    for name, reason in result["skipped"].items():
        lines.append(f"{name:<{width}} skipped: {reason}")
    return "\n".join(lines)


def plot_speed(result: dict[str, Any], path: Path) -> None:
    """Bar chart of the median step time with min-max whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["methods"])
    rows = [result["methods"][n] for n in names]
    medians = [r["median_s"] for r in rows]
    whiskers = [[m - r["min_s"] for m, r in zip(medians, rows)], [r["max_s"] - m for m, r in zip(medians, rows)]]
    s = result["setting"]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.bar(names, medians, yerr=whiskers, capsize=4)
    for index, row in enumerate(rows):
        axes.text(index, row["max_s"] * 1.02, f"{row['ratio_to_full']:.2f}x", ha="center", fontsize=8)
    axes.set_ylabel("seconds per training step (median, min-max)")
    axes.set_title(f"{s['model']} (random), batch {s['batch_size']}, {s['source_length']}/{s['target_length']} "
                   f"tokens, {s['device']}, {s['threads']} threads", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=120)
    plt.close(figure)


# --- output -------------------------------------------------------------------------------------------------------
def report(args: argparse.Namespace, result: dict[str, Any], table: Callable[[dict[str, Any]], str],
           plot: Callable[[dict, Path], None], default_stem: str) -> None:
    """Print the result (JSON with --json, else the table); with --out also write its JSON and plot."""
    print(json.dumps(result, indent=2) if args.json else table(result))
    if args.out is not None:
        write_results(args.out, args.name or default_stem, result, plot)


def write_results(directory: Path, stem: str, result: dict[str, Any], plot: Callable[[dict, Path], None]) -> None:
    """Write ``<stem>.json`` and ``<stem>.png`` into ``directory``, each atomically (temp file, then rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / f"{stem}.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    write_atomic(directory / f"{stem}.png", lambda tmp: plot(result, tmp))
    print(f"wrote {directory / stem}.json and .png", file=sys.stderr)

