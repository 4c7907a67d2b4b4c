"""``leantune bench memory`` and ``leantune bench speed`` on tiny sizes: output keys, consistency, invariants."""

from __future__ import annotations

import importlib.util
import json

import pytest

import leantune
from leantune.cli import main

TINY = ["--model", "t5-tiny", "--batch-size", "2", "--source-length", "12", "--target-length", "2"]


def run_json(capsys, *argv: str) -> dict:
    assert main(["bench", *argv, *TINY, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_memory_json_keys_percentages_ordering_and_files(capsys, tmp_path):
    methods = ["full", "lora", "bitfit"]
    methods += ["peft-lora"] if importlib.util.find_spec("peft") else []
    methods += ["lst"] if "lst" in leantune.methods() else []
    result = run_json(capsys, "memory", "--methods", ",".join(methods), "--out", str(tmp_path), "--name", "t")
    rows = result["methods"]
    assert list(rows) == methods
    full = rows["full"]["peak_bytes"]
    for row in rows.values():
        assert {"peak_bytes", "percent_of_full", "trainable_params"} <= set(row)
        assert row["percent_of_full"] == pytest.approx(100 * row["peak_bytes"] / full)
        assert sum(row["breakdown"].values()) == row["peak_bytes"]
    assert rows["full"]["percent_of_full"] == 100
    assert full > rows["lora"]["peak_bytes"] and full > rows["bitfit"]["peak_bytes"]
    # t5-tiny: 2 encoder + 2 decoder blocks; LoRA r=32 on q and v of every self- and cross-attention (12
    # projections, 64 -> 64); T5 has no biases, so train_biases adds none.
    assert rows["lora"]["trainable_params"] == 12 * 32 * (64 + 64)
    if "peft-lora" in rows:  # leantune's LoRA must not cost more than peft's on the same setting
        assert rows["lora"]["trainable_params"] == rows["peft-lora"]["trainable_params"]
        assert rows["lora"]["peak_bytes"] <= rows["peft-lora"]["peak_bytes"]
    assert result["setting"]["mode"] == "estimate" and result["setting"]["batch_size"] == 2
    assert json.loads((tmp_path / "t.json").read_text()) == result
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.png"]  # no temporary files left


def test_memory_measure_mode_adds_full_as_baseline_and_prints_a_table(capsys):
    assert main(["bench", "memory", *TINY, "--methods", "lora", "--mode", "measure"]) == 0
    table = capsys.readouterr().out.splitlines()
    full_line, lora_line = (next(line for line in table if line.startswith(name)) for name in ("full ", "lora "))
    assert float(full_line.split()[-2]) == 100.0
    assert float(lora_line.split()[-2]) < 100.0


def test_speed_json(capsys):
    result = run_json(capsys, "speed", "--methods", "full,lora", "--rounds", "2", "--warmup", "0")
    rows = result["methods"]
    assert list(rows) == ["full", "lora"]
    for row in rows.values():
        assert len(row["times_s"]) == 2
        assert row["min_s"] <= row["median_s"] <= row["max_s"]
    assert rows["full"]["ratio_to_full"] == 1
    assert rows["lora"]["ratio_to_full"] == pytest.approx(rows["lora"]["median_s"] / rows["full"]["median_s"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["memory", "--methods", "full,nope"], "--methods: unknown row or method 'nope'; rows: full, adapter"),
        (["memory", "--batch-size", "0"], "--batch-size must be > 0"),
        (["memory", "--device", "cuda:0"], "--device"),
        (["memory", "--mode", "measure", "--device", "tpu"], "--device: 'tpu'"),
        (["speed", "--device", "nonsense"], "--device: 'nonsense' is not a device"),
        (["speed", "--rounds", "0"], "--rounds must be > 0"),
    ],
)
def test_bad_options_give_one_line_errors(capsys, argv, message):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("benchmark", "described", "defaults"),
    [
        ("memory", "The defaults are the LST paper's Table 1 setting",
         ["--model {t5-base,t5-small,t5-tiny} T5 architecture, random weights. (default: t5-base)",
          "Examples per step. (default: 100)", "Encoder tokens per example. (default: 128)",
          "Decoder tokens per example. (default: 3)", "(default: eager)", "(default: estimate)", "(default: cpu)"]),
        ("speed", "the median over --rounds timed rounds",
         ["(default: t5-small)", "Examples per step. (default: 16)", "(default: 5)", "(default: full,lora,lst)"]),
    ],
)
def test_help_describes_the_benchmark_and_shows_every_default(capsys, benchmark, described, defaults):
    with pytest.raises(SystemExit) as done:
        main(["bench", benchmark, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert described in text
    for default in defaults:
        assert default in text
