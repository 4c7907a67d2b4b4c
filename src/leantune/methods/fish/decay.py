"""Weight decay on the selected entries only: the rule :meth:`Fish.before_optimizer_step` applies.

AdamW multiplies every entry of a parameter by ``1 - lr * wd``, selected or not. FISH's own tensors therefore sit
in parameter groups whose torch ``weight_decay`` is 0.0 and which carry :data:`DECAY_KEY` instead; right before
each optimizer step the method decays the selected entries of those tensors itself, towards zero of the effective
weight ``base + delta`` (sparse mode) or of the dense parameter (masked mode), so both modes reach the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

DECAY_KEY = "fish_weight_decay"


@dataclass
class SelectedDecay:
    """How one parameter is decayed: at ``positions`` only (None: every entry); towards zero of
    ``base[base_indices] + param`` when ``base`` is given (sparse values), else of the parameter itself."""

    positions: torch.Tensor | None
    base: torch.Tensor | None = None
    base_indices: torch.Tensor | None = None

    def target(self, flat: torch.Tensor) -> torch.Tensor:
        """The decayed quantity at ``positions``: the entries themselves, or base + value."""
        current = flat if self.positions is None else flat.index_select(0, self.positions)
        if self.base is None:
            return current
        base_indices = self.base_indices if self.positions is None else self.base_indices[self.positions]
        return current + self.base.reshape(-1).index_select(0, base_indices)

    @torch.no_grad()
    def apply(self, param: torch.Tensor, lr: Any, weight_decay: float, decoupled: bool) -> None:
        """One step of decay: decoupled (AdamW's multiply) or as L2 added to the gradient (Adam, SGD, ...)."""
        flat = param.detach().view(-1)
        if not decoupled:  # grad += wd * weight, selected entries only
            grad = param.grad.view(-1)
            if self.positions is None:
                grad.add_(self.target(flat), alpha=weight_decay)
            else:
                grad.index_add_(0, self.positions, self.target(flat) * weight_decay)
        elif self.base is None:  # the multiply AdamW does, selected entries only
            factor = 1 - lr * weight_decay
            if self.positions is None:
                flat.mul_(factor)
            else:
                flat.index_copy_(0, self.positions, flat.index_select(0, self.positions) * factor)
        else:  # sparse values: (base + v) * (1 - lr wd) = base + v - lr wd (base + v)
            change = self.target(flat) * (-lr * weight_decay)
            if self.positions is None:
                flat.add_(change)
            else:
                flat.index_add_(0, self.positions, change)


def is_decoupled(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """Whether ``group``'s weight decay is decoupled (AdamW, or Adam with ``decoupled_weight_decay=True``)."""
    return isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
