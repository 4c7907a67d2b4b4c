"""What tests/test_fish_ddp.py and its torchrun worker share: model, data, optimizer, step counts."""

from __future__ import annotations

import torch
from tiny import make_inputs, make_model

import leantune

STEPS = 4
MERGE_EVERY = 3
GLOBAL_BATCH = 4
KEEP_RATIO = 0.02


def global_batch(step: int) -> dict[str, torch.Tensor]:
    return make_inputs("bert", batch=GLOBAL_BATCH, seed=100 + step)


def wrapped(mode: str, mask_path: str, **options) -> leantune.TunedModel:
    """The tiny BERT classifier with the saved mask, in eval mode (no dropout, so ranks match one process)."""
    config = leantune.make_config("fish", mode=mode, mask_path=mask_path, keep_ratio=KEEP_RATIO, **options)
    return leantune.wrap(make_model("bert"), config).eval()


def optimizer_for(tuned: leantune.TunedModel) -> torch.optim.Optimizer:
    """AdamW over the method's parameter groups (fish decays its selected entries in ``before_optimizer_step``)."""
    return torch.optim.AdamW(tuned.method.parameter_groups(tuned, weight_decay=0.01), lr=1e-2)


def optimizer_step(tuned: leantune.TunedModel, optimizer: torch.optim.Optimizer) -> None:
    """The method's work before the step, the step, and clearing the gradients."""
    tuned.method.before_optimizer_step(optimizer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
