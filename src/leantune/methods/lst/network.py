"""LST's side network: side blocks at 1/r of the backbone's widths, gated ladders, and the masks they use.

A :class:`SideStack` shadows one backbone stack: the first ladder (the input of the backbone's first block) is
projected down, then before each kept side layer ``i`` the side state is gated with the projected output of
backbone block ``i``, ``s <- mu_i * s + (1 - mu_i) * Down_i(h_i)``, ``mu_i = sigmoid(alpha_i / T)``.
:func:`record_ladders` collects those backbone tensors with forward hooks while the backbone runs.

Extra tokens (LST's CLIP-T5 variant: visual tokens the backbone never sees) join the first ladder after the text
tokens; every later ladder is zero at their positions, so there the side state is only gated (``mu_i * s``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.t5.modeling_t5 import T5Attention

from leantune.backbones import Block
from leantune.layers.attention import KeyValueCache, MultiHeadAttention


@dataclass(frozen=True)
class NormSpec:
    """A side norm mirroring a backbone norm: LayerNorm (with bias) or RMSNorm (T5), and its epsilon."""

    has_bias: bool
    eps: float

    @classmethod
    def of(cls, module: nn.Module) -> NormSpec:
        bias = getattr(module, "bias", None)
        eps = getattr(module, "eps", None)
        if eps is None:
            eps = getattr(module, "variance_epsilon", 1e-6)
        return cls(has_bias=isinstance(bias, torch.Tensor), eps=float(eps))

    def build(self, width: int) -> nn.Module:
        if self.has_bias:
            return nn.LayerNorm(width, eps=self.eps)
        return nn.RMSNorm(width, eps=self.eps)


@dataclass(frozen=True)
class SideShape:
    """Everything a side block of one stack needs to know about the backbone block it shadows.

    ``score_scale`` multiplies the attention scores: ``None`` for the usual ``1 / sqrt(d_kv)``, 1.0 where the
    backbone's attention is unscaled (T5).
    """

    d_model: int
    heads: int
    d_kv: int
    d_ff: int
    ffn_inputs: int
    attention_bias: bool
    ffn_bias: bool
    attention_norm: NormSpec
    ffn_norm: NormSpec
    cross_attention_norm: NormSpec | None
    pre_norm: bool
    score_scale: float | None
    layer_scale: bool
    dropout: float

    def attention(self) -> MultiHeadAttention:
        return MultiHeadAttention(self.d_model, self.heads, self.d_kv, bias=self.attention_bias,
                                  scale=self.score_scale, dropout=self.dropout)


class SideLinear(nn.Linear):
    """A linear layer that computes in its input's dtype and returns float32.

    Used for the ladders ``Down_i``: the backbone activation it reads is what autograd keeps for the weight
    gradient, so it is kept at the backbone's precision instead of as a float32 copy.
    """

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(hidden.dtype)
        bias = None if self.bias is None else self.bias.to(hidden.dtype)
        return F.linear(hidden, weight, bias).float()


class BlockCache(NamedTuple):
    """The key/value caches of one side block while decoding."""

    own: KeyValueCache
    cross: KeyValueCache


class SideBlock(nn.Module):
    """A transformer block at side width, laid out like the backbone block it shadows (pre- or post-norm)."""

    def __init__(self, shape: SideShape, activation: nn.Module, cross: bool) -> None:
        super().__init__()
        d = shape.d_model
        self.pre_norm = shape.pre_norm
        self.attention_norm = shape.attention_norm.build(d)
        self.attention = shape.attention()
        self.cross_attention_norm = shape.cross_attention_norm.build(d) if cross else None
        self.cross_attention = shape.attention() if cross else None
        self.ffn_norm = shape.ffn_norm.build(d)
        self.ffn_input = nn.ModuleList(nn.Linear(d, shape.d_ff, bias=shape.ffn_bias) for _ in range(shape.ffn_inputs))
        self.ffn_output = nn.Linear(shape.d_ff, d, bias=shape.ffn_bias)
        self.activation = activation
        self.attention_scale = nn.Parameter(torch.ones(d)) if shape.layer_scale else None
        self.ffn_scale = nn.Parameter(torch.ones(d)) if shape.layer_scale else None
        self.dropout = nn.Dropout(shape.dropout)

    def _feed_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        inner = self.activation(self.ffn_input[0](hidden))
        if len(self.ffn_input) == 2:  # gated: act(gate(x)) * up(x)
            inner = inner * self.ffn_input[1](hidden)
        return self.ffn_output(self.dropout(inner))

    def _sublayer(self, hidden: torch.Tensor, norm: nn.Module, scale: torch.Tensor | None,
                  run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.pre_norm:
            update = run(norm(hidden))
            return hidden + self.dropout(update if scale is None else update * scale)
        update = run(hidden)
        return norm(hidden + self.dropout(update if scale is None else update * scale))

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cache: BlockCache | None = None,
    ) -> torch.Tensor:
        hidden = self._sublayer(hidden, self.attention_norm, self.attention_scale,
                                lambda x: self.attention(x, mask, cache=None if cache is None else cache.own))
        if self.cross_attention is not None:
            cross_cache = None if cache is None else cache.cross
            hidden = self._sublayer(hidden, self.cross_attention_norm, None,
                                    lambda x: self.cross_attention(x, context_mask, context, cross_cache))
        return self._sublayer(hidden, self.ffn_norm, self.ffn_scale, self._feed_forward)


class RelativePositionBias(nn.Module):
    """T5's bucketed relative position bias, one value per head (the side keeps the backbone's head count).

    The buckets are transformers' own (``T5Attention._relative_position_bucket``).
    """

    def __init__(self, num_buckets: int, max_distance: int, heads: int, bidirectional: bool) -> None:
        super().__init__()
        self.table = nn.Embedding(num_buckets, heads)
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional

    def forward(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """Bias of shape (1, heads, queries, keys)."""
        relative = key_positions[None, :] - query_positions[:, None]
        buckets = T5Attention._relative_position_bucket(relative, bidirectional=self.bidirectional,
                                                        num_buckets=self.num_buckets, max_distance=self.max_distance)
        return self.table(buckets).permute(2, 0, 1).unsqueeze(0)


class SideStack(nn.Module):
    """The side network over one backbone stack: first ladder, gated ladders, side blocks, final norm."""

    def __init__(
        self,
        backbone_width: int,
        num_layers: int,
        kept: list[int],
        shape: SideShape,
        activation: nn.Module,
        cross: bool,
        final_norm: NormSpec | None,
        position_bias: RelativePositionBias | None,
        gate_init: float,
        gate_temperature: float,
    ) -> None:
        super().__init__()
        self.kept = list(kept)
        self.gate_temperature = gate_temperature
        self.first_downsample = SideLinear(backbone_width, shape.d_model)
        self.downsamples = nn.ModuleDict({str(i): SideLinear(backbone_width, shape.d_model) for i in kept})
        self.gates = nn.Parameter(torch.full((num_layers,), float(gate_init)))  # one per backbone layer
        self.blocks = nn.ModuleDict({str(i): SideBlock(shape, copy.deepcopy(activation), cross) for i in kept})
        self.final_norm = final_norm.build(shape.d_model) if final_norm is not None else None
        self.position_bias = position_bias
        self.dropout = nn.Dropout(shape.dropout)

    def gate_values(self) -> torch.Tensor:
        """mu_i = sigmoid(alpha_i / T) for every backbone layer."""
        return torch.sigmoid(self.gates / self.gate_temperature)

    def forward(
        self,
        ladders: dict[int, torch.Tensor],
        mask: torch.Tensor | None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        caches: dict[int, BlockCache] | None = None,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``ladders[-1]`` is the first block's input, ``ladders[i]`` block i's output; ``caches`` by layer.
        ``extra`` (batch, n, backbone width): tokens after the text that only the side network sees."""
        mu = self.gate_values()
        first = ladders[-1] if extra is None else torch.cat([ladders[-1], extra.to(ladders[-1].dtype)], dim=1)
        hidden = self.dropout(self.first_downsample(first))
        padding = 0 if extra is None else extra.shape[1]
        for i in self.kept:
            down = self.downsamples[str(i)](ladders[i])
            if padding:  # zero at the extra tokens' positions: there only the gate acts
                down = F.pad(down, (0, 0, 0, padding))
            hidden = mu[i] * hidden + (1 - mu[i]) * down
            hidden = self.blocks[str(i)](hidden, mask, context, context_mask, None if caches is None else caches[i])
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        return self.dropout(hidden)


