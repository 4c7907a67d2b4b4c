"""The LoRA branch: ``(alpha / r) * B(A(dropout(x)))`` beside a linear projection, ``B`` zero at init."""

from __future__ import annotations

import math

import torch
from torch import nn

from leantune.methods.base import Branch


class LoRABranch(Branch):
    """A low-rank update of one projection; reads the projection's input."""

    reads_input = True

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 like: torch.Tensor) -> None:
        super().__init__()
        self.A = nn.Linear(in_features, r, bias=False, device=like.device, dtype=like.dtype)
        self.B = nn.Linear(r, out_features, bias=False, device=like.device, dtype=like.dtype)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / r
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(self.dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update as an (out, in) matrix."""
        return (self.B.weight @ self.A.weight) * self.scaling
