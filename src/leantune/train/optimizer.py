"""The optimizer of a run: AdamW over the method's parameter groups, new modules at their own learning rate."""

from __future__ import annotations

from typing import Any

import torch

from leantune.api import TunedModel
from leantune.train.config import TrainConfig


def parameter_groups(model: TunedModel, config: TrainConfig) -> list[dict[str, Any]]:
    """The method's parameter groups (``method.parameter_groups``); with ``config.new_module_learning_rate``, each
    group's parameters of modules that start from scratch (:meth:`TunedModel.new_module_parameters`) moved into a
    copy of the group at that learning rate. Empty groups are left out."""
    groups = model.method.parameter_groups(model, config.weight_decay)
    if config.new_module_learning_rate is None:
        return groups
    new = {id(p) for p in model.new_module_parameters()}
    split = []
    for group in groups:
        own = [p for p in group["params"] if id(p) not in new]
        moved = [p for p in group["params"] if id(p) in new]
        split += [{**group, "params": own}] if own else []
        split += [{**group, "params": moved, "lr": config.new_module_learning_rate}] if moved else []
    return split


def make_optimizer(model: TunedModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the run's learning rate, betas and epsilon over :func:`parameter_groups`."""
    return torch.optim.AdamW(parameter_groups(model, config), lr=config.learning_rate, betas=config.adam_betas,
                             eps=config.adam_eps)
