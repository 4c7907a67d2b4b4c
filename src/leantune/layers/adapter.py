"""The bottleneck adapter ``up(act(down(h)))``, d -> m -> d, added to a sub-layer's output.

The two projections are any modules mapping ``(..., in)`` to ``(..., out)``: ``nn.Linear`` (Houlsby/Pfeiffer
adapters), :class:`leantune.layers.phm.PHMLinear` (Compacter), or weights generated per call (Hyperformer).
:func:`linear_projection` and :func:`leantune.layers.phm.phm_projection` build them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from leantune.methods.base import Branch

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "gelu_new": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
# (in_features, out_features, zero_init) -> a projection module
ProjectionFactory = Callable[[int, int, bool], nn.Module]


def linear_projection(like: torch.Tensor, std: float = 0.02) -> ProjectionFactory:
    """Plain ``nn.Linear`` projections: N(0, std) weights (zeros where asked), zero biases."""

    def build(in_features: int, out_features: int, zero_init: bool) -> nn.Module:
        layer = nn.Linear(in_features, out_features, device=like.device, dtype=like.dtype)
        if zero_init:
            nn.init.zeros_(layer.weight)
        else:
            nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)
        return layer

    return build


class BottleneckAdapter(Branch):
    """``up(act(down(h)))``; as a branch it is added to the output it reads."""

    reads_input = False

    def __init__(self, hidden_size: int, bottleneck: int, activation: str, projection: ProjectionFactory,
                 zero_init_up: bool = True, down: nn.Module | None = None, up: nn.Module | None = None) -> None:
        """``down``/``up`` given: use those modules (shared between adapters), else build them."""
        super().__init__()
        self.down = down if down is not None else projection(hidden_size, bottleneck, False)
        self.act = ACTIVATIONS[activation]()
        self.up = up if up is not None else projection(bottleneck, hidden_size, zero_init_up)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))
