"""Checkpoint integrity: every file is checksummed, a damaged newest checkpoint falls back to the previous intact
one (and the run ends bitwise equal to an uninterrupted one), none intact refuses in one line, and the model is
untouched when verification fails."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import SETTINGS, make_task, make_tiny_bert, tokenizer

import leantune
from leantune.errors import CheckpointError
from leantune.train import loop
from leantune.train.checkpoint import MANIFEST, checkpoint_dirs, latest_checkpoint, verify_checkpoint

RUN = dict(learning_rate=3e-3, max_steps=7, checkpoint_every=1, **SETTINGS)
STOP_AT = 5


class Stopped(Exception):
    """Stands for a kill after the checkpoint of step ``STOP_AT``."""


def _run(run_dir: Path, resume: bool = False, model: leantune.TunedModel | None = None) -> leantune.TunedModel:
    tuned = model or leantune.wrap(make_tiny_bert(), leantune.make_config("lora"))
    leantune.train(tuned, make_task(), tokenizer(), output_dir=run_dir, resume=resume, **RUN)
    return tuned


def _stopped_run(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train until the checkpoint of step ``STOP_AT`` is written, then stop as a kill would."""
    real_step = loop.train_step

    def step_or_stop(run: loop.RunState) -> float:
        if run.progress.global_step == STOP_AT:
            raise Stopped
        return real_step(run)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "train_step", step_or_stop)
        with pytest.raises(Stopped):
            _run(run_dir)


def _flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _final_delta(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir) / "delta.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The final delta of an uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("straight")
    _run(run_dir)
    return _final_delta(run_dir)


def test_every_checkpoint_file_is_in_the_manifest_and_two_checkpoints_are_kept(tmp_path: Path) -> None:
    _run(tmp_path)
    kept = checkpoint_dirs(tmp_path)
    assert [p.name for p in kept] == [f"step-{RUN['max_steps']:06d}", f"step-{RUN['max_steps'] - 1:06d}"]
    for path in kept:
        recorded = json.loads((path / MANIFEST).read_text())["sha256"]
        assert set(recorded) == {p.name for p in path.iterdir() if p.name != MANIFEST}
        assert verify_checkpoint(path) == []
    _flip_byte(kept[0] / "state.pt")
    assert verify_checkpoint(kept[0]) == [f"{kept[0] / 'state.pt'} does not match its checksum"]


@pytest.mark.parametrize("damage", ["flip delta", "truncate state"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_and_ends_bitwise_equal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    straight: dict[str, torch.Tensor], damage: str,
) -> None:
    _stopped_run(tmp_path, monkeypatch)
    newest = latest_checkpoint(tmp_path)
    assert newest.name == f"step-{STOP_AT:06d}"
    if damage == "flip delta":
        _flip_byte(newest / "delta.safetensors")
    else:
        _truncate(newest / "state.pt")
    with caplog.at_level(logging.WARNING, logger="leantune.checkpoint"):
        _run(tmp_path, resume=True)
    warnings = [r.getMessage() for r in caplog.records if r.name == "leantune.checkpoint"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"step-{STOP_AT:06d}" in warnings[0] and f"resuming from step-{STOP_AT - 1:06d}" in warnings[0]
    resumed = _final_delta(tmp_path)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[n], straight[n]) for n in straight)


def test_no_intact_checkpoint_refuses_in_one_line_and_leaves_the_model_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _stopped_run(tmp_path, monkeypatch)
    newest, previous = checkpoint_dirs(tmp_path)
    _flip_byte(newest / "delta.safetensors")
    _truncate(previous / "state.pt")
    model = leantune.wrap(make_tiny_bert(), leantune.make_config("lora"))
    before = {n: t.detach().clone() for n, t in model.delta_state_dict().items()}
    with pytest.raises(CheckpointError) as raised:
        _run(tmp_path, resume=True, model=model)
    message = str(raised.value)
    assert "\n" not in message
    assert str(newest / "delta.safetensors") in message and str(previous / "state.pt") in message
    after = model.delta_state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_a_verified_checkpoint_for_another_model_is_refused_before_anything_is_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _stopped_run(tmp_path, monkeypatch)
    model = leantune.wrap(make_tiny_bert(num_labels=3), leantune.make_config("lora"))
    before = {n: t.detach().clone() for n, t in model.delta_state_dict().items()}
    with pytest.raises(CheckpointError, match="other shapes"):
        _run(tmp_path, resume=True, model=model)
    after = model.delta_state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
