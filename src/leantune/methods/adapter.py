"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021; VL-Adapter's sharing variants).

``h + up(act(down(h)))``, d -> d/r -> d, added to a sub-layer's output before its dropout and residual add.
Placement: ``houlsby`` (after self-attention and feed-forward), ``pfeiffer`` (feed-forward only) or ``all``
(also after cross-attention: VL-Adapter's 30 positions in BART-base, 60 in T5-base). With several tasks:
``single`` (one adapter for all), ``multiple`` (one per task) or ``half`` (one projection shared by every task,
the up-projection by default, the other per task). With ``zero_init_up`` the up-projection starts at zero and
the wrapped model equals the base model at init (VL-Adapter initialises it N(0, 0.02): ``zero_init_up=False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leantune.backbones import Backbone, linear_in_out
from leantune.config import check_choice, check_positive, option
from leantune.context import CallInput
from leantune.layers.adapter import ACTIVATIONS, BottleneckAdapter, ProjectionFactory, linear_projection
from leantune.layers.routing import PerTask
from leantune.methods.base import AttachContext, Branch, TuningMethod, add_branch
from leantune.methods.sharing import PLACEMENT_SUBLAYERS, SHARING, TaskSharingConfig, placement_positions
from leantune.registry import register

BRANCH = "adapter"


@dataclass
class AdapterConfig(TaskSharingConfig):
    """Bottleneck adapters in every block, for one task or several."""

    method = "adapter"

    reduction_factor: int = option(16, "Bottleneck width is hidden_size // reduction_factor.")
    activation: str = option("relu", f"Non-linearity in the bottleneck: {', '.join(ACTIVATIONS)}.")
    placement: str = option(
        "houlsby", "houlsby = after self-attention and after feed-forward; pfeiffer = after feed-forward only; "
                   "all = after self-attention, cross-attention and feed-forward (VL-Adapter).")
    zero_init_up: bool = option(True, "Initialise the up-projection to zero (the adapter starts as the identity).")
    train_norms: bool = option(False, "Also train every LayerNorm/RMSNorm (the LST paper's and VL-Adapter's "
                                      "adapter setting).")
    sharing: str = option("single", "single = one adapter for every task; multiple = one per task; half = one "
                                    "projection shared by every task (see half_shared), the other per task.")
    half_shared: str = option("up", "With sharing=half: which projection every task shares, up or down.")

    def validate(self) -> None:
        super().validate()
        check_positive(self, "reduction_factor")
        check_choice(self, "activation", tuple(ACTIVATIONS))
        check_choice(self, "placement", tuple(PLACEMENT_SUBLAYERS))
        check_choice(self, "half_shared", ("up", "down"))

    @classmethod
    def sharing_choices(cls) -> tuple[str, ...]:
        return SHARING


@register
class Adapter(TuningMethod):
    name = "adapter"
    config_class = AdapterConfig
    identity_at_init = True
    # Measured (docs/defaults.md): the best validation accuracy of a learning-rate sweep on the embedded default
    # (0.758 at 3e-3; 0.708 at 1e-3, 0.740 at 1e-2); on BBC News within noise of the best (0.910; 9e-3: 0.925,
    # 1e-3: 0.769).
    default_learning_rate = 3e-3

    def declared_inputs(self) -> tuple[CallInput, ...]:
        return self.config.task_input()

    def projection(self, like: torch.Tensor) -> ProjectionFactory:
        """How the adapter's projections are built (Compacter replaces them with PHM layers)."""
        return linear_projection(like)

    def attach(self, model: nn.Module, backbone: Backbone, context: AttachContext) -> None:
        config: AdapterConfig = self.config
        for _, _, _, module in placement_positions(backbone, config.placement):
            add_branch(module, BRANCH, self.position_adapter(linear_in_out(module)[1], module.weight))
        if config.train_norms:
            for _, norm in backbone.norm_modules():
                norm.requires_grad_(True)

    def position_adapter(self, hidden: int, like: torch.Tensor) -> Branch:
        """The adapter(s) of one position, routed by task unless one adapter serves every task."""
        config: AdapterConfig = self.config
        bottleneck = max(1, hidden // config.reduction_factor)
        projection = self.projection(like)

        def adapter(down: nn.Module | None = None, up: nn.Module | None = None) -> BottleneckAdapter:
            return BottleneckAdapter(hidden, bottleneck, config.activation, projection, config.zero_init_up,
                                     down=down, up=up)

        if config.sharing == "single":
            return adapter()
        shared: dict[str, nn.Module] = {}
        if config.sharing == "half":
            shared = {"up": projection(bottleneck, hidden, config.zero_init_up)} if config.half_shared == "up" \
                else {"down": projection(hidden, bottleneck, False)}
        return PerTask({task: adapter(**shared) for task in config.tasks})
