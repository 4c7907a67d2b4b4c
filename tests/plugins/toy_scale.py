"""A complete tuning method defined outside leantune: a learned per-channel scale on every block's output.

Each block's feed-forward output projection ``h = W x + b`` becomes ``h * (1 + s)``, with one trainable ``s`` per
channel, zero at init (so the tuned model starts equal to the base model). ``(W x + b) * (1 + s)`` is the linear
layer with weight ``diag(1 + s) W`` and bias ``(1 + s) * b``, so ``merge`` folds it in exactly.

leantune finds it as a plugin: ``LEANTUNE_PLUGINS=toy_scale`` with this folder on ``PYTHONPATH``
(docs/adding_a_method.md walks through it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leantune.backbones import Backbone, linear_in_out
from leantune.config import MethodConfig, check_range, option
from leantune.errors import ConfigError
from leantune.methods.base import AttachContext, Branch, TuningMethod, add_branch, remove_branch
from leantune.registry import register

BRANCH = "toy_scale"
SUBLAYER_ROLES = {"feed_forward": "ffn_output", "attention": "attention_output"}


@dataclass
class ToyScaleConfig(MethodConfig):
    """A learned per-channel scale on sub-layer outputs."""

    method = "toy_scale"

    sublayers: list[str] = option(["feed_forward"], "Sub-layers whose output is scaled: feed_forward, attention.")
    init_scale: float = option(0.0, "Initial s of every channel (the output is h * (1 + s)); 0 = identity at init.")

    def validate(self) -> None:
        unknown = [s for s in self.sublayers if s not in SUBLAYER_ROLES]
        if unknown or not self.sublayers:
            raise ConfigError(f"ToyScaleConfig.sublayers must be a non-empty list of {', '.join(SUBLAYER_ROLES)}; "
                              f"got {self.sublayers!r}")
        check_range(self, "init_scale", -1.0, 1.0)


class ChannelScale(Branch):
    """``output * s``, added to the output: the module's output becomes ``output * (1 + s)``."""

    def __init__(self, width: int, init: float, like: torch.Tensor) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((width,), init, dtype=like.dtype, device=like.device))

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        return output * self.scale


@register
class ToyScale(TuningMethod):
    name = "toy_scale"
    config_class = ToyScaleConfig
    mergeable = True
    identity_at_init = True
    default_learning_rate = 2e-2
    budget_options = {"sublayers": ["feed_forward", "attention"]}

    def unsupported_reason(self, backbone: Backbone) -> str | None:
        for sublayer in self.config.sublayers:
            for name, module in backbone.modules_for_role(SUBLAYER_ROLES[sublayer]):
                if not isinstance(module, nn.Linear):
                    return f"toy_scale folds into nn.Linear output projections; {name} is a {type(module).__name__}"
        return None

    def attach(self, model: nn.Module, backbone: Backbone, context: AttachContext) -> None:
        self.targets = [name for sublayer in self.config.sublayers
                        for name, _ in backbone.modules_for_role(SUBLAYER_ROLES[sublayer])]
        for name in self.targets:
            module = model.get_submodule(name)
            _, width = linear_in_out(module)
            add_branch(module, BRANCH, ChannelScale(width, self.config.init_scale, module.weight))

    def merge(self, tuned: nn.Module) -> nn.Module:
        model = tuned.base_model
        with torch.no_grad():
            for name in self.targets:
                module = model.get_submodule(name)
                factor = 1 + remove_branch(module, BRANCH).scale
                module.weight.mul_(factor[:, None])
                if module.bias is not None:
                    module.bias.mul_(factor)
        return model
