"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): ``h + up(act(down(h)))``, d -> d/r -> d.

An adapter is inserted on the output of a sub-layer's output projection (before the residual add), found
through the architecture map: ``houlsby`` places one after self-attention and one after the feed-forward
sub-layer, ``pfeiffer`` only after the feed-forward sub-layer. With ``zero_init_up`` the up-projection
starts at zero and the wrapped model equals the base model at init.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leantune.backbones import Backbone, linear_in_out
from leantune.config import MethodConfig, check_choice, check_positive, option
from leantune.methods.base import AttachContext, TuningMethod, add_output_hook
from leantune.registry import register

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
PLACEMENT_ROLES = {"houlsby": ("attention_output", "ffn_output"), "pfeiffer": ("ffn_output",)}


@dataclass
class AdapterConfig(MethodConfig):
    """Bottleneck adapters in every block."""

    method = "adapter"

    reduction_factor: int = option(16, "Bottleneck width is hidden_size // reduction_factor.")
    activation: str = option("relu", f"Non-linearity in the bottleneck: {', '.join(ACTIVATIONS)}.")
    placement: str = option(
        "houlsby", "houlsby = after self-attention and after feed-forward; pfeiffer = after feed-forward only."
    )
    zero_init_up: bool = option(True, "Initialise the up-projection to zero (the adapter starts as the identity).")
    train_norms: bool = option(False, "Also train every LayerNorm/RMSNorm (the LST paper's adapter baseline).")

    def validate(self) -> None:
        super().validate()
        check_positive(self, "reduction_factor")
        check_choice(self, "activation", tuple(ACTIVATIONS))
        check_choice(self, "placement", tuple(PLACEMENT_ROLES))


class BottleneckAdapter(nn.Module):
    """``up(act(down(h)))``; the hook adds it to ``h``."""

    reads_input = False

    def __init__(self, hidden_size: int, config: AdapterConfig, like: torch.Tensor) -> None:
        super().__init__()
        bottleneck = max(1, hidden_size // config.reduction_factor)
        self.down = nn.Linear(hidden_size, bottleneck, device=like.device, dtype=like.dtype)
        self.act = ACTIVATIONS[config.activation]()
        self.up = nn.Linear(bottleneck, hidden_size, device=like.device, dtype=like.dtype)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        if config.zero_init_up:
            nn.init.zeros_(self.up.weight)
        else:
            nn.init.normal_(self.up.weight, std=0.02)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))


@register
class Adapter(TuningMethod):
    name = "adapter"
    config_class = AdapterConfig

    def attach(self, model: nn.Module, backbone: Backbone, context: AttachContext) -> None:
        for role in PLACEMENT_ROLES[self.config.placement]:
            for _, module in backbone.modules_for_role(role):
                _, hidden_size = linear_in_out(module)
                add_output_hook(module, "adapter", BottleneckAdapter(hidden_size, self.config, module.weight))
        if self.config.train_norms:
            for _, norm in backbone.norm_modules():
                norm.requires_grad_(True)
