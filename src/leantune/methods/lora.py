"""LoRA (Hu et al. 2021): a low-rank update ``B @ A`` beside chosen linear projections.

``y = W x + b + (alpha / r) * B(A(dropout(x)))`` with ``B`` initialised to zero, so the wrapped model equals
the base model at init. The branch is ``<projection>.branches.lora`` (:func:`leantune.methods.base.add_branch`),
so the base model's own parameter names never change; ``merge`` folds ``B @ A`` into ``W`` exactly and removes
the branches. Default targets: the query and value projections of self- and cross-attention, or the fused
query-key-value projection where a family has one (peft's defaults). With several tasks, ``sharing="multiple"``
keeps one A/B pair per task (VL-Adapter's Multiple LoRA); ``merge`` then folds the pair of the task it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leantune.backbones import Backbone, linear_in_out
from leantune.config import ConfigError, check_choice, check_positive, check_range, option
from leantune.context import CallInput
from leantune.errors import UnsupportedMethodError, UnsupportedModelError
from leantune.layers.lora import LoRABranch
from leantune.layers.routing import PerTask
from leantune.methods.base import AttachContext, TuningMethod, add_branch, remove_branch, resolve_module_names
from leantune.methods.sharing import TaskSharingConfig
from leantune.registry import register

BRANCH = "lora"
# Roles adapted by default; where a block has a fused projection instead, FUSED_DEFAULT_ROLES.
DEFAULT_ROLES = ("query", "value", "cross_query", "cross_value")
FUSED_DEFAULT_ROLES = ("qkv",)


@dataclass
class LoRAConfig(TaskSharingConfig):
    """Low-rank adaptation of linear projections."""

    method = "lora"

    r: int = option(8, "Rank of the update B @ A.")
    alpha: float = option(8.0, "Scaling numerator: the update is multiplied by alpha / r (peft's lora_alpha).")
    dropout: float = option(0.0, "Dropout on the LoRA branch's input.")
    target_modules: list[str] | None = option(
        None,
        "Module names (exact or dotted suffix, as in peft) to adapt; None = the query and value projections of "
        "self- and cross-attention from the architecture map (the fused qkv projection where there is one), as "
        "peft's defaults.",
    )
    train_biases: str | bool = option(
        "none", "all = also train every bias of the model (LoRA + BitFit: the LST paper's and VL-Adapter's LoRA); "
                "none = only A and B. true/false are accepted for all/none.")

    def validate(self) -> None:
        super().validate()
        check_positive(self, "r", "alpha")
        check_range(self, "dropout", 0.0, 1.0)
        if isinstance(self.train_biases, bool):
            self.train_biases = "all" if self.train_biases else "none"
        check_choice(self, "train_biases", ("none", "all"))


@register
class LoRA(TuningMethod):
    name = "lora"
    config_class = LoRAConfig
    mergeable = True
    identity_at_init = True
    # Measured (docs/defaults.md): the best validation accuracy of a learning-rate sweep on the embedded default
    # (0.748 at 3e-3; 0.640 at 1e-3, 0.720 at 1e-2); on BBC News within noise of the best (0.943; 9e-3: 0.948,
    # 1e-3: 0.684).
    default_learning_rate = 3e-3

    def declared_inputs(self) -> tuple[CallInput, ...]:
        return self.config.task_input()

    def attach(self, model: nn.Module, backbone: Backbone, context: AttachContext) -> None:
        self.targets = self._target_names(model, backbone)
        config: LoRAConfig = self.config
        for name in self.targets:
            module = model.get_submodule(name)
            in_features, out_features = linear_in_out(module)
            shape = (in_features, out_features, config.r, config.alpha, config.dropout, module.weight)
            add_branch(module, BRANCH, LoRABranch(*shape) if config.sharing == "single"
                       else PerTask({task: LoRABranch(*shape) for task in config.tasks}))
        if config.train_biases == "all":
            for param_name, param in model.named_parameters():
                if param_name.rsplit(".", 1)[-1] == "bias":
                    param.requires_grad_(True)

    def _target_names(self, model: nn.Module, backbone: Backbone) -> list[str]:
        if self.config.target_modules is None:
            roles = DEFAULT_ROLES if backbone.modules_for_role("query") else FUSED_DEFAULT_ROLES
            names = [n for role in roles for n, _ in backbone.modules_for_role(role)]
            if not names:
                raise UnsupportedModelError(f"LoRA found no query/value (or fused qkv) projections in "
                                            f"{type(model).__name__}; set LoRAConfig.target_modules")
        else:
            names = resolve_module_names(model, self.config.target_modules, "target_modules", self.config)
        for name in names:
            try:
                linear_in_out(model.get_submodule(name))
            except UnsupportedModelError:
                raise ConfigError(
                    f"LoRAConfig.target_modules: {name!r} is a {type(model.get_submodule(name)).__name__}, "
                    "not a linear projection"
                ) from None
        return names

    def merge(self, tuned, task: str | None = None) -> nn.Module:
        """Fold the update into the weights; with one LoRA per task, ``task`` names the one to fold."""
        config: LoRAConfig = self.config
        if config.sharing != "single" and task not in config.tasks:
            raise UnsupportedMethodError(f"this model has one LoRA per task ({', '.join(config.tasks)}); merge "
                                         f"folds one of them: call merge(task=<name>), got {task!r}")
        model = tuned.base_model
        with torch.no_grad():
            for name in self.targets:
                module = model.get_submodule(name)
                branch = remove_branch(module, BRANCH)
                delta = (branch if config.sharing == "single" else branch.per_task[task]).delta_weight()
                module.weight += delta.T if type(module).__name__ == "Conv1D" else delta
        return model
