"""A vision-language model around any Hugging Face text backbone (VL-T5 / VL-BART, as VL-Adapter uses them).

Frozen image features (``visual_features``: ``(batch, tokens, feature_dim)``, or ``(batch, images, tokens,
feature_dim)`` for several images per example, NLVR2's two) go through a trainable :class:`VisualProjection`
and become tokens placed after the text tokens, with their attention mask
(:func:`leantune.layers.prefix.insert_tokens`). Encoder-decoder backbones (T5, BART) answer by generation;
encoder-only backbones (BERT-like) answer by classification over an answer vocabulary (:class:`AnswerHead` on the
pooled output).

The wrapper exposes the text model's ``config`` and ``base_model``, so ``leantune.wrap`` finds the text model's
architecture map; ``leantune_trainable_modules`` names the projection (and the answer head), which every method
trains and saves.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from leantune.backbones import find_architecture, is_norm
from leantune.config import check_choice
from leantune.errors import ConfigError, UnsupportedMethodError, UnsupportedModelError
from leantune.layers.pooling import masked_mean
from leantune.layers.prefix import insert_tokens

VISUAL_INPUTS = ("visual_features", "visual_boxes", "visual_mask")
"""Keyword inputs the model takes beside the text ones."""
POOLINGS = ("mean", "pooler", "cls", "text+visual", "text+images")
BOX_FEATURES = 5  # x1, y1, x2, y2 (normalised to [0, 1]) and the box area


def norm_like(text_model: nn.Module, width: int) -> Callable[[], nn.Module]:
    """A factory of norms of the text model's kind: RMSNorm where its norms have no bias (T5), else LayerNorm."""
    norm = next((m for m in text_model.modules() if is_norm(m)), None)
    if norm is None:
        return lambda: nn.LayerNorm(width)
    eps = float(getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6))
    if getattr(norm, "bias", None) is None:
        return lambda: nn.RMSNorm(width, eps=eps)
    return lambda: nn.LayerNorm(width, eps=eps)


class VisualProjection(nn.Module):
    """Visual features to text-width tokens: the sum of Linear + norm of the features, Linear + norm of the
    box vector (zeros when no boxes are given, CLIP grids: a learned constant), and an image-order embedding.
    With ``object_order`` (VL-T5), token i also adds row ``vocab - 1 - i`` of the frozen word embeddings."""

    def __init__(self, feature_dim: int, width: int, make_norm: Callable[[], nn.Module], num_images: int = 2,
                 use_boxes: bool = True) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(feature_dim, width), make_norm())
        self.boxes = nn.Sequential(nn.Linear(BOX_FEATURES, width), make_norm()) if use_boxes else None
        self.image_order = nn.Embedding(num_images, width)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor | None = None,
                object_order: torch.Tensor | None = None) -> torch.Tensor:
        """``features`` (batch, [images,] tokens, feature_dim) -> (batch, images * tokens, width)."""
        if features.dim() == 3:
            features = features.unsqueeze(1)
            boxes = None if boxes is None else boxes.unsqueeze(1)
        if features.dim() != 4:
            raise ConfigError(f"visual_features must be (batch, tokens, dim) or (batch, images, tokens, dim), got "
                              f"shape {tuple(features.shape)}")
        batch, images, tokens, _ = features.shape
        if images > self.image_order.num_embeddings:
            raise ConfigError(f"visual_features hold {images} images per example; this model was built for at most "
                              f"{self.image_order.num_embeddings} (num_images)")
        dtype = self.features[0].weight.dtype
        out = self.features(features.to(dtype))
        if self.boxes is not None:
            out = out + self.boxes(box_vectors(boxes, features.shape[:3], features.device, dtype))
        order = torch.arange(images, device=features.device)
        out = out + self.image_order(order)[None, :, None, :]
        if object_order is not None:
            rows = object_order.shape[0] - 1 - torch.arange(tokens, device=features.device)
            out = out + object_order[rows].to(dtype)[None, None]
        return out.reshape(batch, images * tokens, -1)


