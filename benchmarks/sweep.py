"""Learning-rate / warm-up / seed sweep of `leantune train`: one run per grid point, several at once (one torch
thread each), validation accuracy per method and learning rate into benchmarks/results/sweep_<name>.{json,png,md}.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sweep.py --name tweets --workers 2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sweep.py --name bbc --workers 2 \
        --options lst.fisher_samples=256 fish.num_samples=256 -- --task bbc --max-length 64 --batch-size 16 \
        --max-steps 60

Each method is tried at its default learning rate times each ``--factors`` entry (or at the rates given with
``--rates method=a,b``), at each ``--warmups`` ratio and each ``--seeds`` entry. Flags after ``--`` go to every
run (without them the runs are the embedded default: 200 steps of 32 tweets). A grid point whose
``results.json`` exists is read, not rerun, so a stopped sweep continues where it was. The learning rate picked
for a method is the one with the best mean validation accuracy; the test accuracy is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DEFAULT_METHODS = "full,bitfit,lora,adapter,lst,fish"


@dataclass(frozen=True)
class Point:
    method: str
    learning_rate: float
    warmup_ratio: float
    seed: int

    def folder(self, root: Path) -> Path:
        return root / f"{self.method}-lr{self.learning_rate:g}-wu{self.warmup_ratio:g}-s{self.seed}"


def default_rate(method: str) -> float:
    from leantune.registry import get_method

    return get_method(method).default_learning_rate


def grid(args: argparse.Namespace) -> list[Point]:
    rates = {}
    for entry in args.rates:
        method, _, values = entry.partition("=")
        rates[method] = [float(v) for v in values.split(",")]
    points = []
    for method in args.methods.split(","):
        method_rates = rates.get(method) or [float(f"{default_rate(method) * f:.3g}") for f in args.factors]
        for rate in method_rates:
            for warmup in args.warmups:
                for seed in args.seeds:
                    points.append(Point(method, rate, warmup, seed))
    return points


def run_point(point: Point, root: Path, extra: list[str], options: dict[str, list[str]]) -> dict:
    folder = point.folder(root)
    results = folder / "results.json"
    if not results.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "leantune", "train", "--method", point.method,
                   "--learning-rate", str(point.learning_rate), "--warmup-ratio", str(point.warmup_ratio),
                   "--seed", str(point.seed), "--output-dir", str(folder), "--no-progress", "--no-baselines",
                   "--no-measure-memory", *options.get(point.method, []), *extra]
        resume = ["--resume"] if (folder / "run.json").is_file() else []
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        with open(folder / "sweep.log", "a") as log:
            code = subprocess.call(command + resume, stdout=log, stderr=subprocess.STDOUT, env=environment)
        if code:
            print(f"failed ({code}): {folder}/sweep.log", file=sys.stderr)
            return {**asdict(point), "error": f"exit {code}"}
    data = json.loads(results.read_text())
    row = {**asdict(point), "validation": data["validation_metric"], "test": data["test_metric"],
           "seconds_per_step": data["seconds_per_step"], "steps": data["steps"],
           "curve": [(h["step"], h.get(f"validation_{data['metric']}")) for h in data["history"]]}
    print(f"{point.method:8s} lr {point.learning_rate:<8g} warm-up {point.warmup_ratio:<5g} seed {point.seed}: "
          f"validation {row['validation']:.4f} test {row['test']:.4f} ({row['seconds_per_step']:.2f} s/step)",
          flush=True)
    return row


def summarise(rows: list[dict]) -> tuple[list[dict], str]:
    """Mean ± std over seeds per (method, rate, warm-up); the best validation mean per method is marked."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if "error" not in row:
            groups.setdefault((row["method"], row["learning_rate"], row["warmup_ratio"]), []).append(row)
    summary = []
    for (method, rate, warmup), members in groups.items():
        entry = {"method": method, "learning_rate": rate, "warmup_ratio": warmup, "seeds": len(members)}
        for split in ("validation", "test"):
            values = [m[split] for m in members]
            entry[f"{split}_mean"] = statistics.mean(values)
            entry[f"{split}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    best = {}
    for entry in summary:
        if entry["validation_mean"] > best.get(entry["method"], {"validation_mean": -1})["validation_mean"]:
            best[entry["method"]] = entry
    lines = ["| method | learning rate | warm-up | seeds | validation | test |", "|---|---|---|---|---|---|"]
    for entry in sorted(summary, key=lambda e: (e["method"], e["learning_rate"], e["warmup_ratio"])):
        entry["best"] = entry is best[entry["method"]]
        mark = "**" if entry["best"] else ""
        lines.append(f"| {entry['method']} | {entry['learning_rate']:g} | {entry['warmup_ratio']:g} "
                     f"| {entry['seeds']} | {mark}{entry['validation_mean']:.3f} ± "
                     f"{entry['validation_std']:.3f}{mark} "
                     f"| {entry['test_mean']:.3f} ± {entry['test_std']:.3f} |")
    return summary, "\n".join(lines)


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method in sorted({e["method"] for e in summary}):
        for warmup in sorted({e["warmup_ratio"] for e in summary if e["method"] == method}):
            entries = sorted((e for e in summary if e["method"] == method and e["warmup_ratio"] == warmup),
                             key=lambda e: e["learning_rate"])
            axis.errorbar([e["learning_rate"] for e in entries], [e["validation_mean"] for e in entries],
                          yerr=[e["validation_std"] for e in entries], marker="o", capsize=3,
                          label=f"{method} (warm-up {warmup:g})")
    axis.set_xscale("log")
    axis.set_xlabel("peak learning rate")
    axis.set_ylabel("validation accuracy")
    axis.set_title(title)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="tweets", help="Stem of the result files (sweep_<name>.*).")
    parser.add_argument("--work-dir", help="Where the runs go (default runs/sweep-<name>).")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="Comma-separated methods.")
    parser.add_argument("--factors", type=float, nargs="+", default=[1 / 3, 1.0, 3.0],
                        help="Multiples of each method's default learning rate.")
    parser.add_argument("--rates", nargs="*", default=[], metavar="METHOD=A,B",
                        help="Explicit learning rates for a method (replace --factors for it).")
    parser.add_argument("--options", nargs="*", default=[], metavar="METHOD.KEY=VALUE",
                        help="A method option for that method's runs (passed as --set KEY=VALUE).")
    parser.add_argument("--warmups", type=float, nargs="+", default=[0.06], help="Warm-up ratios.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Seeds.")
    parser.add_argument("--workers", type=int, default=2, help="Runs at once (each with one torch thread).")
    parser.add_argument("--title", default=None, help="Plot title.")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    root = Path(args.work_dir or f"runs/sweep-{args.name}")
    points = grid(args)
    options: dict[str, list[str]] = {}
    for entry in args.options:
        method, _, assignment = entry.partition(".")
        options.setdefault(method, []).extend(["--set", assignment])
    print(f"{len(points)} runs into {root}", flush=True)
    with ThreadPoolExecutor(args.workers) as pool:
        rows = list(pool.map(lambda p: run_point(p, root, extra, options), points))
    summary, table = summarise(rows)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"sweep_{args.name}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"command": " ".join(sys.argv), "run_flags": extra, "rows": rows, "summary": summary}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table + "\n")
    plot(summary, stem.with_suffix(".png"), args.title or f"learning-rate sweep: {args.name}")
    print(table)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
