"""The interface every tuning method implements, and helpers methods share."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from leantune.backbones import Backbone
from leantune.config import MethodConfig
from leantune.errors import UnsupportedMethodError

if TYPE_CHECKING:
    from leantune.api import TunedModel


@dataclass
class AttachContext:
    """What ``attach`` may need beyond the model.

    ``data``: task batches (dicts of tensors the model accepts, labels included) for methods initialised
    from data, such as a Fisher-guided initialisation or mask. ``saved``: when ``load`` rebuilds a tuned
    model, the delta about to be restored; a method whose added tensors have data-dependent shapes takes the
    shapes from it, and needs no ``data`` because every value it adds is overwritten.
    """

    data: Iterable[dict[str, torch.Tensor]] | None = None
    saved: dict[str, torch.Tensor] | None = None

    @property
    def loading(self) -> bool:
        return self.saved is not None


class TuningMethod:
    """How one method attaches to a model.

    ``wrap`` freezes every base parameter, then calls :meth:`attach`, which inserts the method's modules
    and marks what it trains (new modules are trainable by default). Modules the method owns outside the
    base model (a soft prompt, a side network) are returned by ``attach`` and kept as
    ``TunedModel.method_modules``. Every parameter or buffer ``attach`` adds, and every trainable
    parameter, is part of the saved delta.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    merge_unsupported_reason: ClassVar[str] = "this method adds computation that cannot be folded into the weights"

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    def attach(self, model: nn.Module, backbone: Backbone, context: AttachContext) -> nn.Module | None:
        """Insert the method into ``model`` (in place); return modules the tuned model owns outside it."""
        raise NotImplementedError

    def forward(self, tuned: TunedModel, *args: Any, **kwargs: Any) -> Any:
        """The tuned model's forward; by default the (modified) base model's."""
        return tuned.base_model(*args, **kwargs)

    def generate(self, tuned: TunedModel, *args: Any, **kwargs: Any) -> Any:
        """Generation for generative models; by default the (modified) base model's ``generate``."""
        return tuned.base_model.generate(*args, **kwargs)

    def merge(self, tuned: TunedModel) -> nn.Module:
        """Fold the delta into the base weights and return the plain base model, where that is exact."""
        raise UnsupportedMethodError(f"method {self.name!r} cannot be merged: {self.merge_unsupported_reason}")


def add_output_hook(module: nn.Module, child_name: str, child: nn.Module) -> Any:
    """Register ``child`` under ``module`` and make ``module``'s output ``output + child(input or output)``.

    The child decides what it reads: a child with ``reads_input = True`` (LoRA) gets the module's input,
    otherwise (an adapter) the module's output. Returns the hook handle.
    """
    module.add_module(child_name, child)

    def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        branch = getattr(mod, child_name)
        return output + branch(args[0] if branch.reads_input else output)

    return module.register_forward_hook(hook)


def match_module_names(model: nn.Module, patterns: list[str]) -> dict[str, list[str]]:
    """For each pattern, the module names equal to it or ending with ``"." + pattern`` (peft's rule)."""
    names = [n for n, _ in model.named_modules() if n]
    return {p: [n for n in names if n == p or n.endswith("." + p)] for p in patterns}


def resolve_module_names(model: nn.Module, patterns: list[str], field_name: str, config: MethodConfig) -> list[str]:
    """Module names matched by ``patterns``; a pattern matching nothing raises ``ValueError`` naming the field."""
    matches = match_module_names(model, patterns)
    missing = [p for p, found in matches.items() if not found]
    if missing:
        raise ValueError(
            f"{type(config).__name__}.{field_name}: no module named {', '.join(map(repr, missing))} "
            f"in {type(model).__name__}"
        )
    return sorted({n for found in matches.values() for n in found})