def box_vectors(boxes: torch.Tensor | None, shape: Sequence[int], device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
    """``(x1, y1, x2, y2, area)`` per token: zeros without boxes; the area is computed from 4-value boxes."""
    if boxes is None:
        return torch.zeros(*shape, BOX_FEATURES, device=device, dtype=dtype)
    boxes = boxes.to(device=device, dtype=dtype)
    if boxes.shape[-1] == 4:
        area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
        boxes = torch.cat([boxes, area.unsqueeze(-1)], dim=-1)
    if tuple(boxes.shape) != (*shape, BOX_FEATURES):
        raise ConfigError(f"visual_boxes must have shape {(*shape, 4)} or {(*shape, 5)}, got {tuple(boxes.shape)}")
    return boxes


class AnswerHead(nn.Module):
    """The answer classifier of an encoder-only model: Linear(inputs, 2d), GELU, LayerNorm, Linear(2d, answers)
    (LXMERT's and CLIP-ViL's VQA head; ``inputs`` = d, or 2d when it reads two pooled vectors side by side)."""

    def __init__(self, width: int, num_answers: int, inputs: int | None = None) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(inputs or width, 2 * width), nn.GELU(), nn.LayerNorm(2 * width),
                                    nn.Linear(2 * width, num_answers))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.layers(pooled)


