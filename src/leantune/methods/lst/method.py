"""The registered ``lst`` method: checks, building the side network, and the forward passes through it.

On a :class:`leantune.vl.VisionLanguageModel` (LST's CLIP-T5 variant) the frozen backbone sees the text only; the
visual tokens (from the model's trainable projection) join the side encoder's first ladder after the text, the
later ladders are zero-padded at their positions, and the side decoder cross-attends to the joint side encoder
output (text and visual tokens). The projection trains with the side network.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.modeling_outputs import ImageClassifierOutput, Seq2SeqLMOutput, SequenceClassifierOutput

from leantune.backbones import Backbone, Stack, linear_in_out
from leantune.errors import ConfigError, UnsupportedMethodError
from leantune.methods.base import AttachContext, TuningMethod
from leantune.methods.lst import generation
from leantune.methods.lst.config import DTYPES, LSTConfig
from leantune.methods.lst.network import (
    LSTNetwork,
    NormSpec,
    RelativePositionBias,
    SideShape,
    SideStack,
    padding_keep,
    record_ladders,
    self_attention_mask,
)
from leantune.methods.lst.pruning import fisher_initialise, fisher_sample_count
from leantune.registry import register
from leantune.vl.model import (
    VISUAL_INPUTS,
    VisionLanguageModel,
    answer_loss,
    text_model_of,
    weighted_sequence_loss,
)

if TYPE_CHECKING:
    from leantune.api import TunedModel
    from leantune.methods.lst.ladder_cache import LadderCache

# How the side output is pooled for the side head, by ArchitectureMap.pooling.
POOLING = {
    "first": lambda side: side[:, 0],
    "patch_mean": lambda side: side[:, 1:].mean(dim=1),
    "first+patch_mean": lambda side: torch.cat([side[:, 0], side[:, 1:].mean(dim=1)], dim=-1),
    "mean": lambda side: side.mean(dim=1),
}

# Roles of a backbone block that its side block copies the layout of.
MIRRORED_ROLES = ("query", "key", "value", "attention_output", "ffn_input", "ffn_output", "attention_norm",
                  "ffn_norm", "activation")
CROSS_ATTENTION_ROLES = ("cross_query", "cross_key", "cross_value", "cross_attention_output", "cross_attention_norm")


VisualTokens = tuple[torch.Tensor, torch.Tensor]
"""A vision-language batch's visual tokens (batch, n, d) and their mask (batch, n)."""


def joint_mask(attention_mask: torch.Tensor | None, visual: VisualTokens | None) -> torch.Tensor | None:
    """The side network's key mask: the text's (given whenever there are visual tokens), then the visual tokens'."""
    if visual is None:
        return attention_mask
    return torch.cat([attention_mask, visual[1].to(attention_mask.dtype)], dim=1)


def text_only(batches: Any) -> Any:
    """Task batches without the visual inputs: LST's Fisher comes from the text-only backbone (as in the paper)."""
    for batch in batches:
        yield {k: v for k, v in batch.items() if k not in VISUAL_INPUTS}


def side_stack_names(backbone: Backbone) -> list[str]:
    """The backbone stacks that get a side stack: encoder and decoder, or the one stack of an encoder."""
    return ["encoder", "decoder"] if backbone.arch.kind == "encoder-decoder" else [next(iter(backbone.stacks))]


