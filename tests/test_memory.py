"""Peak training memory: the CPU tracker's measurement, the fake-tensor estimate, and how they agree."""

from __future__ import annotations

import sys

import pytest
import torch
import transformers as hf

import leantune
from leantune.errors import LeantuneError
from leantune.memory import (
    MIN_TRACKER_TORCH,
    TrackerUnavailableError,
    estimate_peak_training_memory,
    measure_peak_training_memory,
    tracker_unavailable_reason,
    training_step,
)

CONFIG = dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=128, decoder_start_token_id=0)
BATCH, SOURCE, TARGET = 4, 24, 3

CASES = {
    "full": {},
    "lora": {"r": 8, "alpha": 8, "train_biases": True},
    "prompt": {"num_tokens": 5},
    "lst": {"init": "random", "side_layers": [1]},
    "lst-bf16": {"init": "random", "side_layers": [1], "backbone_dtype": "bfloat16"},
}


def setup(case: str, device: str = "cpu"):
    """A tiny T5 with ``case`` attached, its AdamW, a random batch and the step (runs under fake mode too)."""
    torch.manual_seed(0)
    model = hf.T5ForConditionalGeneration(hf.T5Config(**CONFIG))
    if device != "cpu":
        model.to(device)
    tuned = leantune.wrap(model, leantune.make_config(case.split("-")[0], **CASES[case]))
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(2, CONFIG["vocab_size"], (BATCH, SOURCE), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.randint(2, CONFIG["vocab_size"], (BATCH, TARGET), device=device)}
    return training_step(tuned, optimizer, batch), tuned, optimizer


def needs(case: str):
    return pytest.mark.skipif(case.split("-")[0] not in leantune.methods(), reason=f"method {case!r} not registered")


_MEASURED: dict[str, dict] = {}


def measured(case: str) -> dict:
    """The CPU measurement of ``case``, made once per test session."""
    if case not in _MEASURED:
        _MEASURED[case] = measure_peak_training_memory(*setup(case))
    return _MEASURED[case]


@pytest.mark.parametrize("case", [pytest.param(c, marks=needs(c)) for c in CASES])
def test_estimate_agrees_with_measurement(case):
    estimated = estimate_peak_training_memory(lambda: setup(case))
    assert measured(case)["source"] == "tracker" and estimated["source"] == "estimate"
    assert abs(estimated["peak_bytes"] - measured(case)["peak_bytes"]) / measured(case)["peak_bytes"] < 0.05
    for stats in (measured(case), estimated):
        assert sum(stats["breakdown"].values()) == stats["peak_bytes"]


def test_measurement_is_deterministic_and_counts_parameters_and_adam_state():
    step, model, optimizer = setup("lora")
    again = measure_peak_training_memory(step, model, optimizer)
    assert again == measured("lora")
    # Every parameter is live throughout; AdamW keeps exp_avg and exp_avg_sq per trainable parameter plus a
    # float32 step counter each.
    params = {id(p): p for p in model.parameters()}.values()
    assert again["breakdown"]["parameters"] == sum(p.numel() * p.element_size() for p in params)
    trainable = [p for p in params if p.requires_grad]
    assert again["breakdown"]["optimizer_state"] == sum(2 * p.numel() * p.element_size() + 4 for p in trainable)
    assert again["breakdown"]["activations"] > 0


def test_frozen_backbone_costs_less_than_full_fine_tuning():
    full, lora = measured("full"), measured("lora")
    assert lora["peak_bytes"] < full["peak_bytes"]
    assert lora["breakdown"]["optimizer_state"] < full["breakdown"]["optimizer_state"] / 10


def test_estimate_allocates_nothing_real():
    """A step far beyond this machine's memory (one T5-base block, batch 512 x 512 tokens) is estimated."""
    config = hf.T5Config(d_model=768, d_ff=3072, num_layers=1, num_heads=12, d_kv=64, vocab_size=32128,
                         decoder_start_token_id=0)
    batch, length = 512, 512

    def huge():
        model = hf.T5ForConditionalGeneration(config)
        optimizer = torch.optim.AdamW(model.parameters())
        ids = torch.randint(2, config.vocab_size, (batch, length))
        labels = torch.randint(2, config.vocab_size, (batch, 3))
        return training_step(model, optimizer, {"input_ids": ids, "labels": labels}), model, optimizer

    stats = estimate_peak_training_memory(huge)
    with torch.device("meta"):
        param_bytes = sum(p.numel() * 4 for p in hf.T5ForConditionalGeneration(config).parameters())
    # At least: weights, their AdamW moments, and the encoder's feed-forward activation kept for backward.
    assert stats["peak_bytes"] > 3 * param_bytes + batch * length * config.d_ff * 4
    assert stats["breakdown"]["parameters"] == param_bytes


def test_model_without_parameters_is_refused():
    with pytest.raises(LeantuneError, match="no parameters"):
        measure_peak_training_memory(lambda: None, torch.nn.ReLU(), None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_measurement_reads_the_allocator_peak():
    step, model, optimizer = setup("lora", device="cuda")
    stats = measure_peak_training_memory(step, model, optimizer)
    assert stats["source"] == "cuda" and stats["breakdown"] is None
    assert stats["peak_bytes"] >= sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("break_torch", ["old_version", "no_module", "changed_internals"])
def test_unavailable_tracker_is_a_clear_error(monkeypatch, break_torch):
    from torch.distributed._tools import mem_tracker

    assert tracker_unavailable_reason() is None
    if break_torch == "old_version":
        monkeypatch.setattr(torch, "__version__", "2.4.1+cpu")
    elif break_torch == "no_module":
        monkeypatch.setitem(sys.modules, "torch.distributed._tools.mem_tracker", None)
    else:
        monkeypatch.delattr(mem_tracker.MemTracker, "_update_peak_stats")
    found = torch.__version__
    message = f"the CPU memory tracker needs torch >= {'.'.join(map(str, MIN_TRACKER_TORCH))}"
    assert tracker_unavailable_reason().startswith(f"{message} built with torch.distributed (found {found})")
    steps = []
    step, model, optimizer = setup("lora")
    with pytest.raises(TrackerUnavailableError, match=message) as raised:
        measure_peak_training_memory(lambda: steps.append(step()), model, optimizer)
    assert isinstance(raised.value, LeantuneError)
    assert not steps, "nothing runs before the tracker is checked"
    with pytest.raises(TrackerUnavailableError, match=message):
        estimate_peak_training_memory(lambda: setup("lora"))
    if break_torch == "changed_internals":
        assert "MemTracker._update_peak_stats" in str(raised.value)