class VisionLanguageModel(nn.Module):
    """A text model that also reads visual features; see the module docstring.

    ``feature_dim``: width of the frozen image features (CLIP RN101 grid: 2048). ``num_images``: images per
    example the image-order embedding distinguishes (NLVR2: 2). ``use_boxes``: the box/position term.
    ``object_order``: add VL-T5's object-order rows of the frozen word embeddings (the vocabulary must end with
    the ``<vis_extra_id_*>`` tokens). ``num_answers``: size of the answer vocabulary (encoder-only backbones).
    ``pooling`` (encoder-only backbones): what the answer head reads: ``mean`` = the mean of the last hidden states
    over the text and visual tokens (default: it reaches the visual tokens directly, and sentence encoders such as
    all-MiniLM-L6-v2 are trained for it), ``pooler`` = the backbone's own pooler (BERT's tanh layer over [CLS]),
    ``cls`` = the first token's last hidden state, ``text+visual`` = the mean over the text tokens and the mean over
    the visual tokens side by side (the answer head reads 2 x width: the image is not outweighed by a long question;
    zeros for the visual half of a text-only input), ``text+images`` = the text mean and then each image's mean over
    its tokens in its own slot, ``num_images`` slots (zeros for absent images), so the head can tell images apart.
    """

    main_input_name = "input_ids"

    def __init__(self, text_model: nn.Module, feature_dim: int, num_images: int = 2, use_boxes: bool = True,
                 object_order: bool = False, num_answers: int | None = None, pooling: str = "mean") -> None:
        super().__init__()
        self.pooling = pooling
        check_choice(self, "pooling", POOLINGS)
        config = text_model.config
        arch = find_architecture(text_model)
        if arch.kind == "decoder" or arch.modality != "text":
            kind = "decoder-only" if arch.kind == "decoder" else f"a {arch.modality} model"
            raise UnsupportedModelError(f"{type(text_model).__name__} is {kind}; the vision-language model takes a "
                                        "text encoder-decoder (T5, BART) or an encoder-only (BERT-like) backbone")
        self.generative = arch.kind == "encoder-decoder"
        if not self.generative:
            text_model = text_model.base_model  # classification runs on the encoder; any head it had is dropped
        self.text_model = text_model
        self.config = config
        self.object_order = object_order
        width = text_model.get_input_embeddings().weight.shape[1]
        self.visual_projection = VisualProjection(feature_dim, width, norm_like(text_model, width), num_images,
                                                  use_boxes)
        trained = ["visual_projection"]
        if not self.generative:
            if not num_answers or num_answers < 1:
                raise ConfigError(f"an encoder-only backbone ({type(text_model).__name__}) answers by classification: "
                                  "pass num_answers=<size of the answer vocabulary>")
            pooled_vectors = {"text+visual": 2, "text+images": 1 + num_images}.get(pooling, 1)
            self.classifier = AnswerHead(width, num_answers, pooled_vectors * width)
            trained.append("classifier")
        self.leantune_trainable_modules = trained
        self.num_answers = None if self.generative else num_answers
        self.takes_positions = "position_ids" in inspect.signature(text_model.forward).parameters
        ref = next(text_model.parameters())
        self.to(device=ref.device)

    # --- what leantune and transformers look up ------------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        """The text model's base model: where the architecture map's stacks are."""
        return self.text_model.base_model

    @property
    def lm_head(self) -> nn.Module | None:
        """The text model's language-model head (encoder-decoder backbones)."""
        return getattr(self.text_model, "lm_head", None)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.text_model.get_output_embeddings() if self.generative else None

    # --- inputs ---------------------------------------------------------------------------------------------------
    def visual_tokens(self, features: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """The visual tokens of ``features`` (see :class:`VisualProjection`)."""
        table = self.get_input_embeddings().weight if self.object_order else None
        return self.visual_projection(features, boxes, table)

    def joint_inputs(self, kwargs: dict[str, Any], visual_features: torch.Tensor | None,
                     visual_boxes: torch.Tensor | None = None,
                     visual_mask: torch.Tensor | None = None) -> dict[str, Any]:
        """``kwargs`` with the visual tokens appended after the text (``inputs_embeds`` and the mask extended)."""
        if visual_features is None:
            return kwargs
        tokens = self.visual_tokens(visual_features, visual_boxes)
        mask = None if visual_mask is None else visual_mask.reshape(tokens.shape[0], -1)
        return insert_tokens(kwargs, tokens, self.get_input_embeddings(), at_end=True, token_mask=mask)

    # --- running ----------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, visual_features: torch.Tensor | None = None,
                visual_boxes: torch.Tensor | None = None, visual_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, loss_weights: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The text model's output on text + visual tokens. ``loss_weights`` (batch,): the loss is then each
        example's mean token loss times its weight, averaged over the batch (VL-Adapter's VQA loss)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds,
                  "token_type_ids": kwargs.pop("token_type_ids", None)}
        inputs = self.joint_inputs({k: v for k, v in inputs.items() if v is not None}, visual_features,
                                   visual_boxes, visual_mask)
        if not self.generative:
            return self._classify(inputs, labels, loss_weights, visual_layout(visual_features), **kwargs)
        outputs = self.text_model(**inputs, labels=labels, **kwargs)
        if labels is not None and loss_weights is not None:
            outputs.loss = weighted_sequence_loss(outputs.logits, labels, loss_weights)
        return outputs

    def _classify(self, inputs: dict[str, Any], labels: torch.Tensor | None, loss_weights: torch.Tensor | None,
                  layout: tuple[int, int], **kwargs: Any) -> SequenceClassifierOutput:
        if layout[0] and self.takes_positions and "position_ids" not in kwargs:
            kwargs["position_ids"] = packed_positions(inputs["attention_mask"])
        outputs = self.text_model(**inputs, **kwargs)
        logits = self.classifier(self._pooled(outputs, inputs.get("attention_mask"), layout))
        loss = None if labels is None else answer_loss(logits, labels, loss_weights)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        attentions=outputs.attentions)

    def _pooled(self, outputs: Any, attention_mask: torch.Tensor | None, layout: tuple[int, int]) -> torch.Tensor:
        """One vector per example for the answer head (see ``pooling``); the last positions are the visual tokens,
        ``layout`` = (images, tokens per image)."""
        hidden = outputs.last_hidden_state
        pooled = getattr(outputs, "pooler_output", None)
        if self.pooling == "cls" or (self.pooling == "pooler" and pooled is None):
            return hidden[:, 0]
        if self.pooling == "pooler":
            return pooled
        if attention_mask is None:
            attention_mask = hidden.new_ones(hidden.shape[:2])
        if self.pooling == "mean":
            return masked_mean(hidden, attention_mask)
        images, per_image = layout
        count = images * per_image
        slots = self.visual_projection.image_order.num_embeddings if self.pooling == "text+images" else 1
        pooled = hidden.new_zeros(hidden.shape[0], slots, hidden.shape[2])  # zeros where no image (text only)
        if count == 0:  # text only (LST's Fisher pass through the frozen backbone)
            return torch.cat([masked_mean(hidden, attention_mask), pooled.flatten(1)], dim=-1)
        text = masked_mean(hidden[:, :-count], attention_mask[:, :-count])
        visual, visual_mask = hidden[:, -count:], attention_mask[:, -count:]
        if self.pooling == "text+visual":
            pooled[:, 0] = masked_mean(visual, visual_mask)
        else:
            batch, width = hidden.shape[0], hidden.shape[2]
            per_image_mean = masked_mean(visual.reshape(batch * images, per_image, width),
                                         visual_mask.reshape(batch * images, per_image))
            pooled[:, :images] = per_image_mean.reshape(batch, images, width)
        return torch.cat([text, pooled.flatten(1)], dim=-1)

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 inputs_embeds: torch.Tensor | None = None, visual_features: torch.Tensor | None = None,
                 visual_boxes: torch.Tensor | None = None, visual_mask: torch.Tensor | None = None,
                 loss_weights: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """The text model's ``generate`` with the visual tokens in its encoder input (``loss_weights`` ignored)."""
        if not self.generative:
            raise UnsupportedMethodError(f"{type(self.text_model).__name__} is encoder-only: this model answers by "
                                         "classification (forward(...).logits over the answer vocabulary)")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds}
        inputs = self.joint_inputs({k: v for k, v in inputs.items() if v is not None}, visual_features,
                                   visual_boxes, visual_mask)
        return self.text_model.generate(**inputs, **kwargs)


