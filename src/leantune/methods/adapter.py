"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): ``h + up(act(down(h)))``, d -> d/r -> d.

An adapter is added to a sub-layer's output, before its dropout and residual add (the sub-layer outputs the
architecture map records): ``houlsby`` places one after self-attention and one after the feed-forward
sub-layer, ``pfeiffer`` only after the feed-forward sub-layer. With ``zero_init_up`` the up-projection
starts at zero and the wrapped model equals the base model at init.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from leantune.backbones import Backbone, linear_in_out
from leantune.config import MethodConfig, check_choice, check_positive, option
from leantune.layers.adapter import ACTIVATIONS, BottleneckAdapter, linear_projection
from leantune.methods.base import AttachContext, TuningMethod, add_branch
from leantune.registry import register

BRANCH = "adapter"
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
        check_positive(self, "reduction_factor")
        check_choice(self, "activation", tuple(ACTIVATIONS))
        check_choice(self, "placement", tuple(PLACEMENT_ROLES))


@register
class Adapter(TuningMethod):
    name = "adapter"
    config_class = AdapterConfig
    default_learning_rate = 1e-3

    def attach(self, model: nn.Module, backbone: Backbone, context: AttachContext) -> None:
        config: AdapterConfig = self.config
        for role in PLACEMENT_ROLES[config.placement]:
            for _, module in backbone.modules_for_role(role):
                _, hidden_size = linear_in_out(module)
                adapter = BottleneckAdapter(hidden_size, max(1, hidden_size // config.reduction_factor),
                                            config.activation, linear_projection(module.weight),
                                            zero_init_up=config.zero_init_up)
                add_branch(module, BRANCH, adapter)
        if config.train_norms:
            for _, norm in backbone.norm_modules():
                norm.requires_grad_(True)
