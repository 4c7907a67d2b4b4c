"""LAVISH's options. The defaults are the paper's AVE configuration (Swinv2-Large: r=8, G=2, m=2, BatchNorm and
both LayerNorms on, gated audio adapters)."""

from __future__ import annotations

from dataclasses import dataclass

from leantune.config import MethodConfig, check_choice, check_positive, option
from leantune.errors import ConfigError

LATENT_INITS = ("uniform", "zeros")


@dataclass
class LavishConfig(MethodConfig):
    """Latent audio-visual adapters: one frozen image transformer runs on frames and on spectrograms."""

    method = "lavish"

    train_head: bool = option(
        False, "Must stay False: LAVISH predicts with its own audio-visual head (always trained and saved); the "
               "model's own classifier, if it has one, is not used.")
    latent_tokens: int = option(2, "m: learnable latent tokens per adapter that compress the other modality's tokens "
                                   "(AVE 2, AVS 16, AVQA 64).")
    latent_init: str = option("uniform", "Initial latent tokens: uniform = U[0, 1) (the AVE code), zeros (the AVS and "
                                         "AVQA code).")
    reduction_factor: int = option(8, "r: the bottleneck width is hidden_size // r.")
    groups: int = option(2, "G: groups of the 1x1 down- and up-projections (block-diagonal weights); must divide "
                            "hidden_size and hidden_size // r at every stage.")
    bidirectional: bool = option(
        True, "True: both streams read the other modality through latent tokens. False: only the visual stream does "
              "(audio -> latents -> visual); the audio stream gets plain gated bottleneck adapters.")
    cross_modal: bool = option(
        True, "False: no latent tokens and no cross-modal attention at all: plain gated bottleneck adapters in both "
              "streams (the paper's ablation).")
    batch_norm: bool = option(True, "BatchNorm after the down- and after the up-projection (channels, tokens as the "
                                    "spatial axis).")
    layer_norm_before: bool = option(True, "LayerNorm on the adapter's input, before the down-projection.")
    layer_norm_after: bool = option(True, "LayerNorm on the adapter's output, before the output gate.")
    audio_gate: bool = option(
        True, "Scale the audio-stream adapters' outputs by a gate initialised to 0, as the visual ones always are. "
              "False: ungated audio adapters, and the model no longer starts as the frozen backbone.")
    start_layer: int = option(0, "Blocks with a lower index (counted over all stages) get no adapters; the number of "
                                 "blocks = no adapters at all: the frozen backbone with the audio-visual head (the "
                                 "paper's baseline without LAVISH).")
    train_backbone_norms: bool = option(False, "Also train every LayerNorm of the backbone (the AVQA and ViT-B "
                                               "recipes).")
    head_hidden: int = option(512, "Width of the head's hidden layer: Linear(2 d, head_hidden) -> Linear(head_hidden, "
                                   "num_labels), no non-linearity between them (as the paper's AVE head).")
    num_labels: int | None = option(None, "Classes of the head (AVE: 29); None = the model config's num_labels.")

    def validate(self) -> None:
        if self.train_head:
            raise ConfigError("LavishConfig.train_head must be False: LAVISH predicts with its own audio-visual head, "
                              "got True")
        check_positive(self, "latent_tokens", "reduction_factor", "groups", "head_hidden")
        check_choice(self, "latent_init", LATENT_INITS)
        if self.start_layer < 0:
            raise ConfigError(f"LavishConfig.start_layer must be >= 0, got {self.start_layer!r}")
        if self.num_labels is not None:
            check_positive(self, "num_labels")
