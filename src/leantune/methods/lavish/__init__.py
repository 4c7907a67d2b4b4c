"""LAVISH (Lin, Sung, Lei, Bansal, Bertasius, CVPR 2023): a frozen image transformer as an audio-visual learner.

One frozen pretrained ViT, DINOv2, Swin or Swinv2 runs on RGB frames and on audio log-mel spectrograms shown as
3-channel images, through the same frozen weights. Every block (from ``start_layer``) gets four small trainable
adapters, one per stream beside the attention sub-layer and one per stream beside the feed-forward sub-layer; each
lets ``m`` latent tokens compress the other stream's tokens and its own stream read them (gated, starting at 0),
then applies a gated grouped bottleneck. Only the adapters and an audio-visual head train.

Design (decided on a prototype with a tiny random ``SwinModel``): both streams share the backbone's own forward,
stacked on the batch axis (frames first), and every adapter splits the batch through the per-call context
(:class:`~leantune.methods.lavish.streams.StreamLayout`). No block stepping through the architecture map:

- the stacked forward equals two separate forwards exactly (measured: max difference 0.0 on the tiny Swin), so
  nothing is re-implemented; Swin's window partition, shifted-window masks, padding and patch merging, Swinv2's
  res-post norms and DINOv2's layer scale run as transformers wrote them, and both streams pass every stage
  transition (the frozen patch merging) in the same call;
- block stepping would need each block cut at its feed-forward sub-layer, because both streams' post-attention
  states feed both streams' second adapters; HF Swin blocks cannot be cut there (the window partition and shift
  live inside the block's forward), and calling a block once per stream cannot give the other stream's
  post-attention state in time. Three hooks per block give exactly the paper's placement instead (see
  :mod:`~leantune.methods.lavish.adapter`);
- one call of twice the batch is also faster than two calls on CPU and keeps one autograd graph.

The price: both streams must fit one forward. Swin/Swinv2 need frames and spectrograms of the same height and
width (the paper's Swin setting: both 192 x 192). ViT-style backbones (one stage, a forward taking
``attention_mask``) also take a spectrogram of another size: each stream is embedded by the backbone's own
embeddings with position embeddings interpolated to its patch grid (bicubic, transformers'
``interpolate_pos_encoding``; the paper's code resamples them linearly along the token axis), the shorter one is
padded and masked out of attention, and the adapters and head see only real tokens.

``config``   :class:`LavishConfig`
``streams``  the two-stream runner and the per-call :class:`StreamLayout`
``adapter``  :class:`LavishAdapter` (latent-token attention + gated bottleneck) and :class:`LavishBlock` (4 per
             block, the hooks)
``head``     :class:`AudioVisualHead` on the two streams' pooled tokens (ViT: CLS; Swin: mean)
``method``   the registered :class:`Lavish` method
"""

from leantune.methods.lavish.adapter import LavishAdapter, LavishBlock
from leantune.methods.lavish.config import LavishConfig
from leantune.methods.lavish.head import AudioVisualHead
from leantune.methods.lavish.method import AUDIO_INPUT, Lavish
from leantune.methods.lavish.streams import StreamLayout, StreamShapeError, run_streams

__all__ = ["AUDIO_INPUT", "AudioVisualHead", "Lavish", "LavishAdapter", "LavishBlock", "LavishConfig", "StreamLayout",
           "StreamShapeError", "run_streams"]