class LSTNetwork(nn.Module):
    """Everything LST trains: one side stack per backbone stack, plus the up-projection or the side head."""

    def __init__(self, stacks: dict[str, SideStack], upsample: nn.Linear | None, head: nn.Linear | None,
                 dropout: float) -> None:
        super().__init__()
        self.stacks = nn.ModuleDict(stacks)
        self.upsample = upsample
        self.head = head
        self.head_dropout = nn.Dropout(dropout)


# --- recording ladders ---------------------------------------------------------------------------------------


def normalised(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` normalised over its last dimension to zero mean and unit variance (no parameters)."""
    return F.layer_norm(hidden, hidden.shape[-1:])


@contextlib.contextmanager
def record_ladders(blocks: list[Block], kept: list[int], normalise: bool = False
                   ) -> Iterator[dict[int, torch.Tensor]]:
    """While active, ``ladders[-1]`` gets the first block's input and ``ladders[i]`` block i's output (kept i).

    ``normalise``: record each ladder normalised per token (:func:`normalised`) instead; the backbone goes on with
    its own tensor, so only the normalised copy stays alive."""
    ladders: dict[int, torch.Tensor] = {}
    keep = normalised if normalise else (lambda hidden: hidden)

    def first_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ladders[-1] = keep(args[0] if args else kwargs["hidden_states"])

    def output_of(index: int) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            ladders[index] = keep(output[0] if isinstance(output, tuple) else output)
        return hook

    handles = [blocks[0].module.register_forward_pre_hook(first_input, with_kwargs=True)]
    handles += [blocks[i].module.register_forward_hook(output_of(i)) for i in kept]
    try:
        yield ladders
    finally:
        for handle in handles:
            handle.remove()


# --- masks ---------------------------------------------------------------------------------------------------


def additive_mask(keep: torch.Tensor) -> torch.Tensor:
    """0 where ``keep`` is true, the most negative float32 elsewhere."""
    return torch.zeros(keep.shape, device=keep.device).masked_fill(~keep, torch.finfo(torch.float32).min)


def padding_keep(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(batch, 1, 1, keys) boolean mask of the keys to attend to."""
    return None if attention_mask is None else attention_mask.bool()[:, None, None, :]


def self_attention_mask(
    attention_mask: torch.Tensor | None,
    length: int,
    causal: bool,
    position_bias: RelativePositionBias | None,
    device: torch.device,
    past: int = 0,
) -> torch.Tensor | None:
    """The side stack's self-attention mask: padding, causality and (T5) relative position bias combined.

    The queries are positions ``past .. past + length - 1`` (``past`` > 0 when earlier keys are cached), the keys
    positions ``0 .. past + length - 1``; ``attention_mask`` marks the keys that are not padding.
    """
    keep = padding_keep(attention_mask)
    queries = torch.arange(past, past + length, device=device)
    keys = torch.arange(past + length, device=device)
    if causal:
        lower = (keys[None, :] <= queries[:, None])[None, None]
        keep = lower if keep is None else keep & lower
    if position_bias is None:
        return keep
    bias = position_bias(queries, keys)
    return bias if keep is None else bias + additive_mask(keep)
