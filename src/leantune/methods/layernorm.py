"""LayerNorm tuning: train only the LayerNorm/RMSNorm scales (and shifts) of the model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from leantune.backbones import Backbone
from leantune.config import MethodConfig, option
from leantune.errors import UnsupportedMethodError
from leantune.methods.base import AttachContext, TuningMethod
from leantune.registry import register


@dataclass
class LayerNormConfig(MethodConfig):
    """Train the norms' weights; optionally their biases too."""

    method = "layernorm"

    include_bias: bool = option(True, "Also train the norms' biases (RMSNorm has none).")


@register
class LayerNormTuning(TuningMethod):
    name = "layernorm"
    config_class = LayerNormConfig
    mergeable = True
    identity_at_init = True
    default_learning_rate = 1e-3

    def attach(self, model: nn.Module, backbone: Backbone, context: AttachContext) -> None:
        norms = backbone.norm_modules()
        if not norms:
            raise UnsupportedMethodError(f"{type(model).__name__} has no LayerNorm or RMSNorm module to tune")
        for _, norm in norms:
            for name, param in norm.named_parameters(recurse=False):
                if name != "bias" or self.config.include_bias:
                    param.requires_grad_(True)

    def merge(self, tuned) -> nn.Module:
        return tuned.base_model
