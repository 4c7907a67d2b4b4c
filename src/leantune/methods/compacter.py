"""Compacter (Karimi Mahabadi et al. 2021): bottleneck adapters whose projections are PHM layers.

Each projection is ``y = x (sum_i A_i kron W_i) + b`` (:class:`leantune.layers.phm.PHMLinear`) with ``phm_dim``
n: A_i n x n drawn N(0, 0.01), W_i Xavier-uniform (gain sqrt 2), zero bias. ``shared_phm_rule`` uses one set of
A for every layer; ``factorized_phm`` makes W_i = u_i v_i^T of rank ``phm_rank`` (the original Compacter; both
off in VL-Adapter, whose setting is the default: n=2, r=8, gelu_new, placement ``all``, LayerNorms trained;
only the up-projection starts at zero here, so the model starts as the base model).
Sharing across tasks, placement and the rest are the adapter's (``leantune.methods.adapter``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leantune.backbones import Backbone
from leantune.config import check_positive, option
from leantune.layers.adapter import ProjectionFactory
from leantune.layers.phm import phm_projection
from leantune.methods.adapter import Adapter, AdapterConfig
from leantune.methods.base import AttachContext
from leantune.registry import register


@dataclass
class CompacterConfig(AdapterConfig):
    """Adapters with parameterised hypercomplex multiplication (PHM) projections."""

    method = "compacter"

    reduction_factor: int = option(8, "Bottleneck width is hidden_size // reduction_factor (VL-Adapter: 8).")
    activation: str = option("gelu_new", "Non-linearity in the bottleneck (VL-Adapter: gelu_new).")
    placement: str = option("all", "houlsby, pfeiffer or all (after self-attention, cross-attention and "
                                   "feed-forward; VL-Adapter).")
    zero_init_up: bool = option(True, "Zero the up-projection's W_i so the adapter starts as the identity "
                                      "(VL-Adapter: False, Xavier-initialised).")
    train_norms: bool = option(True, "Also train every LayerNorm/RMSNorm (VL-Adapter: True).")
    phm_dim: int = option(2, "n: the number of Kronecker products; must divide both sizes of each projection.")
    shared_phm_rule: bool = option(False, "One set of A_i (n x n x n) shared by every PHM layer of the model.")
    factorized_phm: bool = option(False, "W_i = u_i v_i^T of rank phm_rank instead of a full (in/n, out/n) matrix.")
    phm_rank: int = option(1, "Rank of the factorised W_i.")

    def validate(self) -> None:
        super().validate()
        check_positive(self, "phm_dim", "phm_rank")


@register
class Compacter(Adapter):
    name = "compacter"
    config_class = CompacterConfig
    default_learning_rate = 1e-3

    def attach(self, model: nn.Module, backbone: Backbone, context: AttachContext) -> nn.Module | None:
        config: CompacterConfig = self.config
        like = next(model.parameters())
        self.shared_rule = None
        if config.shared_phm_rule:
            n = config.phm_dim
            self.shared_rule = nn.Parameter(torch.empty(n, n, n, device=like.device).normal_(0, 0.01))
        super().attach(model, backbone, context)
        return None

    def projection(self, like: torch.Tensor) -> ProjectionFactory:
        config: CompacterConfig = self.config
        return phm_projection(config.phm_dim, config.phm_rank if config.factorized_phm else None, self.shared_rule,
                              device=like.device, dtype=like.dtype)
