"""Linear probe: train only the task head on the frozen model (a baseline every method should beat).

The model's fresh task head (``classifier``, ``score``, ...) trains; nothing is inserted and every base weight
stays frozen, so the saved delta is the head alone and ``merge`` returns the model as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from leantune.backbones import Backbone
from leantune.config import MethodConfig
from leantune.errors import ConfigError
from leantune.methods.base import AttachContext, TuningMethod
from leantune.registry import register


@dataclass
class ProbeConfig(MethodConfig):
    """Only the task head trains (``train_head`` must stay True); ``modules_to_save`` may add modules."""

    method = "probe"

    def validate(self) -> None:
        if not self.train_head:
            raise ConfigError("ProbeConfig.train_head=False leaves nothing to train: the probe trains the task head")


@register
class LinearProbe(TuningMethod):
    name = "probe"
    config_class = ProbeConfig
    mergeable = True
    identity_at_init = False  # the head is fresh: what it predicts at init is no one's baseline
    # Swept on the embedded default's schedule (200 AdamW steps of 32 tweets, 6% warm-up, linear decay) with the
    # head on cached pooler outputs of all-MiniLM-L6-v2, 3 seeds: validation accuracy 0.486 at 3e-4, 0.526 at 1e-3,
    # 0.601 at 3e-3, 0.619 at 1e-2, 0.649 at 3e-2, 0.668 at 0.1, 0.666 at 0.3, 0.660 at 1.0.
    default_learning_rate = 0.1

    def unsupported_reason(self, backbone: Backbone) -> str | None:
        if not backbone.task_heads():
            return (f"the probe trains only a task head, and {type(backbone.model).__name__} has none (load the "
                    "model with a classification head, e.g. AutoModelForSequenceClassification)")
        return None

    def attach(self, model: nn.Module, backbone: Backbone, context: AttachContext) -> None:
        """Nothing to insert: ``wrap`` trains the task head (and ``modules_to_save``) and freezes the rest."""

    def merge(self, tuned: nn.Module) -> nn.Module:
        return tuned.base_model
