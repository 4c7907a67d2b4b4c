"""`leantune compare` on the embedded default (all-MiniLM-L6-v2, tweet sentiment) for full, bitfit, lora, adapter,
lst and fish; copies the printed table, the JSON and the plot to benchmarks/results/compare_default.{txt,json,png}.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compare_default.py [--work-dir runs/compare-default] [extra flags]

The budget is the embedded default's: 2 epochs over 3,200 training tweets (200 steps of batch 32), 64 tokens,
500 validation and 1,000 test tweets; LST is initialised, and the FISH mask chosen, from the Fisher of
256 examples. Extra flags are passed to
`leantune compare`. Re-running with the same --work-dir skips finished methods and resumes a stopped one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from leantune.cli import main
from leantune.commands.compare import DEFAULT_METHODS as METHODS


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="runs/compare-default", help="Where the runs are written.")
    parser.add_argument("--name", default="compare_default", help="Stem of the files in benchmarks/results.")
    args, extra = parser.parse_known_args()
    code = main(["compare", "--methods", METHODS, "--output-dir", args.work_dir, *extra])
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    for suffix in ("txt", "json", "png"):
        source = Path(args.work_dir) / f"compare.{suffix}"
        if source.is_file():
            shutil.copyfile(source, results / f"{args.name}.{suffix}")
    return code


if __name__ == "__main__":
    sys.exit(run())
