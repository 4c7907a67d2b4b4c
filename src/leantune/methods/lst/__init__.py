"""Ladder Side-Tuning (Sung, Cho, Bansal 2022): a small side network that never backpropagates through the backbone.

The frozen backbone runs under ``torch.no_grad()``; forward hooks on its blocks (found through the architecture
map) hand the block outputs ("ladders") to a side network whose width, feed-forward width and per-head width
are the backbone's divided by ``reduction_factor``, with the same number of heads. Before each kept side layer
``i`` the side state is gated with the projected ladder, ``s <- mu_i * s + (1 - mu_i) * Down_i(h_i)``,
``mu_i = sigmoid(alpha_i / T)``; the first ladder is the input of the backbone's first block (its embeddings).
Pre-norm encoder classifiers (ViT, DINOv2) normalise every ladder per token first (``ladder_norm``: their block
outputs are residual streams whose scale changes many times over across depth).
Encoder-decoder models get a side encoder and a side decoder that cross-attends to the side encoder; the
prediction is the frozen LM head applied to ``Up(s)`` (times ``d_model ** -0.5`` where the family rescales its
tied head input). Encoder-only and vision encoders get a side head on the side output, pooled as the family pools.
Autograd keeps nothing of the backbone except the ladder inputs, so training memory is a fraction of full
fine-tuning.

``config``      :class:`LSTConfig`
``network``     the side blocks and stacks (attention from :mod:`leantune.layers.attention`), ladder recording, masks
``method``      the registered method: checks, building the side network, forward passes, classification
``generation``  decoding with transformers' ``generate``, the side network supplying the logits
``pruning``     the Fisher-guided structured pruning of the backbone that initialises the side blocks
``ladder_cache`` ``TrainConfig.cache_ladders``: each training example's ladders stored (fp16, on disk) in the first
               epoch, so that later epochs skip the backbone
"""

from leantune.methods.lst.config import LSTConfig
from leantune.methods.lst.method import LadderSideTuning
from leantune.methods.lst.network import LSTNetwork, SideBlock, SideStack, record_ladders

__all__ = ["LSTConfig", "LSTNetwork", "LadderSideTuning", "SideBlock", "SideStack", "record_ladders"]
