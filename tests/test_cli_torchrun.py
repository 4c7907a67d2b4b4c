"""The ``leantune train`` command under ``torchrun`` (2 processes, gloo on CPU): FISH in masked mode trains the
same weights as one process and its DDP communication hook sends only the selected entries."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as hf
from safetensors.torch import load_file

REVIEWS = Path(__file__).parent / "fixtures" / "local" / "reviews.csv"
FISH = ["--method", "fish", "--set", "mask_type=random", "--set", "mode=masked", "--set", "keep_ratio=0.05",
        "--learning-rate", "0.01", "--weight-decay", "0.01", "--batch-size", "4", "--max-steps", "3",
        "--max-length", "24", "--no-progress", "--no-baselines", "--no-measure-memory"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT without dropout (so one and two processes draw nothing different) and a tokenizer."""
    path = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    torch.manual_seed(0)
    config = hf.BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    hf.BertModel(config).save_pretrained(path)
    hf.ByT5Tokenizer().save_pretrained(path)
    return path


def leantune_train(run_dir: Path, model_dir: Path, processes: int) -> subprocess.Popen:
    launcher = [sys.executable]
    if processes > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr",
                     "127.0.0.1", "--master-port", str(port)]
    command = [*launcher, "-m", "leantune", "train", "--model", str(model_dir), "--data", str(REVIEWS), *FISH,
               "--output-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return out


def test_fish_under_torchrun_equals_one_process_and_sends_only_selected_entries(tmp_path: Path,
                                                                                model_dir: Path) -> None:
    one = leantune_train(tmp_path / "one", model_dir, processes=1)
    two = leantune_train(tmp_path / "two", model_dir, processes=2)
    assert finished(one).count("trainable params:") == 1
    assert finished(two).count("trainable params:") == 1, "only the first process prints"

    last = "checkpoints/step-000003/delta.safetensors"
    expected, actual = load_file(str(tmp_path / "one" / last)), load_file(str(tmp_path / "two" / last))
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)

    results = json.loads((tmp_path / "two" / "results.json").read_text())
    communication = results["communication"]
    assert communication["steps_counted"] == 3
    # masked mode: the hook sends the selected entries of each masked tensor and the dense head, 4 bytes each
    selected = sum(t.numel() for n, t in actual.items() if n.endswith(".indices"))
    head = sum(t.numel() for n, t in actual.items() if ".classifier." in n)
    assert selected > 0 and head > 0
    assert communication["bytes_per_step_min"] == communication["bytes_per_step_max"] == 4 * (selected + head)
    assert communication["bytes_per_step_max"] < communication["dense_bytes_per_step"] / 5
    assert json.loads((tmp_path / "one" / "results.json").read_text())["communication"] is None
