"""LoRA (Hu et al. 2021): a low-rank update ``B @ A`` beside chosen linear projections.

``y = W x + b + (alpha / r) * B(A(dropout(x)))`` with ``B`` initialised to zero, so the wrapped model equals
the base model at init. The branch lives as a child module ``lora`` of each target projection and is added
by a forward hook, so the base model's own parameter names never change; ``merge`` folds ``B @ A`` into
``W`` exactly and removes the branches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from leantune.backbones import Backbone, linear_in_out
from leantune.config import MethodConfig, check_positive, option
from leantune.errors import UnsupportedModelError
from leantune.methods.base import AttachContext, TuningMethod, add_output_hook, resolve_module_names
from leantune.registry import register


@dataclass
class LoRAConfig(MethodConfig):
    """Low-rank adaptation of linear projections."""

    method = "lora"

    r: int = option(8, "Rank of the update B @ A.")
    alpha: float = option(8.0, "Scaling numerator: the update is multiplied by alpha / r (peft's lora_alpha).")
    dropout: float = option(0.0, "Dropout on the LoRA branch's input.")
    target_modules: list[str] | None = option(
        None,
        "Module names (exact or dotted suffix, as in peft) to adapt; None = the family's query and value "
        "projections from the architecture map, cross-attention included (c_attn for GPT-2), as peft's defaults.",
    )
    train_biases: bool = option(False, "Also train every bias of the model (LoRA + BitFit, as in the LST paper).")

    def validate(self) -> None:
        super().validate()
        check_positive(self, "r", "alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")


class LoRABranch(nn.Module):
    """``(alpha / r) * B(A(dropout(x)))`` for one projection."""

    reads_input = True

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, like: torch.Tensor) -> None:
        super().__init__()
        self.A = nn.Linear(in_features, config.r, bias=False, device=like.device, dtype=like.dtype)
        self.B = nn.Linear(config.r, out_features, bias=False, device=like.device, dtype=like.dtype)
        self.dropout = nn.Dropout(config.dropout)
        self.scaling = config.alpha / config.r
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(self.dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update as an (out, in) matrix."""
        return (self.B.weight @ self.A.weight) * self.scaling


@register
class LoRA(TuningMethod):
    name = "lora"
    config_class = LoRAConfig

    def attach(self, model: nn.Module, backbone: Backbone, context: AttachContext) -> None:
        self.targets = self._target_names(model, backbone)
        self.hooks = []
        for name in self.targets:
            module = model.get_submodule(name)
            in_features, out_features = linear_in_out(module)
            branch = LoRABranch(in_features, out_features, self.config, module.weight)
            self.hooks.append(add_output_hook(module, "lora", branch))
        if self.config.train_biases:
            for param_name, param in model.named_parameters():
                if param_name.rsplit(".", 1)[-1] == "bias":
                    param.requires_grad_(True)

    def _target_names(self, model: nn.Module, backbone: Backbone) -> list[str]:
        if self.config.target_modules is None:
            names = [n for role in backbone.arch.lora_targets for n, _ in backbone.modules_for_role(role)]
        else:
            names = resolve_module_names(model, self.config.target_modules, "target_modules", self.config)
        for name in names:
            try:
                linear_in_out(model.get_submodule(name))
            except UnsupportedModelError:
                raise ValueError(
                    f"LoRAConfig.target_modules: {name!r} is a {type(model.get_submodule(name)).__name__}, "
                    "not a linear projection"
                ) from None
        return names

    def merge(self, tuned) -> nn.Module:
        model = tuned.base_model
        with torch.no_grad():
            for name, hook in zip(self.targets, self.hooks):
                module = model.get_submodule(name)
                delta = module.lora.delta_weight()
                module.weight += delta.T if type(module).__name__ == "Conv1D" else delta
                hook.remove()
                del module.lora
        return model
