"""FISH mask (Sung, Nair & Raffel 2021): train a fixed sparse set of weights chosen by their Fisher information.

Scores come from :mod:`leantune.fisher`; one global top-k over every parameter (embeddings, norms and biases
included) picks ``k = keep_ratio x all parameters`` entries; the task head is always trained and counted inside k.

``config``       :class:`FishConfig`
``mask``         selection (top-k, random, bitfit), :class:`FishMask`, :func:`save_mask` / :func:`load_mask`
``method``       the registered :class:`Fish` method: sparse deltas, shadowed weights, merge, parameter groups
``decay``        weight decay on the selected entries only (applied by ``Fish.before_optimizer_step``)
``distributed``  the sparse DDP communication hook (``Fish.ddp_comm_hook``) and :class:`PeriodicMerger`

Training outside leantune's trainer: build the optimizer from ``tuned.method.parameter_groups(tuned, wd)`` and
call ``tuned.method.before_optimizer_step(optimizer)`` right before every ``optimizer.step()``.
"""

from leantune.methods.fish.config import FishConfig
from leantune.methods.fish.distributed import (
    PeriodicMerger,
    SparseCommState,
    check_same_mask,
    register_sparse_comm_hook,
    sparse_allreduce_hook,
)
from leantune.methods.fish.mask import FishMask, bias_mask, load_mask, random_scores, save_mask, select_top_k
from leantune.methods.fish.method import Fish, SparseDelta, weights_shadowed

__all__ = [
    "Fish",
    "FishConfig",
    "FishMask",
    "PeriodicMerger",
    "SparseCommState",
    "SparseDelta",
    "bias_mask",
    "check_same_mask",
    "load_mask",
    "random_scores",
    "register_sparse_comm_hook",
    "save_mask",
    "select_top_k",
    "sparse_allreduce_hook",
    "weights_shadowed",
]
