"""Prompt tuning (Lester et al. 2021): n trainable soft tokens prepended to the input embeddings.

Encoder-decoder models get the prompt in front of the encoder input, encoder-only and decoder-only models in
front of their only input (:func:`leantune.layers.prefix.insert_tokens`); the attention mask (and
``token_type_ids``, and for decoder-only models the ``labels``) are extended to match. With ``reparameterize``
the prompt is ``Linear -> Tanh -> Linear`` applied to the table at every forward, as in VL-Adapter's prompt
baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leantune.backbones import Backbone
from leantune.config import check_choice, check_positive, option
from leantune.context import CallInput, current_task
from leantune.layers.prefix import insert_tokens
from leantune.methods.base import AttachContext, TuningMethod
from leantune.methods.sharing import TaskSharingConfig
from leantune.registry import register


@dataclass
class PromptConfig(TaskSharingConfig):
    """Soft prompt tokens, one prompt for every task or one per task."""

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


class TaskPrompts(nn.Module):
    """One :class:`SoftPrompt` per task; each call uses the prompt of its task."""

    def __init__(self, prompts: dict[str, SoftPrompt]) -> None:
        super().__init__()
        self.tasks = list(prompts)
        self.per_task = nn.ModuleDict(prompts)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.per_task[current_task(self.tasks)](batch_size)


@register
class PromptTuning(TuningMethod):
    name = "prompt"
    config_class = PromptConfig
    merge_unsupported_reason = "a soft prompt adds input tokens; it has no weights to fold into"
    default_learning_rate = 3e-2

    def unsupported_reason(self, backbone: Backbone) -> str | None:
        if backbone.arch.modality != "text":
            return f"prompt tuning prepends token embeddings; a {backbone.arch.modality} model has no token input"
        return None

    def declared_inputs(self) -> tuple[CallInput, ...]:
        return self.config.task_input()

    def attach(self, model: nn.Module, backbone: Backbone, context: AttachContext) -> nn.Module:
        self.decoder_only = backbone.arch.kind == "decoder"
        config: PromptConfig = self.config
        if config.sharing == "single":
            return SoftPrompt(config, backbone.input_embeddings())
        return TaskPrompts({task: SoftPrompt(config, backbone.input_embeddings()) for task in config.tasks})

    def _prompted(self, tuned, kwargs: dict[str, Any], labels_too: bool) -> dict[str, Any]:
        batch = next(v for k, v in kwargs.items() if k in ("input_ids", "inputs_embeds")).shape[0]
        return insert_tokens(kwargs, tuned.method_modules(batch), tuned.base_model.get_input_embeddings(),
                             extend_labels=labels_too and self.decoder_only)

    def forward(self, tuned, **kwargs: Any) -> Any:
        return tuned.base_model(**self._prompted(tuned, kwargs, labels_too=True))

    def generate(self, tuned, **kwargs: Any) -> Any:
        return tuned.base_model.generate(**self._prompted(tuned, kwargs, labels_too=False))
