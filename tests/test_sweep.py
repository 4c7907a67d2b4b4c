"""``benchmarks/sweep.py``: the grid it runs and the summary that picks each method's learning rate."""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sweep"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["sweep"]


def test_the_grid_scales_the_default_rate_unless_rates_are_given(sweep) -> None:
    import leantune

    args = argparse.Namespace(methods="lora,full", factors=[1 / 3, 1.0, 3.0], rates=["full=2e-5,5e-5"],
                              warmups=[0.0, 0.06], seeds=[0, 1])
    points = sweep.grid(args)
    lora_rates = sorted({p.learning_rate for p in points if p.method == "lora"})
    default = leantune.get_method("lora").default_learning_rate
    assert lora_rates == pytest.approx([default / 3, default, default * 3], rel=1e-2)
    assert sorted({p.learning_rate for p in points if p.method == "full"}) == [2e-5, 5e-5]
    assert len(points) == (3 + 2) * 2 * 2
    assert len({p.folder(Path("runs")) for p in points}) == len(points)


def test_the_summary_averages_seeds_and_marks_the_best_validation_mean(sweep) -> None:
    rows = [{"method": "lora", "learning_rate": rate, "warmup_ratio": 0.06, "seed": seed, "validation": val,
             "test": test}
            for rate, seed, val, test in [(1e-3, 0, 0.60, 0.59), (1e-3, 1, 0.64, 0.61), (3e-3, 0, 0.70, 0.66),
                                          (3e-3, 1, 0.72, 0.70)]]
    rows.append({"method": "lora", "learning_rate": 1e-2, "warmup_ratio": 0.06, "seed": 0, "error": "exit 1"})
    summary, table = sweep.summarise(rows)
    by_rate = {e["learning_rate"]: e for e in summary}
    assert set(by_rate) == {1e-3, 3e-3}  # a failed run is left out
    assert by_rate[3e-3]["best"] and not by_rate[1e-3]["best"]
    assert by_rate[3e-3]["validation_mean"] == pytest.approx(0.71)
    assert by_rate[3e-3]["test_std"] == pytest.approx(statistics.stdev([0.66, 0.70]))
    assert "| lora | 0.003 | 0.06 | 2 | **0.710 ± 0.014** | 0.680 ± 0.028 |" in table
