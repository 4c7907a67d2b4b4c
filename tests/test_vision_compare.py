"""benchmarks/vision_compare.py --smoke: a tiny random DINOv2, every row and field of its JSON in range."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "vision_compare.py"
METHODS = ["lst", "lst-before", "lora", "full", "probe"]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("vision_compare", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_one_row_per_method_with_every_field_in_range(tmp_path, capsys) -> None:
    benchmark = load_benchmark()
    assert benchmark.main(["--smoke", "--methods", ",".join(METHODS), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "vision_compare.json").read_text())
    assert (tmp_path / "vision_compare.png").stat().st_size > 0
    assert [row["method"] for row in result["rows"]] == METHODS
    assert len(result["runs"]) == 2 * len(METHODS) and result["setting"]["smoke"]
    rows = {row["method"]: row for row in result["rows"]}
    for name, row in rows.items():
        assert row["seeds"] == 2, name
        assert 0.0 <= row["test_accuracy_mean"] <= 1.0 and 0.0 <= row["test_accuracy_std"] <= 0.5, name
        assert 0 < row["trainable_parameters"] and 0 < row["trainable_percent"] <= 100.0, name
        assert row["step_memory_mib"] > 0 and 0 < row["memory_percent_of_full"] <= 100.0 + 1e-9, name
        assert row["seconds_per_step"] > 0 and row["wall_seconds"] >= row["init_seconds"] > 0, name
        assert math.isfinite(row["final_train_loss"]), name
    assert rows["full"]["trainable_percent"] == 100.0 and rows["full"]["memory_percent_of_full"] == 100.0
    assert rows["probe"]["trainable_parameters"] < rows["lora"]["trainable_parameters"]
    assert rows["lst"]["trainable_parameters"] == rows["lst-before"]["trainable_parameters"]
    assert rows["lst"]["step_memory_mib"] < rows["full"]["step_memory_mib"]
    steps = result["setting"]["steps"]
    for run in result["runs"]:  # the wall time holds the init (load, wrap, Fisher) and every training step
        assert run["wall_seconds"] >= run["init_seconds"] + 0.99 * steps * run["seconds_per_step"], run
    printed = capsys.readouterr().out
    assert all(f"| {name} |" in printed for name in METHODS)
