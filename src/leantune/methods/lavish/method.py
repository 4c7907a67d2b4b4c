"""The registered ``lavish`` method: checks, attaching the block adapters and the head, the two-stream forward."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from leantune.backbones import Backbone, Block
from leantune.context import CallInput, get
from leantune.errors import ConfigError
from leantune.methods.base import AttachContext, TuningMethod
from leantune.methods.lavish.adapter import LavishBlock
from leantune.methods.lavish.config import LavishConfig
from leantune.methods.lavish.head import AudioVisualHead, pool
from leantune.methods.lavish.streams import run_streams
from leantune.registry import register

if TYPE_CHECKING:
    from leantune.api import TunedModel

AUDIO_INPUT = "audio_values"
MODULE = "lavish"


def feed_forward_entry(block: Block, norm_position: str) -> tuple[str, nn.Module] | None:
    """The module that first reads a block's post-attention residual state: the feed-forward norm where the norm
    comes first (ViT, DINOv2, Swin), the feed-forward input projection where it comes after (Swinv2), or ``None``."""
    if norm_position == "pre":
        return block.sublayer_norm("feed_forward")
    if norm_position == "res-post":
        found = block.find("feed_forward") or block.find("ffn_input")
        return found[0] if len(found) == 1 else None
    return None


def check_widths(config: LavishConfig, block: Block) -> None:
    """Refuse a reduction factor or group count that does not fit the block's width, naming the option."""
    hidden = block.hidden_size
    bottleneck = hidden // config.reduction_factor
    if bottleneck < 1:
        raise ConfigError(f"LavishConfig.reduction_factor={config.reduction_factor} leaves no bottleneck at width "
                          f"{hidden} (block {block.path})")
    if hidden % config.groups or bottleneck % config.groups:
        raise ConfigError(f"LavishConfig.groups={config.groups} must divide the width {hidden} and the bottleneck "
                          f"{bottleneck} of block {block.path}")


@register
class Lavish(TuningMethod):
    """LAVISH (Lin et al., CVPR 2023): one frozen image transformer, two streams, latent audio-visual adapters."""

    name = "lavish"
    config_class = LavishConfig
    # The audio-visual head is new, so outputs differ from the base model's; the backbone features of both streams
    # equal the frozen backbone's at init (both gates start at 0), which tests/test_lavish.py checks.
    identity_at_init = False
    call_inputs = (CallInput(AUDIO_INPUT, "the audio log-mel spectrograms as 3-channel images, one per pixel_values "
                                          "row (leantune.audio.spectrogram_image)"),)
    default_learning_rate = 1e-4
    merge_unsupported_reason = ("its adapters attend across the two streams and it predicts through a new "
                                "audio-visual head; there are no backbone weights to fold them into")

    def unsupported_reason(self, backbone: Backbone) -> str | None:
        arch = backbone.arch
        if arch.modality != "vision" or arch.kind != "encoder" or len(backbone.stacks) != 1:
            return (f"lavish needs an image transformer encoder (ViT, DINOv2, Swin, Swinv2); family "
                    f"{backbone.family!r} is a {arch.modality} {arch.kind}")
        for block in backbone.blocks():
            if feed_forward_entry(block, arch.norm_position) is None:
                return f"lavish finds no feed-forward input in block {block.path} ({arch.norm_position}-norm)"
            if hasattr(block.module, MODULE):
                return f"block {block.path} already has an attribute {MODULE!r}"
        return None

    def attach(self, model: nn.Module, backbone: Backbone, context: AttachContext) -> nn.Module:
        config: LavishConfig = self.config
        stack = next(iter(backbone.stacks.values()))
        if config.start_layer > len(stack.blocks):
            raise ConfigError(f"LavishConfig.start_layer={config.start_layer} is past the last block: the model has "
                              f"{len(stack.blocks)} blocks (start_layer={len(stack.blocks)}: no adapters, the frozen "
                              "backbone with the audio-visual head)")
        blocks = [block for block in stack.blocks if block.index >= config.start_layer]
        like = stack.blocks[0].get("attention_output")[1].weight
        for block in blocks:
            check_widths(config, block)
            lavish = LavishBlock(block.hidden_size, config, like)
            block.module.add_module(MODULE, lavish)
            block.module.register_forward_pre_hook(lavish.before_block, with_kwargs=True)
            feed_forward_entry(block, backbone.arch.norm_position)[1].register_forward_pre_hook(
                lavish.before_feed_forward)
            block.module.register_forward_hook(lavish.after_block)
        if config.train_backbone_norms:
            for _, norm in backbone.norm_modules():
                norm.requires_grad_(True)
        num_labels = config.num_labels or model.config.num_labels
        return AudioVisualHead(stack.blocks[-1].hidden_size, config.head_hidden, num_labels, like)

    def forward(self, tuned: TunedModel, pixel_values: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **unexpected: Any) -> ImageClassifierOutput:
        if pixel_values is None:
            raise ConfigError("lavish needs pixel_values (the frames) in every call")
        if unexpected:
            raise ConfigError(f"lavish takes pixel_values, {AUDIO_INPUT} and labels; unexpected: "
                              f"{', '.join(sorted(unexpected))}")
        visual, audio = self.features(tuned, pixel_values, get(AUDIO_INPUT))
        logits = tuned.method_modules(visual, audio)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return ImageClassifierOutput(loss=loss, logits=logits)

    @staticmethod
    def features(tuned: TunedModel, pixel_values: torch.Tensor,
                 audio_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled final features of the visual and the audio stream, (batch, d) each."""
        visual, audio = run_streams(tuned.backbone, pixel_values, audio_values)
        pooling = tuned.backbone.arch.pooling
        return pool(visual, pooling), pool(audio, pooling)
