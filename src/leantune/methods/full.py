"""Full fine-tuning: every parameter trains. The baseline every other method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from leantune.backbones import Backbone
from leantune.config import MethodConfig
from leantune.methods.base import AttachContext, TuningMethod
from leantune.registry import register


@dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning has no options of its own."""

    method = "full"


@register
class Full(TuningMethod):
    name = "full"
    config_class = FullConfig
    mergeable = True
    identity_at_init = True
    default_learning_rate = 5e-5

    def attach(self, model: nn.Module, backbone: Backbone, context: AttachContext) -> None:
        model.requires_grad_(True)

    def merge(self, tuned) -> nn.Module:
        return tuned.base_model
