"""The multi-head attention block: equal to a hand-written softmax attention with and without projections, scale,
masks and context; the key/value cache gives the same outputs as recomputing everything."""

from __future__ import annotations

import math

import pytest
import torch

from leantune.layers.attention import KeyValueCache, MultiHeadAttention

D, HEADS = 12, 3


def reference(block: MultiHeadAttention, hidden: torch.Tensor, context: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale * Q K^T + mask) V head by head, with explicit matrices and loops."""
    context = hidden if context is None else context
    query, key, value = block.query(hidden), block.key(context), block.value(context)
    scale = 1 / math.sqrt(block.d_kv) if block.scale is None else block.scale
    heads = []
    for h in range(block.heads):
        part = slice(h * block.d_kv, (h + 1) * block.d_kv)
        scores = scale * query[..., part] @ key[..., part].transpose(-1, -2)
        if mask is not None:
            head_mask = mask[:, min(h, mask.shape[1] - 1)]
            scores = scores.masked_fill(~head_mask, float("-inf")) if mask.dtype == torch.bool else scores + head_mask
        heads.append(torch.softmax(scores, dim=-1) @ value[..., part])
    return block.output(torch.cat(heads, dim=-1))


def inputs(batch: int = 2, length: int = 5, width: int = D, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, length, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scale", [None, 1.0, 0.3])
def test_self_attention_equals_reference(scale: float | None) -> None:
    torch.manual_seed(0)
    block = MultiHeadAttention(D, HEADS, scale=scale).eval()
    hidden = inputs()
    torch.testing.assert_close(block(hidden), reference(block, hidden))
    assert [n for n, _ in block.named_parameters()] == [f"{p}.{w}" for p in ("query", "key", "value", "output")
                                                        for w in ("weight", "bias")]


def test_cross_attention_with_another_width_and_own_d_kv() -> None:
    torch.manual_seed(1)
    block = MultiHeadAttention(D, HEADS, d_kv=2, context_width=7, bias=False).eval()
    hidden, context = inputs(), inputs(length=9, width=7, seed=1)
    out = block(hidden, context=context)
    assert out.shape == hidden.shape and block.query.weight.shape == (HEADS * 2, D) and block.query.bias is None
    torch.testing.assert_close(out, reference(block, hidden, context))


def test_boolean_and_additive_masks_equal_reference() -> None:
    torch.manual_seed(2)
    block = MultiHeadAttention(D, HEADS).eval()
    hidden = inputs(length=6)
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[1, ..., 4:] = False  # padding of the second row
    keep = keep & torch.ones(6, 6, dtype=torch.bool).tril()  # and causal
    torch.testing.assert_close(block(hidden, keep), reference(block, hidden, mask=keep))
    bias = torch.randn(1, HEADS, 6, 6)  # one additive bias per head (T5's position bias)
    torch.testing.assert_close(block(hidden, bias), reference(block, hidden, mask=bias))
    # a padded key gets no weight: changing it leaves the row's output unchanged
    changed = hidden.clone()
    changed[1, 5] += 10.0
    torch.testing.assert_close(block(changed, keep)[1, :4], block(hidden, keep)[1, :4])


@pytest.mark.parametrize("heads", [1, 3])
def test_projection_free_attention_is_softmax_q_kt_v(heads: int) -> None:
    block = MultiHeadAttention(D, heads, projections=False, scale=1.0)
    assert not list(block.parameters())
    hidden, context = inputs(), inputs(length=4, seed=3)
    out = block(hidden, context=context)
    if heads == 1:  # LAVISH's latent attention written out: softmax(Q K^T) V, no scaling, no projections
        torch.testing.assert_close(out, torch.softmax(hidden @ context.transpose(1, 2), dim=-1) @ context)
    torch.testing.assert_close(out, reference(block, hidden, context))
    with pytest.raises(ValueError, match="without projections"):
        MultiHeadAttention(D, HEADS, d_kv=2, projections=False)


def test_self_attention_cache_equals_full_causal_recomputation() -> None:
    torch.manual_seed(4)
    block = MultiHeadAttention(D, HEADS).eval()
    hidden = inputs(length=7)
    full = block(hidden, torch.ones(7, 7, dtype=torch.bool).tril())
    cache = KeyValueCache()
    steps = [block(hidden[:, :3], torch.ones(3, 3, dtype=torch.bool).tril(), cache=cache)]  # a 3-token prefix
    for t in range(3, 7):  # then one token at a time, attending to everything cached so far
        steps.append(block(hidden[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    assert cache.key.shape == (2, HEADS, 7, D // HEADS)


def test_cross_attention_cache_computes_keys_once() -> None:
    torch.manual_seed(5)
    block = MultiHeadAttention(D, HEADS).eval()
    hidden, context = inputs(length=4), inputs(length=6, seed=6)
    cache = KeyValueCache()
    first = block(hidden[:, :1], context=context, cache=cache)
    key = cache.key
    second = block(hidden[:, 1:], context=context, cache=cache)
    assert cache.key is key  # reused, not recomputed or appended
    torch.testing.assert_close(torch.cat([first, second], dim=1), block(hidden, context=context))


def test_dropout_acts_on_attention_weights_only_while_training() -> None:
    torch.manual_seed(7)
    block = MultiHeadAttention(D, HEADS, dropout=0.5)
    hidden = inputs()
    evaluated = block.eval()(hidden)
    torch.testing.assert_close(evaluated, reference(block, hidden))
    assert not torch.allclose(block.train()(hidden), evaluated)
