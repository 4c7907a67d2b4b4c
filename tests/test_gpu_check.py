"""``benchmarks/gpu_check.py --smoke``: every part runs on tiny sizes on the CPU and writes complete, sane JSON."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
PARTS = ("memory_fp32", "memory_bf16", "fish", "fisher", "embedded")
MEMORY_ROWS = {"full", "adapter", "lora", "bitfit", "prompt", "lst", "lst-bf16"}


def load_script() -> Any:
    """The script as a module (registered in ``sys.modules``, as its dataclasses need)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def numbers(value: Any) -> list[float]:
    """Every number in nested dicts and lists (booleans and None left out)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [value]
    items = value.values() if isinstance(value, dict) else value
    return [n for item in items for n in numbers(item)]


@pytest.fixture(scope="module")
def smoke(tiny_bert_dir, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("gpu-check")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert load_script().main(["--smoke", "--out", str(out), "--tiny-model", str(tiny_bert_dir)]) == 0
    return out, printed.getvalue()


def test_smoke_writes_one_json_per_part_and_a_summary(smoke) -> None:
    out, _ = smoke
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{p}.json" for p in PARTS] + ["summary.json"])
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["parts"]) == list(PARTS)
    environment = summary["environment"]
    assert {"device_name", "torch", "transformers", "command"} <= set(environment) and environment["smoke"]
    for part in PARTS:
        assert json.loads((out / f"{part}.json").read_text()) == summary["parts"][part]


def test_every_part_ran_every_row_with_finite_positive_numbers(smoke) -> None:
    out, _ = smoke
    parts = json.loads((out / "summary.json").read_text())["parts"]
    assert set(parts["memory_fp32"]["rows"]) == MEMORY_ROWS and set(parts["memory_bf16"]["rows"]) == MEMORY_ROWS
    assert set(parts["fish"]["rows"]) == {"full", "fish"}
    assert set(parts["fisher"]["rows"]) == {"loop", "vectorised"}
    assert set(parts["embedded"]["rows"]) == {"lst"}
    for name, part in parts.items():
        assert part["skipped"] == {}, name
        values = numbers(part["rows"]) + [part["seconds"]]
        assert values and all(math.isfinite(v) and v > 0 for v in values), name


def test_memory_rows_are_consistent(smoke) -> None:
    out, printed = smoke
    rows = json.loads((out / "memory_fp32.json").read_text())["rows"]
    assert rows["full"]["percent_of_full"] == 100
    for row in rows.values():
        assert row["percent_of_full"] == pytest.approx(100 * row["peak_bytes"] / rows["full"]["peak_bytes"])
        assert row["step_ms_min"] <= row["step_ms_median"] <= row["step_ms_max"]
        assert row["trainable_params"] < row["total_params"] or row is rows["full"]
    assert rows["lst"]["peak_bytes"] < rows["full"]["peak_bytes"]
    assert "memory_fp32" in printed and "lst-bf16" in printed


def test_fisher_paths_agree(smoke) -> None:
    out, _ = smoke
    fisher = json.loads((out / "fisher.json").read_text())
    assert fisher["setting"]["max_difference_over_largest_score"] < 1e-5


def test_a_spent_budget_skips_the_rest_with_a_reason(tiny_bert_dir, tmp_path) -> None:
    script = load_script()
    assert script.main(["--smoke", "--out", str(tmp_path), "--tiny-model", str(tiny_bert_dir), "--parts",
                        "fish", "--budget-s", "0"]) == 0
    part = json.loads((tmp_path / "fish.json").read_text())
    assert part["rows"] == {} and "budget" in part["skipped"]["*"]


def test_unknown_part_is_refused(capsys) -> None:
    assert load_script().main(["--smoke", "--parts", "nope"]) == 2
    assert "unknown parts ['nope']" in capsys.readouterr().err
