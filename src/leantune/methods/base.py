"""The interface every tuning method implements: how it attaches, and the facts the rest of leantune reads.

A method is one class registered with :func:`leantune.registry.register`. Besides ``attach`` (and optionally
``forward``, ``generate``, ``merge``) it declares, as class attributes or small methods, everything the trainer,
``compare``, ``bench``, ``inspect`` and the tests need to know about it, so adding a method touches no other file:

``mergeable``              ``merge()`` folds the delta into the base weights exactly
``identity_at_init``       with its default options, the wrapped model's outputs equal the base model's
``call_inputs``            extra keywords it takes from every forward/generate call (:mod:`leantune.context`)
``default_learning_rate``  the trainer's learning rate when the user sets none
``budget_options``         options for short CPU budgets (the embedded default, ``compare``)
``needs_data()``           whether ``attach`` reads task data (``wrap(..., data=batches)``)
``unsupported_reason()``   why the method cannot attach to a backbone, or ``None``
``parameter_groups()``     the optimizer's parameter groups (default: no weight decay on biases and norms)
``before_optimizer_step()`` work a method does right before each optimizer step (FISH's selected-entry decay)
``ddp_comm_hook()``        a DDP communication hook and its state, when the method communicates less than DDP

Branches: a method adds computation beside or after an existing module with :func:`add_branch`. Several named
branches may sit on one module (``<module>.branches.<name>``), each saved under that stable name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from leantune.backbones import Backbone, is_norm
from leantune.config import ConfigError, MethodConfig
from leantune.context import CallInput
from leantune.errors import UnsupportedMethodError

if TYPE_CHECKING:
    from leantune.api import TunedModel

BRANCHES = "branches"


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
    """How one method attaches to a model, and what the rest of leantune needs to know about it.

    ``wrap`` freezes every base parameter, then calls :meth:`attach`, which inserts the method's modules
    and marks what it trains (new modules are trainable by default). Modules the method owns outside the
    base model (a soft prompt, a side network) are returned by ``attach`` and kept as
    ``TunedModel.method_modules``. Every parameter or buffer ``attach`` adds, and every trainable
    parameter, is part of the saved delta.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = False
    merge_unsupported_reason: ClassVar[str] = "this method adds computation that cannot be folded into the weights"
    call_inputs: ClassVar[tuple[CallInput, ...]] = ()
    default_learning_rate: ClassVar[float] = 3e-4
    budget_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    # --- facts ------------------------------------------------------------------------------------------------
    def needs_data(self) -> bool:
        """True when ``attach`` initialises from task data (``AttachContext.data``) with this config."""
        return False

    def unsupported_reason(self, backbone: Backbone) -> str | None:
        """Why this method cannot attach to ``backbone`` (one sentence), or ``None`` when it can."""
        return None

    def declared_inputs(self) -> tuple[CallInput, ...]:
        """The per-call inputs this method (with this config) takes from forward/generate calls."""
        return self.call_inputs

    # --- attaching and running ----------------------------------------------------------------------------
    def attach(self, model: nn.Module, backbone: Backbone, context: AttachContext) -> nn.Module | None:
        """Insert the method into ``model`` (in place); return modules the tuned model owns outside it."""
        raise NotImplementedError

    def forward(self, tuned: TunedModel, *args: Any, **kwargs: Any) -> Any:
        """The tuned model's forward; by default the (modified) base model's."""
        return tuned.base_model(*args, **kwargs)

    def generate(self, tuned: TunedModel, *args: Any, **kwargs: Any) -> Any:
        """Generation for generative models; by default the (modified) base model's ``generate``."""
        return tuned.base_model.generate(*args, **kwargs)

    def merge(self, tuned: TunedModel, **options: Any) -> nn.Module:
        """Fold the delta into the base weights and return the plain base model, where that is exact."""
        raise UnsupportedMethodError(f"method {self.name!r} cannot be merged: {self.merge_unsupported_reason}")

    # --- training ------------------------------------------------------------------------------------------
    def parameter_groups(self, tuned: TunedModel, weight_decay: float) -> list[dict[str, Any]]:
        """Trainable parameters as optimizer groups: biases, norm parameters and vectors get no weight decay."""
        return decay_groups(tuned, weight_decay)

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Called by the trainer right before every ``optimizer.step()`` (after clipping)."""

    def ddp_comm_hook(self, tuned: TunedModel) -> tuple[Any, Callable] | None:
        """``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``, or ``None`` for DDP's own."""
        return None


