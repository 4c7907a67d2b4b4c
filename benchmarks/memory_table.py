"""Reproduce every memory figure in the README and docs/memory.md; results land in benchmarks/results/.

1. The LST paper's Table 1 memory column (T5-base, batch 100, 128/3 tokens, fp32, AdamW), estimated, with eager
   attention (as in the paper's transformers 4.6) and with torch's fused attention (sdpa).
2. Estimate against measurement (CPU tracker) for every row on a setting that fits this machine's memory.

Run from the repository root:  .venv/bin/python benchmarks/memory_table.py [--skip-tables] [--skip-measure]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from leantune.cli import main as leantune_main
from leantune.files import write_atomic_text

RESULTS = Path(__file__).resolve().parent / "results"
COMPARISON = {"model": "t5-small", "batch_size": 4}


def bench(*argv: str) -> None:
    print("leantune bench", " ".join(argv), file=sys.stderr)
    if leantune_main(["bench", *argv]) != 0:
        raise SystemExit(f"leantune bench {' '.join(argv)} failed")


def compare_estimate_with_measurement() -> None:
    """Run the same rows in both modes and write the relative differences."""
    setting = ["--model", COMPARISON["model"], "--batch-size", str(COMPARISON["batch_size"])]
    stems = {}
    for mode in ("estimate", "measure"):
        stems[mode] = f"memory_{COMPARISON['model']}_b{COMPARISON['batch_size']}_eager_{mode}"
        bench("memory", *setting, "--mode", mode, "--out", str(RESULTS), "--name", stems[mode])
    results = {mode: json.loads((RESULTS / f"{stem}.json").read_text()) for mode, stem in stems.items()}
    rows = {}
    for name, measured in results["measure"]["methods"].items():
        estimated = results["estimate"]["methods"][name]["peak_bytes"]
        rows[name] = {
            "measured_bytes": measured["peak_bytes"],
            "estimated_bytes": estimated,
            "relative_difference": (estimated - measured["peak_bytes"]) / measured["peak_bytes"],
        }
    path = RESULTS / f"estimate_vs_measure_{COMPARISON['model']}_b{COMPARISON['batch_size']}.json"
    write_atomic_text(path, json.dumps({"setting": results["measure"]["setting"], "methods": rows}, indent=2) + "\n")
    for name, row in rows.items():
        print(f"{name:<10} measured {row['measured_bytes']:>14,d}  estimated {row['estimated_bytes']:>14,d}  "
              f"{100 * row['relative_difference']:+.4f}%")


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tables", action="store_true", help="Skip the two T5-base batch-100 tables.")
    parser.add_argument("--skip-measure", action="store_true", help="Skip the estimate-vs-measurement comparison.")
    args = parser.parse_args()
    if not args.skip_tables:
        for attention in ("eager", "sdpa"):
            bench("memory", "--attention", attention, "--out", str(RESULTS))
    if not args.skip_measure:
        compare_estimate_with_measurement()


if __name__ == "__main__":
    run()
