"""The README's three-seed comparison on the embedded default, assembled from runs already made: the seeds of
``benchmarks/sweep.py`` at each method's default learning rate, the peak step memory and trainable share of the
``compare`` run (``benchmarks/results/compare_default.json``; neither depends on the seed or the learning rate)
and the baselines (``benchmarks/results/baselines_default.json``). Writes
``benchmarks/results/comparison_default.{md,json,png}`` (the plot: test accuracy with its standard deviation
against peak step memory, baselines as dashed lines).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sweep.py --name tweets_seeds --work-dir runs/sweep-tweets \\
        --workers 2 --methods lora,bitfit,fish,adapter,full,lst --seeds 0 1 2 \\
        --rates lora=0.003 bitfit=0.01 fish=0.001 adapter=0.003 full=5e-05 lst=0.003
    .venv/bin/python benchmarks/comparison_default.py
"""

from __future__ import annotations

import json
from pathlib import Path

from leantune.baselines import BASELINE_LABELS
from leantune.commands.compare import plot
from leantune.registry import get_method

RESULTS = Path(__file__).parent / "results"
ORDER = ["full", "lst", "lora", "adapter", "fish", "bitfit"]


def main() -> None:
    seeds = json.loads((RESULTS / "sweep_tweets_seeds.json").read_text())["summary"]
    compare_rows = {r["method"]: r for r in json.loads((RESULTS / "compare_default.json").read_text())["rows"]}
    baselines = json.loads((RESULTS / "baselines_default.json").read_text())["rows"]
    full_memory = compare_rows["full"]["step_memory"]["peak_bytes"]
    rows = []
    for method in ORDER:
        entry = next(e for e in seeds if e["method"] == method)
        if entry["learning_rate"] != get_method(method).default_learning_rate:
            raise SystemExit(f"{method}: the seeds ran at {entry['learning_rate']:g}, its default is "
                             f"{get_method(method).default_learning_rate:g}")
        memory = compare_rows[method]["step_memory"]
        rows.append({"method": method, "metric": "accuracy", "learning_rate": entry["learning_rate"],
                     "seeds": entry["seeds"], "test_metric": entry["test_mean"], "test_std": entry["test_std"],
                     "validation_metric": entry["validation_mean"], "validation_std": entry["validation_std"],
                     "trainable_percent": compare_rows[method]["trainable_percent"], "step_memory": memory,
                     "peak_memory_bytes": memory["peak_bytes"],
                     "memory_share_of_full": memory["peak_bytes"] / full_memory})
    baseline_rows = [{"method": b["name"], "baseline": True, "label": BASELINE_LABELS[b["name"]],
                      "test_metric": b["metric"]} for b in baselines]
    best_baseline = max(b["test_metric"] for b in baseline_rows)
    lines = ["| method | learning rate | test accuracy, 3 seeds | validation | vs best baseline | trainable % "
             "| peak step MiB | % of full's |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['learning_rate']:g} | {r['test_metric']:.3f} ± {r['test_std']:.3f} "
                     f"| {r['validation_metric']:.3f} ± {r['validation_std']:.3f} "
                     f"| {100 * (r['test_metric'] - best_baseline):+.1f} | {r['trainable_percent']:.2f} "
                     f"| {r['peak_memory_bytes'] / 2**20:.1f} | {100 * r['memory_share_of_full']:.1f} |")
    for b in baseline_rows:
        lines.append(f"| baseline: {b['label']} | – | {b['test_metric']:.3f} | – | – | – | – | – |")
    table = "\n".join(lines)
    (RESULTS / "comparison_default.md").write_text(table + "\n")
    (RESULTS / "comparison_default.json").write_text(json.dumps({"rows": rows, "baselines": baseline_rows},
                                                                indent=1) + "\n")
    plot(rows + baseline_rows, RESULTS / "comparison_default.png",
         "all-MiniLM-L6-v2, tweets: default learning rates, 3 seeds")
    print(table)


if __name__ == "__main__":
    main()
