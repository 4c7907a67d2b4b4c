"""Multi-head attention through ``scaled_dot_product_attention``: LST's side attention, LAVISH's latent tokens.

``output(softmax(scale * Q K^T + mask) V)`` over ``heads`` heads of width ``d_kv``, where ``Q = query(hidden)``,
``K = key(context)``, ``V = value(context)`` and ``context`` is ``hidden`` itself for self-attention.

- ``scale``: ``None`` is ``1 / sqrt(d_kv)``; T5's attention is unscaled (``scale=1.0``).
- ``projections=False`` drops the four projections: ``Q = hidden`` and ``K = V = context``, split into heads, with
  no output projection. LAVISH's latent-token attention ``softmax(Q K^T) V`` is this with ``scale=1.0``.
- ``mask``: boolean (``True`` = attend) or additive (added to the scores, such as T5's relative position bias),
  any shape that broadcasts to ``(batch, heads, queries, keys)``.
- ``dropout``: on the attention weights, while training.

Attention maps are not kept for backward where PyTorch has a fused kernel for the inputs (flash or
memory-efficient attention on CUDA); on CPU, or with a mask that needs a gradient, PyTorch may use its math
kernel, which keeps them.

A :class:`KeyValueCache` keeps keys and values between calls for incremental decoding: self-attention appends each
call's keys and values to the earlier ones, cross-attention computes them from the context on the first call and
reuses them after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KeyValueCache:
    """Keys and values ``(batch, heads, length, d_kv)`` of one attention block, kept between calls."""

    def __init__(self) -> None:
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None

    @property
    def empty(self) -> bool:
        return self.key is None

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's keys and values after the earlier ones; return all of them."""
        if self.key is not None:
            key, value = torch.cat([self.key, key], dim=2), torch.cat([self.value, value], dim=2)
        self.key, self.value = key, value
        return key, value


class MultiHeadAttention(nn.Module):
    """Multi-head self- or cross-attention with optional projections, scale, mask, dropout and key/value cache.

    ``d_kv`` defaults to ``d_model // heads``; ``context_width`` (the width of the context that keys and values
    are computed from) to ``d_model``. Parameters: ``query``, ``key``, ``value``, ``output`` (``nn.Linear``, or
    ``nn.Identity`` without projections).
    """

    def __init__(
        self,
        d_model: int,
        heads: int,
        d_kv: int | None = None,
        *,
        context_width: int | None = None,
        bias: bool = True,
        projections: bool = True,
        scale: float | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        d_kv = d_model // heads if d_kv is None else d_kv
        context_width = d_model if context_width is None else context_width
        inner = heads * d_kv
        if not projections and not inner == d_model == context_width:
            raise ValueError(f"attention without projections needs heads * d_kv == d_model == context_width, got "
                             f"{heads} * {d_kv}, {d_model}, {context_width}")
        self.heads, self.d_kv, self.scale, self.dropout = heads, d_kv, scale, dropout

        def projection(width_in: int, width_out: int) -> nn.Module:
            return nn.Linear(width_in, width_out, bias=bias) if projections else nn.Identity()

        self.query = projection(d_model, inner)
        self.key = projection(context_width, inner)
        self.value = projection(context_width, inner)
        self.output = projection(inner, d_model)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.d_kv).transpose(1, 2)

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        cache: KeyValueCache | None = None,
    ) -> torch.Tensor:
        """Attend from ``hidden`` (batch, queries, d_model) to ``context`` (``None``: to ``hidden`` itself)."""
        query = self._split_heads(self.query(hidden))
        if context is None:
            key, value = self._split_heads(self.key(hidden)), self._split_heads(self.value(hidden))
            if cache is not None:
                key, value = cache.append(key, value)
        elif cache is not None and not cache.empty:
            key, value = cache.key, cache.value
        else:
            key, value = self._split_heads(self.key(context)), self._split_heads(self.value(context))
            if cache is not None:
                cache.append(key, value)
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, scale=self.scale
        )
        batch, _, length, _ = attended.shape
        return self.output(attended.transpose(1, 2).reshape(batch, length, self.heads * self.d_kv))
