"""The two-stream runner: frames and spectrograms through one call of the frozen backbone's own forward.

Both streams are stacked on the batch axis, visual rows first. Where the two inputs have the same height and width
(every Swin/Swinv2 use, and ViTs fed equal-sized images) their pixels are simply concatenated. A ViT-style backbone
(one stage, a forward that takes ``attention_mask``) also accepts a spectrogram of another size: each stream is
embedded by the backbone's own embedding module (position embeddings interpolated to its patch grid), the shorter
token sequence is padded at the end, the padding is masked out of the backbone's attention, and a forward hook on
the embeddings hands the stacked tokens to the rest of the forward. Padded tokens never reach a real token, an
adapter (which sees only each stream's real tokens, :class:`StreamLayout`) or the head.

:class:`StreamLayout` is the per-call input (:mod:`leantune.context`, key :data:`STREAMS`) through which every
adapter finds its stream's rows and tokens.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leantune.backbones import Backbone
from leantune.context import call_inputs, get
from leantune.errors import LeantuneError

STREAMS = "lavish_streams"


class StreamShapeError(LeantuneError, ValueError):
    """The frames and spectrograms of a call cannot run together through this backbone."""


@dataclass(frozen=True)
class StreamLayout:
    """Where the two streams are in a stacked hidden state: rows ``[:batch]`` visual, ``[batch:]`` audio, each with
    its first ``*_tokens`` tokens real (``None``: all of them)."""

    batch: int
    visual_tokens: int | None = None
    audio_tokens: int | None = None

    def split(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(visual, audio)``: each stream's rows and real tokens."""
        if hidden.shape[0] != 2 * self.batch:
            raise StreamShapeError(f"LAVISH expected {2 * self.batch} stacked rows ({self.batch} frames, "
                                   f"{self.batch} spectrograms), a block got {hidden.shape[0]}")
        return hidden[: self.batch, : self.visual_tokens], hidden[self.batch:, : self.audio_tokens]

    def join(self, visual: torch.Tensor, audio: torch.Tensor, tokens: int) -> torch.Tensor:
        """The inverse of :meth:`split`: both streams padded with zeros to ``tokens`` and stacked."""
        return torch.cat([_pad_tokens(visual, tokens), _pad_tokens(audio, tokens)])


def current_layout() -> StreamLayout:
    """The stream layout of the current call (an error naming the inputs when the backbone runs outside one)."""
    layout = get(STREAMS, None)
    if layout is None:
        raise StreamShapeError("LAVISH blocks run only inside a call of the tuned model with pixel_values (frames) "
                               "and audio_values (spectrograms); the backbone was called directly")
    return layout


def _pad_tokens(states: torch.Tensor, tokens: int) -> torch.Tensor:
    return states if states.shape[1] == tokens else F.pad(states, (0, 0, 0, tokens - states.shape[1]))


def run_streams(backbone: Backbone, visual: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states (after the backbone's final norm) of the visual and the audio stream, real tokens only."""
    if visual.dim() != 4 or audio.dim() != 4 or visual.shape[:2] != audio.shape[:2]:
        raise StreamShapeError(f"LAVISH takes pixel_values and audio_values as (batch, channels, height, width) with "
                               f"the same batch and channels, got {tuple(visual.shape)} and {tuple(audio.shape)}")
    base = getattr(backbone.model, "base_model", backbone.model)
    audio = audio.to(visual.dtype)
    if visual.shape[-2:] == audio.shape[-2:]:
        layout = StreamLayout(visual.shape[0])
        with call_inputs({STREAMS: layout}):
            output = base(pixel_values=torch.cat([visual, audio]), **_size_options(base.forward, base, visual))
        return layout.split(output.last_hidden_state)
    return _run_padded(backbone, base, visual, audio)


def _run_padded(backbone: Backbone, base: nn.Module, visual: torch.Tensor,
                audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    stack = next(iter(backbone.stacks.values()))
    sizes = f"{tuple(visual.shape[-2:])} and {tuple(audio.shape[-2:])}"
    if len(stack.stages) > 1 or "attention_mask" not in inspect.signature(base.forward).parameters:
        raise StreamShapeError(
            f"LAVISH on {backbone.family} runs both streams through one forward, so pixel_values and audio_values "
            f"need the same height and width (got {sizes}); pad or crop the spectrogram to the frame size "
            "(leantune.audio.fit_length)")
    embeddings = stack.embeddings[1]
    visual_tokens, audio_tokens = (_embed(embeddings, base, pixels) for pixels in (visual, audio))
    tokens = max(visual_tokens.shape[1], audio_tokens.shape[1])
    layout = StreamLayout(visual.shape[0], visual_tokens.shape[1], audio_tokens.shape[1])
    stacked = layout.join(visual_tokens, audio_tokens, tokens)
    mask = torch.zeros(stacked.shape[:2], dtype=torch.long, device=stacked.device)
    mask[: layout.batch, : layout.visual_tokens] = 1
    mask[layout.batch:, : layout.audio_tokens] = 1
    handle = embeddings.register_forward_hook(lambda _module, _args, _output: stacked)
    try:
        with call_inputs({STREAMS: layout}):
            output = base(pixel_values=visual, attention_mask=mask, **_size_options(base.forward, base, visual))
    finally:
        handle.remove()
    return layout.split(output.last_hidden_state)


def _embed(embeddings: nn.Module, base: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Patch (and position) embeddings of ``pixels`` from the backbone's own module, its hooks bypassed."""
    tokens = embeddings.forward(pixels, **_size_options(embeddings.forward, base, pixels))
    return tokens[0] if isinstance(tokens, tuple) else tokens


def _size_options(function: Any, base: nn.Module, pixels: torch.Tensor) -> dict[str, bool]:
    """``interpolate_pos_encoding=True`` where ``function`` takes it and ``pixels`` differ from the config size."""
    size = getattr(base.config, "image_size", None)
    expected = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    takes_option = "interpolate_pos_encoding" in inspect.signature(function).parameters
    if tuple(pixels.shape[-2:]) == expected or not takes_option:
        return {}
    return {"interpolate_pos_encoding": True}
