"""leantune.train on 2 processes (torchrun, gloo on CPU): DDP equals one process, FISH's comm hook sends only the
selected entries, and an FSDP2 run stopped and resumed from its sharded checkpoint equals an uninterrupted one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_task, make_tiny_bert, tokenizer

import leantune
from leantune.methods.fish import save_mask
from leantune.train.checkpoint import latest_checkpoint
from leantune.train.data import Encoder

WORKER = Path(__file__).parent / "fixtures" / "train_worker.py"
STEPS = 6
KEEP_RATIO = 0.02


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(*args: str | Path, processes: int = 1) -> subprocess.Popen:
    """The worker as one process, or under ``torchrun --nproc-per-node processes``."""
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr", "127.0.0.1",
                "--master-port", str(free_port())] if processes > 1 else []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *torchrun, str(WORKER), *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> None:
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol, msg=name)


# --- DDP ----------------------------------------------------------------------------------------------------------
def test_lora_under_ddp_with_accumulation_equals_one_process_on_the_same_global_batches(tmp_path: Path) -> None:
    single, ddp = tmp_path / "single.safetensors", tmp_path / "ddp.safetensors"
    one = launch(single, "--delta-only", "--steps", STEPS)
    two = launch(ddp, "--delta-only", "--steps", STEPS, "--grad-accumulation", "2", "--result", tmp_path / "r.json",
                 processes=2)
    finish(one)
    finish(two)
    expected, actual = load_file(str(single)), load_file(str(ddp))
    initial = leantune.wrap(make_tiny_bert(seed=0, dropout=0.0), leantune.make_config("lora")).delta_state_dict()
    assert any(not torch.equal(expected[n], initial[n]) for n in expected)  # training changed the delta
    assert_same_tensors(actual, expected, atol=1e-6)
    assert json.loads((tmp_path / "r.json").read_text())["communication"] is None  # DDP's own all-reduce


@pytest.fixture(scope="module")
def fish_options(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """FISH in masked mode with a Fisher mask built once here and saved, so that every process holds the same."""
    task, config = make_task(), leantune.TrainConfig(max_length=24)
    encoder = Encoder(task, tokenizer(), False, config.max_length, config.max_target_length)
    batches = [encoder.batch(task.splits["train"][i:i + 4]) for i in range(0, 32, 4)]
    tuned = leantune.wrap(make_tiny_bert(seed=0, dropout=0.0),
                          leantune.make_config("fish", keep_ratio=KEEP_RATIO, num_samples=16), data=batches)
    path = tmp_path_factory.mktemp("fish") / "mask.safetensors"
    save_mask(tuned.method.mask(), path)
    return {"mode": "masked", "mask_path": str(path), "keep_ratio": KEEP_RATIO}


def test_fish_under_ddp_equals_one_process_and_sends_only_the_selected_entries(tmp_path: Path,
                                                                                fish_options: dict) -> None:
    fish = ["--delta-only", "--steps", STEPS, "--method", "fish", "--options", json.dumps(fish_options),
            "--weight-decay", "0.01"]
    single, ddp, result = tmp_path / "single.safetensors", tmp_path / "ddp.safetensors", tmp_path / "ddp.json"
    one = launch(single, *fish)
    two = launch(ddp, *fish, "--grad-accumulation", "2", "--result", result, processes=2)
    finish(one)
    finish(two)
    expected, actual = load_file(str(single)), load_file(str(ddp))
    tuned = leantune.wrap(make_tiny_bert(seed=0, dropout=0.0), leantune.make_config("fish", **fish_options))
    initial = tuned.delta_state_dict()
    assert any(not torch.equal(expected[n], initial[n]) for n in expected)
    assert_same_tensors(actual, expected, atol=1e-6)

    # Bytes on the wire per step: the selected entries of every masked tensor, the densely trained head whole.
    deltas = tuned.method.deltas()
    trainable = {n: p for n, p in tuned.base_model.named_parameters() if p.requires_grad}
    selected = sum(d.indices.numel() for d in deltas.values())
    dense_rest = sum(p.numel() for n, p in trainable.items() if n not in deltas)
    assert selected > 0 and dense_rest > 0
    communication = json.loads(result.read_text())["communication"]
    assert communication["steps_counted"] == STEPS  # one exchange per step: no_sync on the first micro-batch
    assert communication["bytes_per_step_min"] == communication["bytes_per_step_max"] == 4 * (selected + dense_rest)
    dense = 4 * sum(p.numel() for p in trainable.values())
    assert communication["dense_bytes_per_step"] == dense
    assert communication["bytes_per_step_max"] < dense / 10


# --- FSDP2 --------------------------------------------------------------------------------------------------------
def _final_checkpoint(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the run's latest (sharded) checkpoint: the delta and the optimizer state, by flat name."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None and (checkpoint / "sharded" / ".metadata").is_file()
    dcp_to_torch_save(checkpoint / "sharded", out)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}/{key}", inner)
        elif isinstance(value, (list, tuple)):
            for index, inner in enumerate(value):
                walk(f"{prefix}/{index}", inner)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", torch.load(out, weights_only=False))
    return flat


def test_fsdp_run_stopped_and_resumed_from_sharded_checkpoints_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    fsdp = ["--steps", STEPS, "--fsdp"]  # lora with dropout; a checkpoint every step, evaluations at steps 4 and 6
    uninterrupted = launch(straight, *fsdp, processes=2)
    finish(launch(stopped, *fsdp, "--stop-after", "5", processes=2))
    assert latest_checkpoint(stopped).name == "step-000005"
    assert (stopped / "best" / "delta.safetensors").is_file()
    finish(launch(stopped, *fsdp, "--resume", processes=2))
    finish(uninterrupted)

    assert latest_checkpoint(straight).name == latest_checkpoint(stopped).name == f"step-{STEPS:06d}"
    expected = _final_checkpoint(straight, tmp_path / "straight.pt")
    resumed = _final_checkpoint(stopped, tmp_path / "stopped.pt")
    assert any("/delta/" in n for n in expected) and any("/optimizer/state/" in n for n in expected)
    assert_same_tensors(resumed, expected, atol=0)
    logs = [[json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for run in (straight, stopped)]
    for entries in logs:
        for entry in entries:
            entry.pop("elapsed_s")
    assert len(logs[0]) == 2 and logs[0] == logs[1]
    # best/ is one plain delta (gathered from the shards) that leantune.load reads into an unsharded model.
    assert_same_tensors(load_file(str(stopped / "best" / "delta.safetensors")),
                        load_file(str(straight / "best" / "delta.safetensors")), atol=0)
    reloaded = leantune.load(make_tiny_bert(seed=0, dropout=0.1), straight / "best")
    initial = leantune.wrap(make_tiny_bert(seed=0, dropout=0.1), leantune.make_config("lora")).delta_state_dict()
    assert any(not torch.equal(t, initial[n]) for n, t in reloaded.delta_state_dict().items())
