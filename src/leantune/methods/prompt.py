"""Prompt tuning (Lester et al. 2021): n trainable soft tokens prepended to the input embeddings.

Encoder-decoder models get the prompt in front of the encoder input, encoder-only and decoder-only models in
front of their only input; the attention mask (and ``token_type_ids``, and for decoder-only models the
``labels``) are extended to match. With ``reparameterize`` the prompt is ``Linear -> Tanh -> Linear`` applied to
the table at every forward, as in VL-Adapter's prompt baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leantune.backbones import Backbone
from leantune.config import MethodConfig, check_choice, check_positive, option
from leantune.errors import UnsupportedMethodError
from leantune.methods.base import AttachContext, TuningMethod
from leantune.registry import register


@dataclass
class PromptConfig(MethodConfig):
    """Soft prompt tokens."""

    method = "prompt"

    num_tokens: int = option(20, "Number of soft prompt tokens.")
    init: str = option("vocab", "vocab = copy the embeddings of random vocabulary tokens; random = N(0, 0.02).")
    reparameterize: bool = option(
        False, "Produce the prompt as MLP(table), Linear-Tanh-Linear (VL-Adapter's prompt baseline)."
    )
    reparameterize_hidden: int = option(800, "Hidden width of the reparameterisation MLP (VL-Adapter: 800).")

    def validate(self) -> None:
        super().validate()
        check_positive(self, "num_tokens", "reparameterize_hidden")
        check_choice(self, "init", ("vocab", "random"))


class SoftPrompt(nn.Module):
    """The prompt table, optionally followed by an MLP."""

    def __init__(self, config: PromptConfig, embeddings: nn.Embedding) -> None:
        super().__init__()
        table = embeddings.weight
        if config.init == "vocab":
            rows = torch.randint(0, table.shape[0], (config.num_tokens,))
            initial = table.detach()[rows].clone()
        else:
            initial = torch.randn(config.num_tokens, table.shape[1], dtype=table.dtype, device=table.device) * 0.02
        self.embedding = nn.Parameter(initial)
        self.mlp = None
        if config.reparameterize:
            d, hidden = table.shape[1], config.reparameterize_hidden
            self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d)).to(table)

    def forward(self, batch_size: int) -> torch.Tensor:
        prompt = self.embedding if self.mlp is None else self.mlp(self.embedding)
        return prompt.unsqueeze(0).expand(batch_size, -1, -1)


@register
class PromptTuning(TuningMethod):
    name = "prompt"
    config_class = PromptConfig
    merge_unsupported_reason = "a soft prompt adds input tokens; it has no weights to fold into"

    def attach(self, model: nn.Module, backbone: Backbone, context: AttachContext) -> nn.Module:
        if backbone.arch.modality != "text":
            raise UnsupportedMethodError(
                f"prompt tuning prepends token embeddings; family {backbone.family!r} ({backbone.arch.modality}) "
                "has no single token input"
            )
        self.kind = backbone.arch.kind
        return SoftPrompt(self.config, backbone.input_embeddings())

    def _prompted_inputs(self, tuned, kwargs: dict[str, Any], labels_too: bool) -> dict[str, Any]:
        input_ids = kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if input_ids is None:
                raise ValueError("prompt tuning needs input_ids or inputs_embeds")
            embeds = tuned.base_model.get_input_embeddings()(input_ids)
        batch, n = embeds.shape[0], self.config.num_tokens
        kwargs["inputs_embeds"] = torch.cat([tuned.method_modules(batch).to(embeds.dtype), embeds], dim=1)
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if kwargs.get("token_type_ids") is not None:
            types = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], dim=1)
        if labels_too and self.kind == "decoder" and kwargs.get("labels") is not None:
            labels = kwargs["labels"]
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        return kwargs

    def forward(self, tuned, **kwargs: Any) -> Any:
        return tuned.base_model(**self._prompted_inputs(tuned, kwargs, labels_too=True))

    def generate(self, tuned, **kwargs: Any) -> Any:
        return tuned.base_model.generate(**self._prompted_inputs(tuned, kwargs, labels_too=False))
