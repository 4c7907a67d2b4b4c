"""The ``fish`` method: attach a mask as sparse deltas (or masked dense gradients), run, decay, merge.

``sparse`` mode: each tensor with selected entries gets a :class:`SparseDelta` (index buffer + trainable values,
zero at init); the forward runs the base model with ``weight + index_add(values)`` shadowing each touched weight
(:func:`weights_shadowed`). ``masked`` mode: the selected tensors are trainable dense parameters whose gradients a
hook masks, so unselected entries stay bitwise unchanged.

Optimizer contract (no global optimizer hooks): build the optimizer from ``parameter_groups`` and call
``before_optimizer_step`` right before every ``optimizer.step()`` (after clipping), as the trainer does::

    optimizer = torch.optim.AdamW(tuned.method.parameter_groups(tuned, weight_decay=0.01), lr=1e-3)
    ...
    loss.backward(); clip_grad_norm_(...)
    tuned.method.before_optimizer_step(optimizer)
    optimizer.step()

FISH's own tensors sit in a group with torch ``weight_decay`` 0.0 and ``"fish_weight_decay": <wd>``;
``before_optimizer_step`` decays their selected entries only (decoupled for AdamW, L2 in the gradient otherwise).
Entries of biases, norm parameters and 1-D tensors get no decay, as every method's groups.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from leantune.api import always_trained_modules
from leantune.backbones import Backbone, is_norm
from leantune.errors import CheckpointError, ConfigError
from leantune.fisher import fisher_scores
from leantune.methods.base import AttachContext, TuningMethod, decay_groups, resolve_module_names
from leantune.methods.fish.config import FishConfig
from leantune.methods.fish.decay import DECAY_KEY, SelectedDecay, is_decoupled
from leantune.methods.fish.distributed import SparseCommState, check_same_mask, sparse_allreduce_hook
from leantune.methods.fish.mask import FishMask, bias_mask, check_indices, load_mask, random_scores, select_top_k
from leantune.registry import register

if TYPE_CHECKING:
    from leantune.api import TunedModel

logger = logging.getLogger("leantune.fish")


def delta_key(param_name: str) -> str:
    """Module key of a parameter's sparse delta (module names cannot contain dots)."""
    return param_name.replace(".", "-")