def decay_groups(tuned: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups: biases, norm parameters and 0/1-d tensors get no weight decay."""
    norm_params = {id(p) for m in tuned.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in tuned.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or id(p) in norm_params or p.ndim < 2 else decay).append(p)
    groups = ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


# --- branches ---------------------------------------------------------------------------------------------------
class Branch(nn.Module):
    """Computation added to a module's output by :func:`add_branch`.

    ``reads_input = True`` (LoRA): the branch gets the module's input and its result is added to the output.
    Otherwise (an adapter) it gets the output so far and its result is added to it. Branches of one module run
    in the order they were added, each seeing the output as the earlier ones left it.
    """

    reads_input: ClassVar[bool] = False


def add_branch(module: nn.Module, name: str, branch: Branch) -> None:
    """Register ``branch`` as ``module.branches[name]``; the module's output becomes output + branch(...).

    The first branch of a module installs one forward hook that runs all of them; parameter names are
    ``<module path>.branches.<name>.<...>`` whatever else is added later.
    """
    container = module._modules.get(BRANCHES)
    if container is None:
        if hasattr(module, BRANCHES):
            raise UnsupportedMethodError(f"{type(module).__name__} already has an attribute {BRANCHES!r}; "
                                         "leantune cannot add branches to it")
        container = nn.ModuleDict()
        module.add_module(BRANCHES, container)
        module.register_forward_hook(_run_branches)
    if name in container:
        raise ConfigError(f"{type(module).__name__} already has a branch named {name!r}")
    container[name] = branch


def get_branches(module: nn.Module) -> dict[str, Branch]:
    """The branches added to ``module``, by name (empty if none)."""
    container = module._modules.get(BRANCHES)
    return dict(container.items()) if container is not None else {}


def remove_branch(module: nn.Module, name: str) -> Branch:
    """Remove one branch; the last one removed also removes the hook and the container."""
    container = module._modules[BRANCHES]
    branch = container[name]
    del container[name]
    if not len(container):
        for key, hook in list(module._forward_hooks.items()):  # found by function: survives deepcopy
            if hook is _run_branches:
                del module._forward_hooks[key]
        del module._modules[BRANCHES]
    return branch


def _run_branches(module: nn.Module, args: tuple, output: Any) -> Any:
    if not isinstance(output, torch.Tensor):
        raise UnsupportedMethodError(f"branches need a module whose output is one tensor; {type(module).__name__} "
                                     f"returns {type(output).__name__}")
    for branch in module._modules[BRANCHES].values():
        output = output + branch(args[0] if branch.reads_input else output)
    return output


# --- finding modules ----------------------------------------------------------------------------------------------
def match_module_names(model: nn.Module, patterns: list[str]) -> dict[str, list[str]]:
    """For each pattern, the module names equal to it or ending with ``"." + pattern`` (peft's rule)."""
    names = [n for n, _ in model.named_modules() if n]
    return {p: [n for n in names if n == p or n.endswith("." + p)] for p in patterns}


def resolve_module_names(model: nn.Module, patterns: list[str], field_name: str, config: MethodConfig) -> list[str]:
    """Module names matched by ``patterns``; a pattern matching nothing raises ``ConfigError`` naming the field."""
    matches = match_module_names(model, patterns)
    missing = [p for p, found in matches.items() if not found]
    if missing:
        raise ConfigError(
            f"{type(config).__name__}.{field_name}: no module named {', '.join(map(repr, missing))} "
            f"in {type(model).__name__}"
        )
    return sorted({n for found in matches.values() for n in found})
