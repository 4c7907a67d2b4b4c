"""FISH mask (Sung, Nair & Raffel 2021): train a fixed sparse set of weights chosen by their Fisher information.

Scores are summed per-example squared (or absolute) gradients over ``num_samples`` training examples, batch 1,
model in eval mode, accumulated in float32. One global top-k over every parameter (embeddings, norms and biases
included) picks ``k = keep_ratio x all parameters`` entries; the task head is always trained and counted inside k.

Two training modes:

``sparse`` (default)
    each tensor with selected entries gets an index buffer (int32, int64 beyond 2**31 entries) and a trainable
    value vector of the same length, zero at init; the forward runs the base model with ``weight + scatter(values)``
    in place of each touched weight (:func:`weights_shadowed`). Gradients and optimizer state have length k.
``masked``
    the paper's reference: the selected tensors are trainable dense parameters whose gradients are multiplied by
    the mask (a gradient hook, so clipping and DDP see masked gradients). Unselected entries stay bitwise unchanged.

Weight decay: AdamW decays every entry of a parameter, selected or not. While any fish model is attached, a global
optimizer step hook applies each group's weight decay itself, to the selected entries only (towards zero for the
effective weight ``base + delta`` in both modes, so both modes reach the same weights), and sets the group's decay
to zero for the step. Distributed training (sparse DDP communication hook, periodic merging) is in
:mod:`leantune.methods.fish_distributed`.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from leantune.backbones import Backbone
from leantune.config import MethodConfig, check_choice, check_positive, option
from leantune.errors import UnsupportedMethodError
from leantune.methods.base import AttachContext, TuningMethod, resolve_module_names
from leantune.registry import register

logger = logging.getLogger("leantune.fish")

MASK_FORMAT = "leantune-fish-mask"
OWNER_SUFFIX = "::owner"


@dataclass
class FishConfig(MethodConfig):
    """Train a fixed sparse mask of entries chosen by Fisher information (or a random / bias baseline)."""

    method = "fish"

    keep_ratio: float = option(
        0.005, "Fraction of all parameters to train (k = keep_ratio x all params); the task head counts inside k."
    )
    mask_type: str = option(
        "fisher", "How entries are chosen: fisher (top-k Fisher score), random (same budget), bitfit (every bias)."
    )
    fisher: str = option(
        "empirical",
        "empirical: gradients of the loss on the true label (the paper's runs); expected: exact expectation over "
        "the model's predicted class distribution (classification heads only, one backward per class).",
    )
    grad_type: str = option("square", "Per-example gradient statistic summed into the score: square or absolute.")
    num_samples: int = option(1024, "Training examples (batch 1) used for the Fisher scores.")
    mode: str = option(
        "sparse", "sparse: train k values + index buffers (memory in proportion to k); masked: dense masked grads."
    )
    mask_path: str | None = option(None, "Reuse a mask saved by save_mask() instead of computing one.")
    seed: int = option(0, "Seed of the random mask baseline.")
    num_workers: int = option(
        1, "Build disjoint masks for this many periodic-merge workers: top num_workers x k entries dealt by rank."
    )

    def validate(self) -> None:
        super().validate()
        check_positive(self, "keep_ratio", "num_samples", "num_workers")
        if self.keep_ratio > 1:
            raise ValueError(f"FishConfig.keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        check_choice(self, "mask_type", ("fisher", "random", "bitfit"))
        check_choice(self, "fisher", ("empirical", "expected"))
        check_choice(self, "grad_type", ("square", "absolute"))
        check_choice(self, "mode", ("sparse", "masked"))
        if self.num_workers > 1 and self.mask_type == "bitfit":
            raise ValueError(f"FishConfig.num_workers={self.num_workers!r} deals top-k entries out to workers; "
                             "mask_type 'bitfit' has no ranking (use fisher or random)")
        if not isinstance(self.num_workers, int) or not isinstance(self.num_samples, int):
            raise ValueError(f"FishConfig.num_workers and num_samples must be integers, got "
                             f"{self.num_workers!r}, {self.num_samples!r}")


# --- Fisher scores ------------------------------------------------------------------------------------------------
def single_examples(batches: Iterable[dict[str, Any]], limit: int) -> Iterator[dict[str, Any]]:
    """Split batches into batch-1 examples (every tensor sliced on its first dimension); stop after ``limit``."""
    count = 0
    for batch in batches:
        tensors = [v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        if not tensors:
            raise ValueError("fish: a data batch holds no tensors; batches must be dicts of model inputs and labels")
        size = tensors[0].shape[0]
        for i in range(size):
            if count == limit:
                return
            yield {k: v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size else v
                   for k, v in batch.items()}
            count += 1


def fisher_scores(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Iterable[dict[str, Any]],
    num_samples: int,
    fisher: str = "empirical",
    grad_type: str = "square",
) -> dict[str, torch.Tensor]:
    """Per-entry Fisher scores of ``params``: the sum over examples (batch 1) of squared or absolute gradients.

    ``empirical`` differentiates the model's loss on the example's label (for text-to-text models, the target
    sequence's loss); ``expected`` sums ``p_c * stat(grad of -log p_c)`` over the classes c of a classification
    head. The model runs in eval mode (no dropout); scores are float32. Requires-grad flags and the train/eval
    mode are restored afterwards, and no ``.grad`` is left behind.
    """
    names = list(params)
    tensors = [params[n] for n in names]
    scores = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in tensors]
    statistic = torch.square if grad_type == "square" else torch.abs
    flags = [p.requires_grad for p in tensors]
    was_training = model.training
    device = tensors[0].device
    seen = 0
    model.eval()
    try:
        for p in tensors:
            p.requires_grad_(True)
        with torch.enable_grad():
            for example in single_examples(batches, num_samples):
                example = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example.items()}
                outputs = model(**example)
                for weight, loss in _losses(outputs, fisher):
                    grads = torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
                    for score, grad in zip(scores, grads):
                        if grad is not None:
                            score.add_(statistic(grad.detach().float()), alpha=weight)
                seen += 1
    finally:
        for p, flag in zip(tensors, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if seen == 0:
        raise ValueError("fish: the data holds no examples to compute Fisher scores from")
    logger.info("fish: Fisher scores from %d examples (%s, %s)", seen, fisher, grad_type)
    return dict(zip(names, scores))


def _losses(outputs: Any, fisher: str) -> list[tuple[float, torch.Tensor]]:
    """``(weight, loss)`` pairs whose weighted gradient statistics make one example's score."""
    if fisher == "empirical":
        loss = getattr(outputs, "loss", None)
        if loss is None:
            raise ValueError("fish: the model returned no loss; data batches must include labels")
        return [(1.0, loss)]
    logits = getattr(outputs, "logits", None)
    if logits is None or logits.dim() != 2 or logits.shape[-1] < 2:
        shape = None if logits is None else tuple(logits.shape)
        raise UnsupportedMethodError(
            f"FishConfig.fisher='expected' needs a classification head (logits of shape (batch, classes>=2)), "
            f"got logits of shape {shape}; use fisher='empirical'"
        )
    log_probs = torch.log_softmax(logits.float(), dim=-1)[0]
    probs = log_probs.detach().exp()
    return [(float(probs[c]), -log_probs[c]) for c in range(log_probs.shape[0])]


# --- masks: selected flat indices per tensor ----------------------------------------------------------------------
@dataclass
class FishMask:
    """Selected entries: sorted flat int64 indices per tensor name; ``owners`` (int8) for disjoint worker masks."""

    indices: dict[str, torch.Tensor]
    owners: dict[str, torch.Tensor] | None = None

    def count(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())


def select_top_k(scores: dict[str, torch.Tensor], k: int, num_workers: int = 1) -> FishMask:
    """One global top-``k x num_workers`` over every score; with several workers, entries are dealt out by rank
    in score order (ranks 0, W, 2W, ... to worker 0), as the paper's disjoint masks."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    total_k = k * num_workers
    if total_k > flat.numel():
        raise ValueError(f"fish: cannot select {total_k} entries from {flat.numel()} candidate parameters")
    top = torch.topk(flat, total_k, sorted=True).indices
    owner_flat = torch.full((flat.numel(),), -1, dtype=torch.int8, device=flat.device)
    owner_flat[top] = (torch.arange(total_k, device=flat.device) % num_workers).to(torch.int8)
    indices, owners, offset = {}, {}, 0
    for name in names:
        size = scores[name].numel()
        owned = owner_flat[offset : offset + size]
        chosen = torch.nonzero(owned >= 0).flatten()
        if chosen.numel():
            indices[name] = chosen
            owners[name] = owned[chosen]
        offset += size
    return FishMask(indices, owners if num_workers > 1 else None)


def random_scores(params: dict[str, nn.Parameter], seed: int) -> dict[str, torch.Tensor]:
    """Uniform random scores (the ``random`` baseline: top-k of them is a uniformly random subset)."""
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.numel(), generator=generator) for n, p in params.items()}


def bias_mask(params: dict[str, nn.Parameter]) -> FishMask:
    """Every entry of every bias (BitFit); ignores the budget."""
    indices = {n: torch.arange(p.numel()) for n, p in params.items() if n.rsplit(".", 1)[-1] == "bias"}
    if not indices:
        raise UnsupportedMethodError("FishConfig.mask_type='bitfit': the model has no bias parameters")
    return FishMask(indices)


def save_mask(mask: FishMask, path: str | os.PathLike) -> None:
    """Write ``mask`` to a safetensors file (atomically) for reuse with ``FishConfig(mask_path=...)``."""
    path = Path(path)
    tensors = {n: i.to("cpu", torch.int64).contiguous() for n, i in mask.indices.items()}
    if mask.owners is not None:
        tensors.update({n + OWNER_SUFFIX: o.to("cpu").contiguous() for n, o in mask.owners.items()})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"format": MASK_FORMAT})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_mask(path: str | os.PathLike, params: dict[str, nn.Parameter]) -> FishMask:
    """Read a mask written by :func:`save_mask` and check it against ``params`` (names, index ranges)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"FishConfig.mask_path: {path} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"FishConfig.mask_path: {path} is not a safetensors mask file ({err})") from None
    indices = {n: t for n, t in tensors.items() if not n.endswith(OWNER_SUFFIX)}
    owners = {n[: -len(OWNER_SUFFIX)]: t for n, t in tensors.items() if n.endswith(OWNER_SUFFIX)}
    for name, idx in indices.items():
        if name not in params:
            raise ValueError(f"FishConfig.mask_path: {path} selects entries of {name!r}, which is not a "
                             f"trainable candidate of this model")
        _check_indices(idx, params[name].numel(), f"{path}: tensor {name!r}")
    device = next(iter(params.values())).device
    to_device = lambda d: {n: t.to(device) for n, t in d.items()}  # noqa: E731
    return FishMask(to_device(indices), to_device(owners) if owners else None)


def _check_indices(idx: torch.Tensor, size: int, where: str) -> None:
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{where}: indices must be a 1-D int32/int64 tensor, got {idx.dtype} {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size or not bool((idx[1:] > idx[:-1]).all())):
        raise ValueError(f"{where}: indices must be sorted, unique and within [0, {size})")


# --- the trainable sparse state -----------------------------------------------------------------------------------
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


# --- weight decay on the selected entries only --------------------------------------------------------------------
@dataclass
class _SelectedDecay:
    """How a parameter is decayed: at ``positions`` only; towards zero of ``base[base_indices] + param``
    when ``base`` is given (sparse values), else of the parameter itself (masked mode)."""

    positions: torch.Tensor | None
    base: torch.Tensor | None = None
    base_indices: torch.Tensor | None = None

    def target(self, flat: torch.Tensor) -> torch.Tensor:
        current = flat if self.positions is None else flat.index_select(0, self.positions)
        if self.base is None:
            return current
        base_indices = self.base_indices if self.positions is None else self.base_indices[self.positions]
        return current + self.base.reshape(-1).index_select(0, base_indices)

    def apply(self, param: torch.Tensor, lr: Any, weight_decay: float, decoupled: bool) -> None:
        flat = param.detach().view(-1)
        if not decoupled:  # L2 in the gradient (Adam, SGD, ...): grad += wd * weight, selected entries only
            grad = param.grad.view(-1)
            if self.positions is None:
                grad.add_(self.target(flat), alpha=weight_decay)
            else:
                grad.index_add_(0, self.positions, self.target(flat) * weight_decay)
        elif self.base is None:  # AdamW on a dense masked tensor: the same multiply AdamW does, selected only
            factor = 1 - lr * weight_decay
            if self.positions is None:
                flat.mul_(factor)
            else:
                flat.index_copy_(0, self.positions, flat.index_select(0, self.positions) * factor)
        else:  # AdamW on sparse values: (base + v) * (1 - lr wd) = base + v - lr wd (base + v)
            change = self.target(flat) * (-lr * weight_decay)
            if self.positions is None:
                flat.add_(change)
            else:
                flat.index_add_(0, self.positions, change)


_DECAY_RULES: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensors hash by identity
_SUSPENDED: weakref.WeakKeyDictionary[torch.optim.Optimizer, list] = weakref.WeakKeyDictionary()
_HOOKS_INSTALLED = False


def set_decay_rule(param: torch.Tensor, rule: _SelectedDecay | None) -> None:
    """Make optimizers decay ``param`` by ``rule`` (None: as usual again)."""
    _install_optimizer_hooks()
    if rule is None:
        _DECAY_RULES.pop(param, None)
    else:
        _DECAY_RULES[param] = rule


def _install_optimizer_hooks() -> None:
    global _HOOKS_INSTALLED
    if not _HOOKS_INSTALLED:
        register_optimizer_step_pre_hook(_decay_before_step)
        register_optimizer_step_post_hook(_restore_after_step)
        _HOOKS_INSTALLED = True


def _decay_before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """For groups holding fish parameters: apply the group's weight decay here (selected entries only for fish
    parameters, as the optimizer would for the others) and zero the group's decay for this step."""
    suspended = []
    for group in optimizer.param_groups:
        weight_decay = group.get("weight_decay", 0.0)
        if not weight_decay or not any(p in _DECAY_RULES for p in group["params"]):
            continue
        decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
        lr = group["lr"]
        with torch.no_grad():
            for param in group["params"]:
                if param.grad is None:
                    continue
                rule = _DECAY_RULES.get(param)
                if rule is not None:
                    rule.apply(param, lr, weight_decay, decoupled)
                elif decoupled:
                    param.mul_(1 - lr * weight_decay)
                else:
                    param.grad.add_(param, alpha=weight_decay)
        group["weight_decay"] = 0.0
        suspended.append((group, weight_decay))
    if suspended:
        _SUSPENDED[optimizer] = suspended


def _restore_after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group, weight_decay in _SUSPENDED.pop(optimizer, []):
        group["weight_decay"] = weight_decay


# --- the method ---------------------------------------------------------------------------------------------------
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
        self.modules = FishDeltas()
        self.grad_hooks = []
        self.param_names = {}
        for name, idx in mask.indices.items():
            param = candidates[name]
            index_dtype = torch.int32 if param.numel() < 2**31 else torch.int64
            owner = None if mask.owners is None else mask.owners[name].to(torch.int8)
            values = None
            if config.mode == "sparse":
                values = torch.zeros(idx.numel(), dtype=param.dtype, device=param.device)
            delta = SparseDelta(idx.to(index_dtype), values, owner)
            key = delta_key(name)
            self.modules.deltas[key] = delta
            self.param_names[key] = name
            if config.mode == "sparse":
                set_decay_rule(delta.values, _SelectedDecay(None, param, delta.indices))
            else:
                positions = delta.indices.long()
                param.requires_grad_(True)
                self.grad_hooks.append(param.register_hook(_masking_hook(positions)))
                set_decay_rule(param, _SelectedDecay(positions))
        selected = mask.count()
        logger.info("fish: %s mask, %d selected entries + %d dense head entries of %d (%.4f%%), %s mode",
                    config.mask_type, selected, self.dense_parameters, self.total_parameters,
                    100 * (selected + self.dense_parameters) / self.total_parameters, config.mode)
        return self.modules

    def _dense_names(self, model: nn.Module, backbone: Backbone) -> set[str]:
        """Parameters trained in full and counted inside the budget: the task head and ``modules_to_save``."""
        modules = [m for _, m in backbone.task_heads()] if self.config.train_head else []
        modules += [model.get_submodule(n) for n in
                    resolve_module_names(model, self.config.modules_to_save, "modules_to_save", self.config)]
        ids = {id(p) for m in modules for p in m.parameters()}
        return {n for n, p in model.named_parameters() if id(p) in ids}

    def _build_mask(self, model: nn.Module, candidates: dict[str, nn.Parameter], data: Any) -> FishMask:
        config: FishConfig = self.config
        if config.mask_type == "bitfit":
            return bias_mask(candidates)
        budget = int(self.total_parameters * config.keep_ratio) - self.dense_parameters
        if budget <= 0:
            raise ValueError(
                f"FishConfig.keep_ratio={config.keep_ratio!r} keeps {int(self.total_parameters * config.keep_ratio)} "
                f"of {self.total_parameters} parameters, no more than the {self.dense_parameters} of the task head"
            )
        if config.mask_type == "random":
            scores = random_scores(candidates, config.seed)
        else:
            if data is None:
                raise ValueError("fish: mask_type='fisher' needs data: pass leantune.wrap(..., data=batches) "
                                 "(batches with labels) or FishConfig(mask_path=...)")
            scores = fisher_scores(model, candidates, data, config.num_samples, config.fisher, config.grad_type)
        return select_top_k(scores, budget, config.num_workers)

    def _mask_from_saved(self, saved: dict[str, torch.Tensor], candidates: dict[str, nn.Parameter]) -> FishMask:
        indices, owners = {}, {}
        for name, param in candidates.items():
            prefix = f"method_modules.deltas.{delta_key(name)}."
            if prefix + "indices" in saved:
                idx = saved[prefix + "indices"]
                _check_indices(idx, param.numel(), f"saved delta: tensor {prefix}indices")
                indices[name] = idx.to(param.device)
                if prefix + "owner" in saved:
                    owners[name] = saved[prefix + "owner"].to(param.device)
        return FishMask(indices, owners or None)

    # --- runtime ------------------------------------------------------------------------------------------------
    def deltas(self) -> dict[str, SparseDelta]:
        """Base parameter name -> its :class:`SparseDelta`."""
        return {self.param_names[key]: delta for key, delta in self.modules.deltas.items()}

    def mask(self) -> FishMask:
        """The selected entries (the task head, trained in full, is not listed)."""
        deltas = self.deltas()
        owners = {n: d.owner for n, d in deltas.items()} if self.config.num_workers > 1 else None
        return FishMask({n: d.indices.long() for n, d in deltas.items()}, owners)

    def effective_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Base weight + scattered values for every tensor with selected entries (sparse mode)."""
        params = dict(model.named_parameters())
        return {name: delta.added_to(params[name]) for name, delta in self.deltas().items()}

    def forward(self, tuned: Any, *args: Any, **kwargs: Any) -> Any:
        if self.config.mode == "masked":
            return tuned.base_model(*args, **kwargs)
        with weights_shadowed(tuned.base_model, self.effective_weights(tuned.base_model)):
            return tuned.base_model(*args, **kwargs)

    def generate(self, tuned: Any, *args: Any, **kwargs: Any) -> Any:
        if self.config.mode == "masked":
            return tuned.base_model.generate(*args, **kwargs)
        with weights_shadowed(tuned.base_model, self.effective_weights(tuned.base_model)):
            return tuned.base_model.generate(*args, **kwargs)

    def merge(self, tuned: Any) -> nn.Module:
        """Sparse mode: add the values into the base weights (the same ``index_add`` the forward does, so the
        merged weights equal the effective ones bitwise). Masked mode: the weights are already trained."""
        model = tuned.base_model
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, delta in self.deltas().items():
                if delta.values is not None:
                    params[name].copy_(delta.added_to(params[name]))
                set_decay_rule(params[name], None)
        for hook in self.grad_hooks:
            hook.remove()
        self.grad_hooks = []
        return model


def _masking_hook(positions: torch.Tensor) -> Any:
    """A gradient hook keeping only the entries at ``positions`` (everything else becomes exactly zero)."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        flat = grad.reshape(-1)
        return torch.zeros_like(flat).index_copy_(0, positions, flat.index_select(0, positions)).view(grad.shape)

    return hook
