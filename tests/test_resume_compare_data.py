"""Issue 9, defects 2-4: ``--resume`` refuses flags that change the result, ``compare`` reuses a run only when
its settings match, and ``run.json`` records where the data is and what it was (``eval`` checks it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_cli import FAST, REVIEWS, run_cli


@pytest.fixture
def data_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the reviews CSV in its own folder, which is made the current directory."""
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(REVIEWS, folder / "reviews.csv")
    monkeypatch.chdir(folder)
    return folder / "reviews.csv"


def train_lora(capsys: pytest.CaptureFixture, model: Path, run_dir: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(capsys, "train", "--model", model, "--method", "lora", "--set", "r=4", "--data", "reviews.csv",
                   "--learning-rate", "0.01", "--max-steps", "4", "--output-dir", run_dir, *FAST, *extra)


def test_resume_refuses_flags_that_change_the_result_and_applies_progress(
        tmp_path: Path, tiny_bert_dir: Path, data_copy: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    code, _, _ = train_lora(capsys, tiny_bert_dir, run_dir)
    assert code == 0
    finished = json.loads((run_dir / "results.json").read_text())
    code, _, err = run_cli(capsys, "train", "--output-dir", run_dir, "--resume", "--max-steps", "6",
                           "--learning-rate", "0.5", "--method", "adapter", "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--resume keeps the run's settings; these differ:" in err
    assert "method adapter (saved lora)" in err and "learning_rate 0.5 (saved 0.01)" in err
    assert "max_steps 6 (saved 4)" in err and "decays linearly" in err
    code, _, err = run_cli(capsys, "train", "--output-dir", run_dir, "--resume", "--set", "r=8")
    assert code == 2 and "r 8 (saved 4)" in err and "decays" not in err
    # the same settings typed again (the relative data path included) and a display flag: accepted and applied
    code, out, err = train_lora(capsys, tiny_bert_dir, run_dir, "--resume", "--progress")
    assert code == 0 and "resuming" in out
    assert "4/4" in err  # --progress overrides the saved --no-progress
    assert json.loads((run_dir / "results.json").read_text())["test_metric"] == finished["test_metric"]


def test_compare_reuses_a_finished_run_only_with_the_same_settings(
        tmp_path: Path, tiny_bert_dir: Path, data_copy: Path, capsys) -> None:
    out_dir = tmp_path / "cmp"

    def compare(steps: int) -> tuple[int, str]:
        code, out, _ = run_cli(capsys, "compare", "--methods", "bitfit", "--model", tiny_bert_dir, "--data",
                               "reviews.csv", "--output-dir", out_dir, "--learning-rate", "0.01", "--max-steps",
                               steps, *FAST)
        return code, out

    code, out = compare(3)
    assert code == 0 and "== bitfit:" in out
    first = (out_dir / "bitfit" / "results.json").read_text()
    code, out = compare(3)
    assert code == 0 and "== bitfit" not in out  # same settings: the finished run is reused
    assert (out_dir / "bitfit" / "results.json").read_text() == first
    code, out = compare(5)
    assert code == 0
    rerun = [line for line in out.splitlines() if "rerunning" in line]
    assert len(rerun) == 1 and "max_steps 5 (saved 3)" in rerun[0] and "bitfit.previous-1" in rerun[0]
    assert (out_dir / "bitfit.previous-1" / "results.json").read_text() == first
    report = json.loads((out_dir / "compare.json").read_text())
    assert report["train"]["max_steps"] == 5 and report["rows"][0]["steps"] == 5


def test_eval_works_from_elsewhere_and_refuses_changed_data(
        tmp_path: Path, tiny_bert_dir: Path, data_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    run_dir = tmp_path / "run"
    code, _, _ = train_lora(capsys, tiny_bert_dir, run_dir)
    assert code == 0
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["data"]["data"] == str(data_copy) and Path(spec["model"]).is_absolute()
    assert list(spec["data_sha256"]) == [str(data_copy)] and len(spec["data_sha256"][str(data_copy)]) == 64
    sizes = spec["split_sizes"]["reviews"]
    assert sizes["train"] > 0 and sizes["test"] > 0 and spec["train"]["seed"] == 0
    test_metric = json.loads((run_dir / "results.json").read_text())["test_metric"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, _ = run_cli(capsys, "eval", run_dir)
    assert code == 0 and f"test accuracy {test_metric:.4f}" in out
    # a reshuffled copy of the same rows: same size, other content
    header, *rows = data_copy.read_text().splitlines()
    data_copy.write_text("\n".join([header, *reversed(rows)]) + "\n")
    code, _, err = run_cli(capsys, "eval", run_dir)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(data_copy) in err and "content changed" in err and "--allow-changed-data" in err
    code, out, err = run_cli(capsys, "eval", run_dir, "--allow-changed-data")
    assert code == 0 and "test accuracy" in out
    assert "WARNING" in err and str(data_copy) in err and "content changed" in err
