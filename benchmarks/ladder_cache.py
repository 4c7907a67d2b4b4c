"""LST with and without cached ladders on the embedded default (all-MiniLM-L6-v2, tweets: 2 epochs over 3,200
tweets, batch 32, 64 tokens), both with ``backbone_train_mode=false`` (the cache needs backbone dropout off).

Writes benchmarks/results/ladder_cache.{json,png}: seconds per step in epoch 1 and epoch 2 of each run, the
per-epoch speed-up, the cache's bytes on disk, and both test accuracies, with the machine's load average.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ladder_cache.py [--work-dir runs/ladder-cache]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from leantune.cli import main
from leantune.files import write_atomic_text
from leantune.train import loop
from leantune.train.run import DEFAULT_TRAIN_SETTINGS

RESULTS = Path(__file__).parent / "results"


def timed_run(output_dir: Path, cached: bool) -> dict[str, Any]:
    """One ``leantune train`` run of the embedded default; the seconds of each training step by epoch."""
    step_seconds: list[float] = []
    run_step = loop.train_step

    def timed_step(run: loop.RunState) -> float:
        start = time.perf_counter()
        loss = run_step(run)
        step_seconds.append(time.perf_counter() - start)
        return loss

    shutil.rmtree(output_dir, ignore_errors=True)
    loop.train_step = timed_step
    try:
        code = main(["train", "--output-dir", str(output_dir), "--set", "backbone_train_mode=false",
                     "--no-baselines", "--no-measure-memory", "--no-progress",
                     *(["--cache-ladders"] if cached else [])])
    finally:
        loop.train_step = run_step
    if code != 0:
        raise SystemExit(f"leantune train exited with {code}")
    results = json.loads((output_dir / "results.json").read_text())
    per_epoch = len(step_seconds) // DEFAULT_TRAIN_SETTINGS["epochs"]
    epochs = [step_seconds[i:i + per_epoch] for i in range(0, len(step_seconds), per_epoch)]
    return {
        "cache_ladders": cached,
        "seconds_per_step_by_epoch": [round(statistics.mean(e), 5) for e in epochs],
        "train_seconds": round(sum(step_seconds), 2),
        "test_accuracy": results["test_metric"],
        "validation_accuracy": results["validation_metric"],
        "cache_bytes": results["ladder_cache_bytes"] or 0,  # the folder itself is deleted when training ends
        "wall_seconds": round(results["wall_seconds"], 1),
    }


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.38
    for offset, run in zip((-width / 2, width / 2), runs):
        label = "cached ladders" if run["cache_ladders"] else "backbone every epoch"
        values = run["seconds_per_step_by_epoch"]
        bars = ax.bar([e + offset for e in range(len(values))], values, width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(range(len(runs[0]["seconds_per_step_by_epoch"])),
                  [f"epoch {e + 1}" for e in range(len(runs[0]["seconds_per_step_by_epoch"]))])
    ax.set_ylabel("seconds per training step")
    ax.set_title("LST on all-MiniLM-L6-v2, tweets (batch 32, 64 tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="runs/ladder-cache", help="Where the two runs are written.")
    args = parser.parse_args()
    work = Path(args.work_dir)
    runs = [timed_run(work / "uncached", cached=False), timed_run(work / "cached", cached=True)]
    uncached, cached = (r["seconds_per_step_by_epoch"] for r in runs)
    summary = {
        "setting": "all-MiniLM-L6-v2 + LST (defaults, backbone_train_mode=false), tweets: "
                   f"{DEFAULT_TRAIN_SETTINGS['epochs']} epochs over {DEFAULT_TRAIN_SETTINGS['train_examples']} "
                   f"tweets, batch {DEFAULT_TRAIN_SETTINGS['batch_size']}, {DEFAULT_TRAIN_SETTINGS['max_length']} "
                   "tokens",
        "command": "HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ladder_cache.py",
        "speedup_by_epoch": [round(u / c, 3) for u, c in zip(uncached, cached)],
        "runs": runs,
        "torch_threads": torch.get_num_threads(),
        "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }
    RESULTS.mkdir(exist_ok=True)
    write_atomic_text(RESULTS / "ladder_cache.json", json.dumps(summary, indent=2) + "\n")
    plot(runs, RESULTS / "ladder_cache.png")
    for r in runs:
        print(f"cache_ladders={r['cache_ladders']!s:<5}  s/step by epoch {r['seconds_per_step_by_epoch']}  "
              f"test accuracy {r['test_accuracy']:.4f}  cache {r['cache_bytes']:,} bytes")
    print(f"speed-up by epoch: {summary['speedup_by_epoch']}  (load average {summary['load_average_after']})")
    return 0


if __name__ == "__main__":
    sys.exit(run())
