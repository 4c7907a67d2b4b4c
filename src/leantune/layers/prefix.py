"""Adding tokens to an input: a soft prompt (in front) and visual tokens (after the text) are one operation.

:func:`insert_tokens` puts ``(batch, n, d)`` tokens in front of (or after) the embedded input and extends the
attention mask (and ``token_type_ids``, and for decoder-only models the ``labels`` with -100) to match. The
new tokens get no positions of their own beyond what the model adds to every input embedding.
"""

from __future__ import annotations

from typing import Any

import torch

from leantune.errors import ConfigError


def insert_tokens(kwargs: dict[str, Any], tokens: torch.Tensor, embed: torch.nn.Module, at_end: bool = False,
                  token_mask: torch.Tensor | None = None, extend_labels: bool = False) -> dict[str, Any]:
    """Model keyword arguments with ``tokens`` before (or, ``at_end``, after) the embedded input.

    ``token_mask`` (batch, n) marks which new tokens are real (default: all). ``kwargs`` is modified.
    """
    input_ids = kwargs.pop("input_ids", None)
    embeds = kwargs.pop("inputs_embeds", None)
    if embeds is None:
        if input_ids is None:
            raise ConfigError("adding tokens to the input needs input_ids or inputs_embeds")
        embeds = embed(input_ids)
    batch, n = embeds.shape[0], tokens.shape[1]

    def joined(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return torch.cat([old, new] if at_end else [new, old], dim=1)

    kwargs["inputs_embeds"] = joined(embeds, tokens.to(embeds.dtype))
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    new_mask = mask.new_ones(batch, n) if token_mask is None else token_mask.to(mask.dtype)
    kwargs["attention_mask"] = joined(mask, new_mask)
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = joined(kwargs["token_type_ids"], kwargs["token_type_ids"].new_zeros(batch, n))
    if extend_labels and kwargs.get("labels") is not None:
        kwargs["labels"] = joined(kwargs["labels"], kwargs["labels"].new_full((batch, n), -100))
    return kwargs