def visual_layout(features: torch.Tensor | None) -> tuple[int, int]:
    """``(images, tokens per image)`` of ``features`` ((batch, tokens, dim): one image; (batch, images, tokens,
    dim)); ``(0, 0)`` without features."""
    if features is None:
        return 0, 0
    return (features.shape[1], features.shape[2]) if features.dim() == 4 else (1, features.shape[1])


def packed_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only the unmasked tokens: the visual tokens after a padded text take the positions
    right after its last real token, the same in every batch whatever the padding."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)


def text_model_of(model: nn.Module) -> nn.Module:
    """A :class:`VisionLanguageModel`'s text model; any other model itself."""
    return model.text_model if isinstance(model, VisionLanguageModel) else model


def weighted_sequence_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of (each example's mean token cross-entropy x its weight); -100 labels ignored."""
    tokens = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    counts = (labels != -100).sum(dim=1).clamp(min=1)
    per_example = tokens.sum(dim=1) / counts
    return (per_example * weights.to(per_example)).mean()


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Classification loss over the answer vocabulary: cross-entropy for answer indices; for soft scores
    (batch, answers) binary cross-entropy summed over answers (LXMERT's VQA loss). ``weights`` scale examples."""
    if labels.is_floating_point():
        per_example = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").sum(1)
    else:
        per_example = F.cross_entropy(logits.float(), labels, reduction="none")
    if weights is not None:
        per_example = per_example * weights.to(per_example)
    return per_example.mean()


@torch.no_grad()
def choice_logits(model: nn.Module, inputs: dict[str, Any], choices: Sequence[Sequence[int]],
                  decoder_start_token_id: int) -> torch.Tensor:
    """Logits (batch, choices) of each choice's first distinguishing target token at its decoder position.

    ``choices`` are the choices' target token ids (as the tokenizer gives labels: T5 ``"true"`` -> ``[1176, 1]``,
    BART -> ``[0, 1528, 2]``); they share a prefix (BART's ``<s>``) that is fed after the decoder start token
    (NLVR2: the decoder input is ``[decoder_start, BOS]`` for BART, ``[decoder_start]`` for T5). ``model`` is a
    tuned or plain :class:`VisionLanguageModel` and ``inputs`` its encoder inputs (``task`` included if needed).
    """
    prefix = common_prefix(choices)
    if any(len(c) <= len(prefix) for c in choices):
        raise ConfigError(f"the choices {list(map(list, choices))} do not differ after their common prefix")
    first_ids = [c[len(prefix)] for c in choices]
    batch = next(v for k, v in inputs.items() if k in ("input_ids", "inputs_embeds")).shape[0]
    device = next(model.parameters()).device
    decoder_input_ids = torch.tensor([[decoder_start_token_id, *prefix]] * batch, device=device)
    logits = model(**inputs, decoder_input_ids=decoder_input_ids).logits
    return logits[:, len(prefix), first_ids]


def common_prefix(sequences: Sequence[Sequence[int]]) -> list[int]:
    """The longest list every sequence starts with."""
    prefix: list[int] = []
    for values in zip(*sequences):
        if len(set(values)) != 1:
            break
        prefix.append(values[0])
    return prefix
