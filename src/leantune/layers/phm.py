"""Parameterised hypercomplex multiplication (PHM) layers, Compacter's adapter projections.

``y = x W + b`` with ``W = sum_{i=1..n} A_i kron B_i``: ``A_i`` is n x n (the "rule", possibly shared by every
layer), ``B_i`` is (in/n) x (out/n), or ``u_i v_i^T`` of rank ``rank`` when factorised. Parameters: n^3 for the
rules plus n * in * out / n^2 (or n * rank * (in + out) / n) for the ``B_i``, plus ``out`` for the bias.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from leantune.errors import ConfigError
from leantune.layers.adapter import ProjectionFactory


class PHMLinear(nn.Module):
    """A linear map whose weight is a sum of Kronecker products; ``rule`` may be a shared parameter."""

    def __init__(self, in_features: int, out_features: int, n: int, rank: int | None = None,
                 rule: nn.Parameter | None = None, zero_init: bool = False, std: float = 0.01) -> None:
        super().__init__()
        if in_features % n or out_features % n:
            raise ConfigError(f"phm_dim {n} must divide both sizes of a PHM layer ({in_features} -> {out_features})")
        self.n, self.in_features, self.out_features, self.rank = n, in_features, out_features, rank
        self.rule = rule if rule is not None else nn.Parameter(torch.empty(n, n, n).normal_(0, std))
        rows, cols = in_features // n, out_features // n
        if rank is None:
            self.weight_factors = nn.Parameter(torch.empty(n, rows, cols))
            for factor in self.weight_factors.data:  # Compacter's init: Xavier-uniform, gain sqrt(2), per slice
                nn.init.xavier_uniform_(factor, gain=math.sqrt(2))
            self.left = self.right = None
        else:
            self.weight_factors = None
            self.left = nn.Parameter(torch.empty(n, rows, rank).normal_(0, std))
            self.right = nn.Parameter(torch.empty(n, rank, cols).normal_(0, std))
        if zero_init:
            with torch.no_grad():
                (self.weight_factors if rank is None else self.right).zero_()
        self.bias = nn.Parameter(torch.zeros(out_features))

    def factors(self) -> torch.Tensor:
        """The ``B_i`` as one (n, in/n, out/n) tensor."""
        return self.weight_factors if self.rank is None else self.left @ self.right

    def weight(self) -> torch.Tensor:
        """``W = sum_i A_i kron B_i`` as an (in, out) matrix."""
        n, rows, cols = self.n, self.in_features // self.n, self.out_features // self.n
        blocks = torch.einsum("iab,icd->acbd", self.rule, self.factors())  # (n, rows, n, cols)
        return blocks.reshape(n * rows, n * cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight().to(x.dtype) + self.bias.to(x.dtype)


def phm_projection(n: int, rank: int | None = None, shared_rule: nn.Parameter | None = None,
                   device: torch.device | None = None, dtype: torch.dtype | None = None) -> ProjectionFactory:
    """PHM projections for :class:`leantune.layers.adapter.BottleneckAdapter`."""

    def build(in_features: int, out_features: int, zero_init: bool) -> nn.Module:
        return PHMLinear(in_features, out_features, n, rank, shared_rule, zero_init).to(device=device, dtype=dtype)

    return build

