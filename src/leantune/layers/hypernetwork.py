"""Hypernetwork-generated adapter weights (Hyperformer, Karimi Mahabadi et al. 2021, as used by VL-Adapter).

A task embedding (``task_dim``, shared by every stack) and a layer embedding of the stack are concatenated and
projected by the stack's task MLP, ``Linear(2 task_dim -> mlp_hidden) -> ReLU -> Linear(-> projected_dim) ->
LayerNorm``. For each position type (self-attention, cross-attention, feed-forward) the stack has generators
that map the projection to an adapter's down weight and bias and up weight and bias. Weights are generated at
every call of an adapter, once for the whole batch (one task per batch), not per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leantune.context import current_task
from leantune.methods.base import Branch

PARTS = ("down_weight", "down_bias", "up_weight", "up_bias")


def _generator(in_features: int, out_features: int, zero: bool) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    if zero:
        nn.init.zeros_(layer.weight)
    else:
        nn.init.normal_(layer.weight, std=0.01)
    nn.init.zeros_(layer.bias)
    return layer


class StackHypernetwork(nn.Module):
    """One stack's layer embeddings, task MLP and per-position weight generators."""

    def __init__(self, num_layers: int, positions: list[str], hidden: int, bottleneck: int, task_dim: int,
                 mlp_hidden: int, projected_dim: int, zero_init_up: bool) -> None:
        super().__init__()
        self.hidden, self.bottleneck = hidden, bottleneck
        self.layer_embeddings = nn.Embedding(num_layers, task_dim)
        self.task_mlp = nn.Sequential(nn.Linear(2 * task_dim, mlp_hidden), nn.ReLU(),
                                      nn.Linear(mlp_hidden, projected_dim), nn.LayerNorm(projected_dim))
        sizes = {"down_weight": bottleneck * hidden, "down_bias": bottleneck, "up_weight": hidden * bottleneck,
                 "up_bias": hidden}
        self.generators = nn.ModuleDict({
            position: nn.ModuleDict({part: _generator(projected_dim, size, zero_init_up and part.startswith("up"))
                                     for part, size in sizes.items()})
            for position in positions})

    def projection(self, task_embedding: torch.Tensor, layer: int) -> torch.Tensor:
        """The task MLP's output for one (task, layer)."""
        layer_embedding = self.layer_embeddings.weight[layer]
        return self.task_mlp(torch.cat([task_embedding, layer_embedding]))

    def adapter_weights(self, task_embedding: torch.Tensor, layer: int, position: str) -> dict[str, torch.Tensor]:
        """Down weight (bottleneck, hidden), down bias, up weight (hidden, bottleneck), up bias."""
        z = self.projection(task_embedding, layer)
        generated = {part: generator(z) for part, generator in self.generators[position].items()}
        generated["down_weight"] = generated["down_weight"].view(self.bottleneck, self.hidden)
        generated["up_weight"] = generated["up_weight"].view(self.hidden, self.bottleneck)
        return generated


class HyperformerModules(nn.Module):
    """Everything Hyperformer trains outside the base model: task embeddings and one hypernetwork per stack."""

    def __init__(self, tasks: list[str], task_dim: int, stacks: dict[str, StackHypernetwork]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.task_embeddings = nn.Embedding(len(tasks), task_dim)
        nn.init.normal_(self.task_embeddings.weight)
        self.stacks = nn.ModuleDict(stacks)


class GeneratedAdapter(Branch):
    """An adapter at one position whose weights the stack's hypernetwork generates for the call's task.

    Holds a plain (unregistered) reference to the shared :class:`HyperformerModules`, so the generators are
    saved once, as method modules, and never under the base model.
    """

    def __init__(self, modules: HyperformerModules, stack: str, layer: int, position: str, activation: nn.Module):
        super().__init__()
        self.__dict__["shared"] = modules
        self.stack, self.layer, self.position = stack, layer, position
        self.act = activation

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shared: HyperformerModules = self.__dict__["shared"]
        task_embedding = shared.task_embeddings.weight[shared.tasks.index(current_task(shared.tasks))]
        w = shared.stacks[self.stack].adapter_weights(task_embedding, self.layer, self.position)
        hidden = self.act(F.linear(h, w["down_weight"].to(h.dtype), w["down_bias"].to(h.dtype)))
        return F.linear(hidden, w["up_weight"].to(h.dtype), w["up_bias"].to(h.dtype))
