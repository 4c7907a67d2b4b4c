"""Routing a call to the weights of its task: one branch per task at one position, chosen per call.

The batch's task arrives as the per-call input ``task`` (:func:`leantune.context.current_task`); a batch whose
task the model was not built for is refused with its name. Modules passed to several tasks' branches (a shared
up-projection) are shared: they train on every task and are saved once.
"""

from __future__ import annotations

import torch
from torch import nn

from leantune.context import current_task
from leantune.methods.base import Branch


class PerTask(Branch):
    """One branch per task; each call runs the branch of the call's task."""

    def __init__(self, branches: dict[str, Branch]) -> None:
        super().__init__()
        kinds = {b.reads_input for b in branches.values()}
        if len(kinds) != 1:
            raise ValueError("PerTask needs branches that all read the input, or all read the output")
        self.reads_input = kinds.pop()
        self.tasks = list(branches)
        self.per_task = nn.ModuleDict(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.per_task[current_task(self.tasks)](x)

    def shared_modules(self) -> set[str]:
        """Names (relative to one task's branch) of modules that every task's branch holds as the same object."""
        first, *others = self.per_task.values()
        return {name for name, module in first.named_modules() if name and others
                and all(other.get_submodule(name) is module for other in others)}