class SparseDelta(nn.Module):
    """Selected entries of one base tensor: ``indices`` (flat, sorted) and, in sparse mode, trainable ``values``.

    ``owner`` (int8, per entry) marks which periodic-merge worker trains each entry when masks are disjoint.
    """

    def __init__(self, indices: torch.Tensor, values: torch.Tensor | None, owner: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("indices", indices)
        self.values = None if values is None else nn.Parameter(values)
        if owner is not None:
            self.register_buffer("owner", owner)
        else:
            self.owner = None

    def added_to(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with ``values`` added at ``indices`` (a new tensor; differentiable in ``values``)."""
        return torch.index_add(weight.reshape(-1), 0, self.indices, self.values).view(weight.shape)


class FishDeltas(nn.Module):
    """The method's modules: one :class:`SparseDelta` per base tensor with selected entries."""

    def __init__(self) -> None:
        super().__init__()
        self.deltas = nn.ModuleDict()


@contextmanager
def weights_shadowed(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, every module holding one of the named parameters (tied copies included) reads
    ``weights[name]`` instead. The replacement is an instance attribute shadowing the registered parameter
    (``nn.Module`` looks a parameter up in ``__getattr__``, which Python calls only when the instance has no such
    attribute), so the parameters stay registered, frozen and leaf: ``parameters()``, ``state_dict()``, DDP and
    memory trackers see the model unchanged, unlike ``torch.func.functional_call``, which registers the
    replacements as (non-leaf) parameters."""
    by_identity = {id(p): weights[n] for n, p in model.named_parameters() if n in weights}
    shadowed = []
    try:
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) in by_identity:
                    module.__dict__[name] = by_identity[id(param)]
                    shadowed.append((module, name))
        yield
    finally:
        for module, name in shadowed:
            module.__dict__.pop(name, None)


@register
class Fish(TuningMethod):
    name = "fish"
    config_class = FishConfig
    mergeable = True
    identity_at_init = True
    default_learning_rate = 1e-3
    budget_options = {"num_samples": 256}

    def __init__(self, config: FishConfig) -> None:
        super().__init__(config)
        self.decay_rules: list[tuple[nn.Parameter, SelectedDecay]] = []  # looked up by parameter identity
        self.grad_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.param_names: dict[str, str] = {}

    def needs_data(self) -> bool:
        return self.config.mask_type == "fisher" and self.config.mask_path is None

    # --- attaching ------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module, backbone: Backbone, context: AttachContext) -> FishDeltas:
        config: FishConfig = self.config
        params = dict(model.named_parameters())
        dense_names = self._dense_names(model, backbone)
        candidates = {n: p for n, p in params.items() if n not in dense_names}
        self.total_parameters = sum(p.numel() for p in params.values())
        self.dense_parameters = sum(params[n].numel() for n in dense_names)
        if context.loading:
            mask = self._mask_from_saved(context.saved, candidates)
        elif config.mask_path is not None:
            mask = load_mask(config.mask_path, candidates)
        else:
            mask = self._build_mask(model, candidates, context.data)
        self.delta_modules = FishDeltas()
        norm_params = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
        for name, idx in mask.indices.items():
            param = candidates[name]
            owner = None if mask.owners is None else mask.owners[name].to(torch.int8)
            decays = not name.endswith("bias") and id(param) not in norm_params and param.ndim >= 2
            self._add_delta(name, param, idx, owner, decays)
        selected = mask.count()
        logger.info("fish: %s mask, %d selected entries + %d dense head entries of %d (%.4f%%), %s mode",
                    config.mask_type, selected, self.dense_parameters, self.total_parameters,
                    100 * (selected + self.dense_parameters) / self.total_parameters, config.mode)
        return self.delta_modules

    def _add_delta(self, name: str, param: nn.Parameter, idx: torch.Tensor, owner: torch.Tensor | None,
                   decays: bool) -> None:
        """The delta of one base tensor; its trained tensor gets a decay rule when the base tensor ``decays``."""
        index_dtype = torch.int32 if param.numel() < 2**31 else torch.int64
        sparse = self.config.mode == "sparse"
        values = torch.zeros(idx.numel(), dtype=param.dtype, device=param.device) if sparse else None
        delta = SparseDelta(idx.to(index_dtype), values, owner)
        key = delta_key(name)
        self.delta_modules.deltas[key] = delta
        self.param_names[key] = name
        if sparse:
            trained, rule = delta.values, SelectedDecay(None, param, delta.indices)
        else:
            positions = delta.indices.long()
            param.requires_grad_(True)
            self.grad_hooks.append(param.register_hook(_masking_hook(positions)))
            trained, rule = param, SelectedDecay(positions)
        if decays:
            self.decay_rules.append((trained, rule))

    def _dense_names(self, model: nn.Module, backbone: Backbone) -> set[str]:
        """Parameters trained in full and counted inside the budget: the task head, ``modules_to_save`` and the
        modules the model declares always trained (a vision-language model's visual projection)."""
        modules = [m for _, m in backbone.task_heads()] if self.config.train_head else []
        names = resolve_module_names(model, self.config.modules_to_save, "modules_to_save", self.config)
        modules += [model.get_submodule(n) for n in names + always_trained_modules(model)]
        ids = {id(p) for m in modules for p in m.parameters()}
        return {n for n, p in model.named_parameters() if id(p) in ids}

    def _build_mask(self, model: nn.Module, candidates: dict[str, nn.Parameter], data: Any) -> FishMask:
        config: FishConfig = self.config
        if config.mask_type == "bitfit":
            return bias_mask(candidates)
        kept = int(self.total_parameters * config.keep_ratio)
        if kept <= self.dense_parameters:
            raise ConfigError(
                f"FishConfig.keep_ratio={config.keep_ratio!r} keeps {kept} of {self.total_parameters} parameters, "
                f"no more than the {self.dense_parameters} trained densely (task head, modules_to_save, the "
                "model's always-trained modules)"
            )
        if config.mask_type == "random":
            scores = random_scores(candidates, config.seed)
        else:
            if data is None:
                raise ConfigError("FishConfig.mask_type='fisher' needs data: pass leantune.wrap(..., data=batches) "
                                  "(batches with labels) or FishConfig(mask_path=...)")
            scores = fisher_scores(model, candidates, data, config.num_samples, config.fisher, config.grad_type)
        return select_top_k(scores, kept - self.dense_parameters, config.num_workers)

    def _mask_from_saved(self, saved: dict[str, torch.Tensor], candidates: dict[str, nn.Parameter]) -> FishMask:
        indices, owners = {}, {}
        for name, param in candidates.items():
            prefix = f"method_modules.deltas.{delta_key(name)}."
            if prefix + "indices" in saved:
                idx = saved[prefix + "indices"]
                check_indices(idx, param.numel(), f"saved delta: tensor {prefix}indices", CheckpointError)
                indices[name] = idx.to(param.device)
                if prefix + "owner" in saved:
                    owners[name] = saved[prefix + "owner"].to(param.device)
        return FishMask(indices, owners or None)

    # --- runtime ------------------------------------------------------------------------------------------------
    def deltas(self) -> dict[str, SparseDelta]:
        """Base parameter name -> its :class:`SparseDelta`."""
        return {self.param_names[key]: delta for key, delta in self.delta_modules.deltas.items()}

    def mask(self) -> FishMask:
        """The selected entries (the task head, trained in full, is not listed)."""
        deltas = self.deltas()
        owners = {n: d.owner for n, d in deltas.items()} if self.config.num_workers > 1 else None
        return FishMask({n: d.indices.long() for n, d in deltas.items()}, owners)

    def effective_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Base weight + scattered values for every tensor with selected entries (sparse mode)."""
        params = dict(model.named_parameters())
        return {name: delta.added_to(params[name]) for name, delta in self.deltas().items()}

    def forward(self, tuned: TunedModel, *args: Any, **kwargs: Any) -> Any:
        if self.config.mode == "masked":
            return tuned.base_model(*args, **kwargs)
        with weights_shadowed(tuned.base_model, self.effective_weights(tuned.base_model)):
            return tuned.base_model(*args, **kwargs)

    def generate(self, tuned: TunedModel, *args: Any, **kwargs: Any) -> Any:
        if self.config.mode == "masked":
            return tuned.base_model.generate(*args, **kwargs)
        with weights_shadowed(tuned.base_model, self.effective_weights(tuned.base_model)):
            return tuned.base_model.generate(*args, **kwargs)

    def merge(self, tuned: TunedModel) -> nn.Module:
        """Sparse mode: add the values into the base weights (the same ``index_add`` the forward does, so the
        merged weights equal the effective ones bitwise). Masked mode: the weights are already trained."""
        model = tuned.base_model
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, delta in self.deltas().items():
                if delta.values is not None:
                    params[name].copy_(delta.added_to(params[name]))
        for hook in self.grad_hooks:
            hook.remove()
        self.grad_hooks = []
        self.decay_rules = []
        return model

    # --- training -----------------------------------------------------------------------------------------------
    def parameter_groups(self, tuned: TunedModel, weight_decay: float) -> list[dict[str, Any]]:
        """The usual groups for the head and ``modules_to_save``, plus one group of FISH's decayed tensors with
        torch ``weight_decay`` 0.0 and ``"fish_weight_decay": weight_decay`` (see :meth:`before_optimizer_step`)."""
        own = {id(p) for p, _ in self.decay_rules}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in own]}
                  for g in decay_groups(tuned, weight_decay)]
        groups = [g for g in groups if g["params"]]
        if self.decay_rules:
            groups.append({"params": [p for p, _ in self.decay_rules], "weight_decay": 0.0,
                           DECAY_KEY: float(weight_decay)})
        return groups

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Decay the selected entries of FISH's tensors in every group carrying ``"fish_weight_decay"``."""
        rules = {id(p): rule for p, rule in self.decay_rules}
        for group in optimizer.param_groups:
            weight_decay = group.get(DECAY_KEY, 0.0)
            if not weight_decay:
                continue
            decoupled = is_decoupled(optimizer, group)
            for param in group["params"]:
                if param.grad is not None and id(param) in rules:
                    rules[id(param)].apply(param, group["lr"], weight_decay, decoupled)

    def decay_only_at(self, param: nn.Parameter, positions: torch.Tensor) -> None:
        """From now on decay ``param`` (one of FISH's tensors) at ``positions`` only, if it is decayed at all
        (:class:`~leantune.methods.fish.distributed.PeriodicMerger`'s disjoint owners)."""
        self.decay_rules = [(p, dataclasses.replace(rule, positions=positions) if p is param else rule)
                            for p, rule in self.decay_rules]

    def ddp_comm_hook(self, tuned: TunedModel, process_group: Any = None,
                      log_every: int = 0) -> tuple[SparseCommState, Callable]:
        """:func:`~leantune.methods.fish.distributed.sparse_allreduce_hook` and its state, after checking (a
        collective call) that every rank holds the same mask. Masked mode sends the selected entries of each
        bucket; sparse mode sends whole buckets (they already are the k values and the head) and counts bytes."""
        check_same_mask(self.mask(), process_group)
        selections = WeakIdKeyDictionary()
        if self.config.mode == "masked":
            params = dict(tuned.base_model.named_parameters())
            for name, delta in self.deltas().items():
                selections[params[name]] = delta.indices.long()
        return SparseCommState(selections, process_group, log_every), sparse_allreduce_hook


def _masking_hook(positions: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook keeping only the entries at ``positions`` (everything else becomes exactly zero)."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        flat = grad.reshape(-1)
        return torch.zeros_like(flat).index_copy_(0, positions, flat.index_select(0, positions)).view(grad.shape)

    return hook