@register
class LadderSideTuning(TuningMethod):
    name = "lst"
    config_class = LSTConfig
    default_learning_rate = 3e-3
    budget_options = {"fisher_samples": 256}
    merge_unsupported_reason = (
        "LST predicts through a separate side network that runs beside the backbone; there are no backbone "
        "weights to fold it into"
    )
    ladder_cache: LadderCache | None = None
    """Set by the trainer with ``TrainConfig.cache_ladders``: the training batches' stored ladders
    (:mod:`leantune.methods.lst.ladder_cache`)."""

    # --- facts ---------------------------------------------------------------------------------------------------

    def needs_data(self) -> bool:
        """``init="auto"`` may read data: it does on encoder-decoder models, which ``attach`` resolves."""
        return self.config.init != "random"

    def unsupported_reason(self, backbone: Backbone) -> str | None:
        arch, model = backbone.arch, backbone.model
        if arch.kind == "decoder":
            return f"lst supports encoder and encoder-decoder models; family {backbone.family!r} is decoder-only"
        stages = max(len(stack.stages) for stack in backbone.stacks.values())
        if stages > 1:
            return (f"lst needs one hidden width and token count across a stack; family {backbone.family!r} is "
                    f"hierarchical ({stages} stages with downsampling between them)")
        if arch.kind == "encoder-decoder" and backbone.lm_head() is None:
            return f"lst on {type(model).__name__} needs its lm_head (use a *ForConditionalGeneration model)"
        if arch.kind == "encoder":
            if not backbone.task_heads() or not hasattr(model.config, "num_labels"):
                return (f"lst on an encoder predicts with a side classification head; {type(model).__name__} has "
                        "no task head: use a *ForSequenceClassification or *ForImageClassification model")
            if arch.pooling not in POOLING:
                return f"lst cannot pool the side output as family {backbone.family!r} pools ({arch.pooling!r})"
        return self._unmirrored_block(backbone)

    @staticmethod
    def _unmirrored_block(backbone: Backbone) -> str | None:
        """Why a side block cannot mirror the backbone's blocks (a role or the head count unknown), or ``None``."""
        for name in side_stack_names(backbone):
            stack = backbone.stacks[name]
            roles = MIRRORED_ROLES + (CROSS_ATTENTION_ROLES if name == "decoder" else ())
            missing = [role for role in roles if not stack.blocks[0].find(role)]
            if missing:
                return (f"lst builds side blocks like the backbone's; the {name} blocks of {backbone.family!r} have "
                        f"no {', '.join(missing)} in the architecture map")
            if stack.num_heads is None:
                return f"lst keeps the backbone's head count, which {backbone.family!r} does not state"
        return None

    # --- attaching -----------------------------------------------------------------------------------------------

    def attach(self, model: nn.Module, backbone: Backbone, context: AttachContext) -> LSTNetwork:
        self.backbone = backbone
        self.stack_names = side_stack_names(backbone)
        self.kept = {name: self._kept_layers(backbone.stacks[name]) for name in self.stack_names}
        self.ladder_norm = self.config.ladder_norm
        if self.ladder_norm is None:  # pre-norm encoders hand over raw residual streams (docs/lst.md)
            self.ladder_norm = (backbone.arch.kind == "encoder" and backbone.arch.norm_position == "pre"
                                and not isinstance(model, VisionLanguageModel))
        for name in self.stack_names:
            self._check_divisible(backbone.stacks[name])
        self.init = self.config.init
        if self.init == "auto":  # measured: Fisher worse than random on DINOv2 (docs/lst.md)
            self.init = "random" if "vision" in backbone.arch.modality else "fisher"
        fisher = self.init == "fisher" and not context.loading
        if fisher and context.data is None:
            raise ConfigError(f"LSTConfig.init={self.config.init!r} initialises the side network of "
                              f"{type(model).__name__} from task data: pass data=<batches with labels> to "
                              "leantune.wrap, or use init='random'")
        with torch.device(next(model.parameters()).device):
            network = self._build(model, backbone)
        if fisher:
            samples = fisher_sample_count(self.config, context.data)
            data = text_only(context.data) if isinstance(model, VisionLanguageModel) else context.data
            self.pruning = fisher_initialise(model, backbone, self, network, data, samples)
        text_model_of(model).to(DTYPES[self.config.backbone_dtype])  # a visual projection stays float32
        return network

    def _kept_layers(self, stack: Stack) -> list[int]:
        count = len(stack.blocks)
        if self.config.side_layers is None:
            return list(range(count))
        out_of_range = [i for i in self.config.side_layers if i >= count]
        if out_of_range:
            raise ConfigError(f"LSTConfig.side_layers: {out_of_range} out of range for the {stack.name} stack of "
                              f"{count} layers (valid: 0..{count - 1})")
        return sorted(self.config.side_layers)

    def _check_divisible(self, stack: Stack) -> None:
        r = self.config.reduction_factor
        block = stack.blocks[0]
        sizes = {
            "hidden size": stack.hidden_size,
            "per-head width": linear_in_out(block.get("query")[1])[1] // stack.num_heads,
            "feed-forward width": linear_in_out(block.get("ffn_output")[1])[0],
        }
        for what, size in sizes.items():
            if size % r:
                raise ConfigError(f"LSTConfig.reduction_factor={r} does not divide the {stack.name} {what} {size}")
        side_heads = self.config.side_heads
        if side_heads is not None and stack.num_heads % side_heads:
            raise ConfigError(f"LSTConfig.side_heads={side_heads} does not divide the {stack.name}'s "
                              f"{stack.num_heads} attention heads")

    def side_heads(self, stack: Stack) -> int:
        """The side network's head count: ``side_heads``, or the backbone's (the paper)."""
        return stack.num_heads if self.config.side_heads is None else self.config.side_heads

    def side_shape(self, stack: Stack) -> SideShape:
        """The side block shape for ``stack``: every backbone width divided by r; the head count kept, or
        ``side_heads`` heads as wide as the query/key/value width allows."""
        r = self.config.reduction_factor
        block = stack.blocks[0]
        query, ffn_out = block.get("query")[1], block.get("ffn_output")[1]
        cross = block.find("cross_attention_norm")
        unscaled_attention = self.backbone.arch.attention_scale == "none"
        return SideShape(
            d_model=stack.hidden_size // r,
            heads=self.side_heads(stack),
            d_kv=linear_in_out(query)[1] // r // self.side_heads(stack),
            d_ff=linear_in_out(ffn_out)[0] // r,
            ffn_inputs=len(block.find("ffn_input")),
            attention_bias=query.bias is not None,
            ffn_bias=ffn_out.bias is not None,
            attention_norm=NormSpec.of(block.get("attention_norm")[1]),
            ffn_norm=NormSpec.of(block.get("ffn_norm")[1]),
            cross_attention_norm=NormSpec.of(cross[0][1]) if cross else None,
            pre_norm=self.backbone.arch.norm_position == "pre",
            score_scale=1.0 if unscaled_attention else None,
            layer_scale=bool(block.find("attention_scale")),
            dropout=self.config.side_dropout,
        )

    def _side_stack(self, model: nn.Module, stack: Stack) -> SideStack:
        shape = self.side_shape(stack)
        position_bias = None
        found = stack.blocks[0].find("relative_position_bias")
        if found:
            table = found[0][1]
            position_bias = RelativePositionBias(table.num_embeddings, model.config.relative_attention_max_distance,
                                                 shape.heads, bidirectional=stack.name != "decoder")
            with torch.no_grad():  # with fewer side heads: the mean over each group of backbone heads
                position_bias.table.weight.copy_(table.weight.view(table.num_embeddings, shape.heads, -1).mean(-1))
        return SideStack(
            stack.hidden_size, len(stack.blocks), self.kept[stack.name], shape, stack.blocks[0].get("activation")[1],
            cross=stack.name == "decoder", final_norm=NormSpec.of(stack.final_norm[1]) if stack.final_norm else None,
            position_bias=position_bias, gate_init=self.config.gate_init,
            gate_temperature=self.config.gate_temperature)

    def _build(self, model: nn.Module, backbone: Backbone) -> LSTNetwork:
        stacks = {name: self._side_stack(model, backbone.stacks[name]) for name in self.stack_names}
        upsample = head = None
        last = backbone.stacks[self.stack_names[-1]]
        side_width = last.hidden_size // self.config.reduction_factor
        if backbone.arch.kind == "encoder-decoder":
            upsample = nn.Linear(side_width, last.hidden_size)
        else:
            pooled = 2 * side_width if backbone.arch.pooling == "first+patch_mean" else side_width
            outputs = model.num_answers if isinstance(model, VisionLanguageModel) else model.config.num_labels
            head = nn.Linear(pooled, outputs)
        network = LSTNetwork(stacks, upsample, head, self.config.side_dropout)
        for module in network.modules():  # the paper's init of every plain linear: N(0, 0.01), zero bias
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        return network

    # --- running ---------------------------------------------------------------------------------------------------

    def recording(self, stack_name: str) -> contextlib.AbstractContextManager[dict[int, torch.Tensor]]:
        """:func:`record_ladders` on the kept layers of backbone stack ``stack_name``, normalised as configured."""
        return record_ladders(self.backbone.stacks[stack_name].blocks, self.kept[stack_name], self.ladder_norm)

    @contextlib.contextmanager
    def backbone_running(self, model: nn.Module, training: bool) -> Iterator[None]:
        """No autograd through the backbone; its train/eval mode as configured."""
        wanted = training and self.config.backbone_train_mode
        previous = model.training
        if previous != wanted:
            model.train(wanted)
        try:
            with torch.no_grad():
                yield
        finally:
            if previous != wanted:
                model.train(previous)

    def forward(self, tuned: TunedModel, **inputs: Any) -> Any:
        if self.backbone.arch.kind == "encoder-decoder":
            return self._seq2seq_forward(tuned, **inputs)
        return self._encoder_forward(tuned, **inputs)

    def visual_inputs(self, model: nn.Module, features: torch.Tensor | None, boxes: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None) -> VisualTokens | None:
        """The visual tokens of a vision-language batch (from the model's trainable projection), or ``None``."""
        if features is None:
            return None
        if not isinstance(model, VisionLanguageModel):
            raise ConfigError(f"visual_features were passed, but {type(model).__name__} is not a "
                              "leantune.vl.VisionLanguageModel")
        tokens = model.visual_tokens(features, boxes)
        keep = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device) if mask is None \
            else mask.reshape(tokens.shape[0], -1).long()
        return tokens, keep

    def _encoder_forward(self, tuned: TunedModel, labels: torch.Tensor | None = None,
                         visual_features: torch.Tensor | None = None, visual_boxes: torch.Tensor | None = None,
                         visual_mask: torch.Tensor | None = None, loss_weights: torch.Tensor | None = None,
                         **inputs: Any) -> Any:
        model, network = tuned.base_model, tuned.method_modules
        name = self.stack_names[0]
        visual = self.visual_inputs(model, visual_features, visual_boxes, visual_mask)

        def run_backbone() -> dict[int, torch.Tensor]:
            with self.backbone_running(model, tuned.training), self.recording(name) as ladders:
                model.base_model(**inputs)
            return ladders

        cache = self.ladder_cache
        if cache is not None and cache.active:  # a training batch of a run with cached ladders
            ladders = cache.ladders(inputs.get("attention_mask"), run_backbone)
        else:
            ladders = run_backbone()
        logits = self.classify(network, ladders, inputs.get("attention_mask"), visual)
        if labels is None:
            loss = None
        elif isinstance(model, VisionLanguageModel):
            loss = answer_loss(logits, labels, loss_weights)
        else:  # transformers' own classification loss: regression, single- or multi-label from config.problem_type
            loss = ForSequenceClassificationLoss(labels, logits, model.config)
        output_class = SequenceClassifierOutput if self.backbone.arch.modality == "text" else ImageClassifierOutput
        return output_class(loss=loss, logits=logits)

    def classify(self, network: LSTNetwork, ladders: dict[int, torch.Tensor],
                 attention_mask: torch.Tensor | None, visual: VisualTokens | None = None) -> torch.Tensor:
        """Side-head logits from recorded ladders (encoder models); the part of forward that gets gradients."""
        if visual is not None and attention_mask is None:
            attention_mask = torch.ones(ladders[-1].shape[:2], dtype=torch.long, device=ladders[-1].device)
        mask = padding_keep(joint_mask(attention_mask, visual))
        side = network.stacks[self.stack_names[0]](ladders, mask, extra=None if visual is None else visual[0])
        pooled = POOLING[self.backbone.arch.pooling](side)
        return network.head(network.head_dropout(pooled))

    def _seq2seq_forward(
        self,
        tuned: TunedModel,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        visual_boxes: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
    ) -> Seq2SeqLMOutput:
        model, network = tuned.base_model, tuned.method_modules
        text = text_model_of(model)
        if decoder_input_ids is None:
            if labels is None:
                raise ConfigError("lst forward on an encoder-decoder model needs labels or decoder_input_ids")
            decoder_input_ids = text.prepare_decoder_input_ids_from_labels(labels=labels)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        visual = self.visual_inputs(model, visual_features, visual_boxes, visual_mask)
        with self.backbone_running(model, tuned.training):
            with self.recording("encoder") as encoder_ladders:
                encoded = text.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)[0]
            with self.recording("decoder") as decoder_ladders:
                text.get_decoder()(input_ids=decoder_input_ids, attention_mask=decoder_attention_mask,
                                   encoder_hidden_states=encoded, encoder_attention_mask=attention_mask,
                                   use_cache=False)
        side_encoded = self.side_encode(network, encoder_ladders, attention_mask, visual)
        side_decoder = network.stacks["decoder"]
        mask = self_attention_mask(decoder_attention_mask, decoder_input_ids.shape[1], True,
                                   side_decoder.position_bias, input_ids.device)
        side = side_decoder(decoder_ladders, mask, side_encoded, padding_keep(joint_mask(attention_mask, visual)))
        logits = self.lm_logits(text, network, side)
        loss = None
        if labels is not None and loss_weights is not None:
            loss = weighted_sequence_loss(logits, labels, loss_weights)
        elif labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=logits)

    def side_encode(self, network: LSTNetwork, ladders: dict[int, torch.Tensor], attention_mask: torch.Tensor,
                    visual: VisualTokens | None = None) -> torch.Tensor:
        """The side encoder's output from the backbone encoder's ladders (and the visual tokens after the text)."""
        side_encoder = network.stacks["encoder"]
        keys = joint_mask(attention_mask, visual)
        mask = self_attention_mask(keys, keys.shape[1], False, side_encoder.position_bias, attention_mask.device)
        return side_encoder(ladders, mask, extra=None if visual is None else visual[0])

    def lm_logits(self, model: nn.Module, network: LSTNetwork, side: torch.Tensor) -> torch.Tensor:
        """The frozen LM head on ``Up(side)``, rescaled as the family rescales; float32 logits."""
        hidden = network.upsample(side)
        if self.backbone.arch.rescales_tied_lm_head_input and getattr(model.config, "tie_word_embeddings", False):
            hidden = hidden * hidden.shape[-1] ** -0.5
        _, head = self.backbone.lm_head()
        logits = head(hidden.to(head.weight.dtype)).float()
        if self.backbone.arch.lm_logits_bias is not None:
            logits = logits + model.get_buffer(self.backbone.arch.lm_logits_bias).float()
        return logits

    def generate(self, tuned: TunedModel, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate`` of the base model, predicting with the side network (see ``generation``)."""
        if self.backbone.arch.kind != "encoder-decoder":
            raise UnsupportedMethodError(f"generate() needs an encoder-decoder model; {self.backbone.family!r} "
                                         "is an encoder with a classification head")
        return generation.generate(self, tuned, *args, **kwargs)
