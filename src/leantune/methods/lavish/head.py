"""The audio-visual classification head on the two streams' pooled final tokens."""

from __future__ import annotations

import torch
from torch import nn

# ArchitectureMap.pooling values of families with a class token: LAVISH pools ViTs by their CLS token.
CLASS_TOKEN_POOLINGS = ("first", "first+patch_mean")


def pool(states: torch.Tensor, family_pooling: str) -> torch.Tensor:
    """One vector per row: the class token where the family has one (ViT, DINOv2), else the mean token (Swin)."""
    return states[:, 0] if family_pooling in CLASS_TOKEN_POOLINGS else states.mean(dim=1)


class AudioVisualHead(nn.Module):
    """``Linear(hidden, classes)(Linear(2 d, hidden)([visual; audio]))``: no non-linearity between, as in the paper."""

    def __init__(self, width: int, hidden: int, num_labels: int, like: torch.Tensor) -> None:
        super().__init__()
        factory = {"device": like.device, "dtype": like.dtype}
        self.fuse = nn.Linear(2 * width, hidden, **factory)
        self.classifier = nn.Linear(hidden, num_labels, **factory)

    def forward(self, visual: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fuse(torch.cat([visual, audio], dim=-1)))
