"""The LAVISH adapter and the four adapters of one block.

:class:`LavishAdapter`, for one stream with tokens ``X`` (n x d) and the other stream's tokens ``Y`` (k x d) at the
same point of the same block, with ``m`` latent tokens ``L`` (m x d); row-wise softmax, no 1/sqrt(d) scaling, no
query/key/value projections, one head:

1. compress: ``S = L + softmax(L Y^T) Y``            (the latents read the other modality)
2. fuse:     ``X' = X + g_av * softmax(X S^T) S``    (the stream reads the latents; ``g_av`` starts at 0)
3. ``O = LN_after(BN(up(ReLU(BN(down(LN_before(X')))))))``, ``down``/``up`` 1x1 projections d -> d/r -> d with
   ``G`` groups (block-diagonal weights) and no bias, BatchNorm over channels with the tokens as spatial axis
4. ``O <- g * O`` (``g`` starts at 0); ``O`` is added to the stream.

Without cross-modal attention steps 1-2 are skipped (a plain gated bottleneck adapter). The attention is
:class:`leantune.layers.attention.MultiHeadAttention` with ``projections=False, scale=1.0`` and one head: exactly
``softmax(Q K^T) V``, with no parameters of its own, on PyTorch's fused kernel where one applies.

:class:`LavishBlock` holds a block's four adapters (each stream's adapter parallel to the attention sub-layer and
the one parallel to the feed-forward sub-layer) and runs them from three hooks on the block's own forward, both
streams stacked on the batch axis (:mod:`leantune.methods.lavish.streams`):

- before the block: ``R1 = adapters_1(X_in)`` from the block input of each stream and the other's;
- before the feed-forward sub-layer reads the post-attention state ``X_mid``: it reads ``X_mid + R1`` instead,
  and ``R2 = adapters_2(X_mid + R1)``;
- after the block: ``R1 + R2`` is added to its output.

So the block computes ``X_mid' = X_in + Attn(X_in) + R1`` and ``X_out = X_mid' + MLP(X_mid') + R2`` for both
streams together, as the paper's block does (its input taken before each sub-layer, its output added after it).
The hooks are bound methods of the block's ``lavish`` module, so a deep copy of the model runs its own adapters.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from leantune.layers.attention import MultiHeadAttention
from leantune.methods.lavish.config import LavishConfig
from leantune.methods.lavish.streams import current_layout


class GroupedLinear(nn.Module):
    """A 1x1 projection with ``groups`` diagonal blocks and no bias: group ``g`` maps its slice of the input channels
    to its slice of the output channels: the paper's grouped ``Conv1d`` of kernel 1, written as one batched matmul
    on (batch, tokens, channels), about twice as fast forward and backward on CPU. ``weight``: (groups, in/groups,
    out/groups), initialised as ``nn.Conv1d`` initialises its weight (uniform, bound 1/sqrt(in/groups))."""

    def __init__(self, in_features: int, out_features: int, groups: int, like: torch.Tensor) -> None:
        super().__init__()
        self.groups = groups
        shape = (groups, in_features // groups, out_features // groups)
        bound = 1 / math.sqrt(shape[1])
        self.weight = nn.Parameter(torch.empty(shape, device=like.device, dtype=like.dtype).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.reshape(*x.shape[:-1], self.groups, -1)
        return torch.einsum("...gi,gio->...go", grouped, self.weight).reshape(*x.shape[:-1], -1)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channels of (batch, tokens, channels), every token of every row one sample (as
    ``BatchNorm1d`` on (batch, channels, tokens) computes it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class LavishAdapter(nn.Module):
    """One LAVISH adapter of one stream at one point of one block (see the module docstring)."""

    def __init__(self, hidden_size: int, config: LavishConfig, cross_modal: bool, gated: bool,
                 like: torch.Tensor) -> None:
        super().__init__()
        bottleneck = hidden_size // config.reduction_factor
        factory = {"device": like.device, "dtype": like.dtype}
        self.cross_modal = cross_modal
        if cross_modal:
            shape = (config.latent_tokens, hidden_size)
            uniform = config.latent_init == "uniform"
            self.latents = nn.Parameter(torch.rand(shape, **factory) if uniform else torch.zeros(shape, **factory))
            self.fusion_gate = nn.Parameter(torch.zeros(1, **factory))
            self.attend = MultiHeadAttention(hidden_size, 1, projections=False, scale=1.0)
        self.norm_before = nn.LayerNorm(hidden_size, **factory) if config.layer_norm_before else nn.Identity()
        self.down = GroupedLinear(hidden_size, bottleneck, config.groups, like)
        self.down_norm = TokenBatchNorm(bottleneck, **factory) if config.batch_norm else nn.Identity()
        self.up = GroupedLinear(bottleneck, hidden_size, config.groups, like)
        self.up_norm = TokenBatchNorm(hidden_size, **factory) if config.batch_norm else nn.Identity()
        self.norm_after = nn.LayerNorm(hidden_size, **factory) if config.layer_norm_after else nn.Identity()
        self.gate = nn.Parameter(torch.zeros(1, **factory)) if gated else None

    def compress(self, other: torch.Tensor) -> torch.Tensor:
        """``S = L + softmax(L Y^T) Y`` for each row of the batch: (batch, m, d)."""
        latents = self.latents.expand(other.shape[0], -1, -1)
        return latents + self.attend(latents, context=other)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """The residual this adapter adds to its stream ``x`` (batch, n, d), given the other stream ``other``."""
        if self.cross_modal:
            x = x + self.fusion_gate * self.attend(x, context=self.compress(other))
        h = self.up_norm(self.up(torch.relu(self.down_norm(self.down(self.norm_before(x))))))
        h = self.norm_after(h)
        return h if self.gate is None else self.gate * h


class LavishBlock(nn.Module):
    """The four adapters of one block and the hooks that run them (see the module docstring)."""

    def __init__(self, hidden_size: int, config: LavishConfig, like: torch.Tensor) -> None:
        super().__init__()
        audio_reads_visual = config.cross_modal and config.bidirectional

        def adapter(visual: bool) -> LavishAdapter:
            cross = config.cross_modal if visual else audio_reads_visual
            return LavishAdapter(hidden_size, config, cross, visual or config.audio_gate, like)

        self.visual_attention, self.audio_attention = adapter(True), adapter(False)
        self.visual_feed_forward, self.audio_feed_forward = adapter(True), adapter(False)
        self._attention_residual: torch.Tensor | None = None
        self._feed_forward_residual: torch.Tensor | None = None

    def residual(self, hidden: torch.Tensor, visual_adapter: LavishAdapter,
                 audio_adapter: LavishAdapter) -> torch.Tensor:
        """Both streams' adapter outputs for the stacked ``hidden``, stacked the same way (zeros on padding)."""
        layout = current_layout()
        visual, audio = layout.split(hidden)
        return layout.join(visual_adapter(visual, audio), audio_adapter(audio, visual), hidden.shape[1])

    # --- hooks ------------------------------------------------------------------------------------------------------
    def before_block(self, _block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self._attention_residual = self.residual(hidden, self.visual_attention, self.audio_attention)

    def before_feed_forward(self, _module: nn.Module, args: tuple) -> tuple:
        if self._attention_residual is None:
            raise RuntimeError("LAVISH: the feed-forward sub-layer ran before its block's start")
        state = args[0] + self._attention_residual
        self._feed_forward_residual = self.residual(state, self.visual_feed_forward, self.audio_feed_forward)
        return (state, *args[1:])

    def after_block(self, _block: nn.Module, _args: tuple, output: Any) -> Any:
        if self._attention_residual is None or self._feed_forward_residual is None:
            raise RuntimeError("LAVISH: a block ended without passing its feed-forward sub-layer")
        added = self._attention_residual + self._feed_forward_residual
        self._attention_residual = self._feed_forward_residual = None
        if isinstance(output, torch.Tensor):
            return output + added
        return (output[0] + added, *output[1:])
