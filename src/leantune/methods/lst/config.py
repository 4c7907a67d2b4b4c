"""LST's options."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leantune.config import MethodConfig, check_choice, check_positive, check_range, option
from leantune.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INITS = ("auto", "fisher", "random")
PRUNING_VARIANTS = ("rows", "head_aligned")


@dataclass
class LSTConfig(MethodConfig):
    """Ladder side-tuning: a gated side network of width d / reduction_factor fed by the frozen backbone."""

    method = "lst"

    train_head: bool = option(
        False,
        "Must stay False: LST predicts with its own side head (or the frozen LM head), never with the backbone's "
        "fresh task head, which therefore is not trained.",
    )
    reduction_factor: int = option(8, "r: the side network's width, feed-forward width and per-head width are the "
                                      "backbone's divided by r (the number of heads is kept).")
    side_layers: list[int] | None = option(
        None, "Indices of the backbone layers that get a side layer (and a ladder); None = all. The same list is "
              "used for the encoder and the decoder (the paper's T5-base setting is [1,2,3,5,6,7,9,10,11]).")
    init: str = option(
        "auto", "fisher = side blocks copied from a Fisher-guided structured pruning of the backbone, computed "
                "from `data` given to wrap (the paper's default); random = fresh random weights; auto = random for "
                "vision backbones (their Fisher, through the fresh random head, trained worse than random on "
                "DINOv2 + MNIST, docs/lst.md), fisher for text models.")
    side_heads: int | None = option(
        None, "Attention heads of each side block; None = the backbone's count (the paper). Fewer, wider heads (the "
              "same query/key/value widths and parameters) shrink the attention maps that are kept for backward "
              "where no fused kernel runs; must divide the backbone's head count. On T5 a side head's position "
              "bias starts as the mean over its group of backbone heads.")
    fisher_samples: int = option(1024, "At most this many task examples (batch size 1) form the empirical Fisher "
                                       "of the Fisher init.")
    fisher_fraction: float = option(
        0.1, "The Fisher init reads at most this fraction of the training examples in `data` (rounded up), where "
             "`data` tells its size (a list of batches, or an object with num_examples), so that init time "
             "scales with the data; 1.0 = only fisher_samples bounds it.")
    fisher_pruning: str = option(
        "rows", "How query/key/value rows are kept: rows = the paper's code (any inner/r rows, regrouped into heads "
                "in index order); head_aligned = the d_kv/r most important rows of each head, so side head h comes "
                "from backbone head h (measured equal to rows, see docs/lst.md).")
    ladder_norm: bool | None = option(
        None, "Normalise every ladder per token (zero mean, unit variance, no parameters) before its down-"
              "projection. None = on for pre-norm encoder classifiers (ViT, DINOv2, CLIP's vision tower), whose "
              "block outputs are raw residual streams; off for post-norm encoders (BERT), encoder-decoder and "
              "vision-language models (the paper's code). Measured on DINOv2 + MNIST in docs/lst.md.")
    gate_temperature: float = option(0.1, "T in mu_i = sigmoid(alpha_i / T).")
    gate_init: float = option(0.0, "Initial alpha_i of every gate (0.0 gives mu = 0.5).")
    side_dropout: float = option(0.1, "Dropout inside the side network (attention weights, sub-layer outputs).")
    backbone_dtype: str = option(
        "float32", "Dtype the frozen backbone is cast to and runs in: float32, bfloat16 or float16. The side "
                   "network always trains in float32; the ladders are projected in the backbone's dtype so autograd "
                   "keeps them at its size.")
    backbone_train_mode: bool = option(
        True, "Keep the backbone's dropout active while training, as the paper's code does; False runs the "
              "backbone in eval mode always.")

    def validate(self) -> None:
        if self.train_head:
            raise ConfigError("LSTConfig.train_head must be False: LST predicts with its side head, got True")
        check_positive(self, "reduction_factor", "fisher_samples", "fisher_fraction", "gate_temperature")
        check_range(self, "fisher_fraction", 0.0, 1.0, high_inclusive=True)
        if self.side_heads is not None:
            check_positive(self, "side_heads")
        layers = self.side_layers
        if layers is not None and (not layers or min(layers) < 0 or len(set(layers)) != len(layers)):
            raise ConfigError(f"LSTConfig.side_layers must be None or a non-empty list of distinct layer indices "
                              f">= 0, got {layers!r}")
        check_choice(self, "init", INITS)
        check_choice(self, "fisher_pruning", PRUNING_VARIANTS)
        check_choice(self, "backbone_dtype", tuple(DTYPES))
        check_range(self, "side_dropout", 0.0, 1.0)
