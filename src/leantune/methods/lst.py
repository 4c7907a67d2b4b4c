"""Ladder Side-Tuning (Sung, Cho, Bansal 2022): a small side network that never backpropagates through the backbone.

The frozen backbone runs under ``torch.no_grad()``; forward hooks on its blocks (found through the architecture
map) hand the block outputs ("ladders") to a side network whose width, feed-forward width and per-head width
are the backbone's divided by ``reduction_factor``, with the same number of heads. Before each kept side layer
``i`` the side state is gated with the projected ladder, ``s <- mu_i * s + (1 - mu_i) * Down_i(h_i)``,
``mu_i = sigmoid(alpha_i / T)``; the first ladder is the input of the backbone's first block (its embeddings).
Encoder-decoder models get a side encoder and a side decoder that cross-attends to the side encoder; the
prediction is the frozen LM head applied to ``Up(s)`` (times ``d_model ** -0.5`` where T5 rescales its tied
head input). Encoder-only and vision encoders get a side head on the side output, pooled as the family pools.
Autograd keeps nothing of the backbone except the ladder inputs, so training memory is a fraction of full
fine-tuning. The side blocks can be initialised from a Fisher-guided structured pruning of the backbone
(``lst_pruning.py``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput, Seq2SeqLMOutput, SequenceClassifierOutput

from leantune.backbones import Backbone, Block, Stack, linear_in_out
from leantune.config import MethodConfig, check_choice, check_positive, option
from leantune.errors import UnsupportedMethodError, UnsupportedModelError
from leantune.methods.base import AttachContext, TuningMethod
from leantune.registry import register

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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
        "fisher", "fisher = side blocks copied from a Fisher-guided structured pruning of the backbone, computed "
                  "from `data` given to wrap (the paper's default); random = fresh random weights.")
    fisher_samples: int = option(1024, "Task examples (batch size 1) whose squared loss gradients form the "
                                       "empirical Fisher for init='fisher'.")
    fisher_pruning: str = option(
        "rows", "How query/key/value rows are kept: rows = the paper's code (any inner/r rows, regrouped into heads "
                "in index order); head_aligned = the d_kv/r most important rows of each head, so side head h comes "
                "from backbone head h (measured equal to rows, see docs/lst.md).")
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
        super().validate()
        if self.train_head:
            raise ValueError("LSTConfig.train_head must be False: LST predicts with its side head, got True")
        check_positive(self, "reduction_factor", "fisher_samples", "gate_temperature")
        if not isinstance(self.reduction_factor, int):
            raise ValueError(f"LSTConfig.reduction_factor must be an integer, got {self.reduction_factor!r}")
        if self.side_layers is not None:
            layers = self.side_layers
            if (not isinstance(layers, list) or not layers
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
                    or len(set(layers)) != len(layers)):
                raise ValueError(
                    f"LSTConfig.side_layers must be None or a non-empty list of distinct layer indices >= 0, "
                    f"got {layers!r}")
        check_choice(self, "init", ("fisher", "random"))
        check_choice(self, "fisher_pruning", PRUNING_VARIANTS)
        check_choice(self, "backbone_dtype", tuple(DTYPES))
        if isinstance(self.gate_init, bool) or not isinstance(self.gate_init, (int, float)):
            raise ValueError(f"LSTConfig.gate_init must be a number, got {self.gate_init!r}")
        if not 0.0 <= self.side_dropout < 1.0:
            raise ValueError(f"LSTConfig.side_dropout must be in [0, 1), got {self.side_dropout!r}")


# --- the side network ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormSpec:
    """A side norm mirroring a backbone norm: LayerNorm (with bias) or RMSNorm (T5), and its epsilon."""

    has_bias: bool
    eps: float

    @classmethod
    def of(cls, module: nn.Module) -> NormSpec:
        bias = getattr(module, "bias", None)
        eps = getattr(module, "eps", None)
        if eps is None:
            eps = getattr(module, "variance_epsilon", 1e-6)
        return cls(has_bias=isinstance(bias, torch.Tensor), eps=float(eps))

    def build(self, width: int) -> nn.Module:
        if self.has_bias:
            return nn.LayerNorm(width, eps=self.eps)
        return nn.RMSNorm(width, eps=self.eps)


@dataclass(frozen=True)
class SideShape:
    """Everything a side block of one stack needs to know about the backbone block it shadows."""

    d_model: int
    heads: int
    d_kv: int
    d_ff: int
    ffn_inputs: int
    attention_bias: bool
    ffn_bias: bool
    attention_norm: NormSpec
    ffn_norm: NormSpec
    cross_attention_norm: NormSpec | None
    pre_norm: bool
    unscaled_attention: bool
    layer_scale: bool
    dropout: float


class SideLinear(nn.Linear):
    """A linear layer that computes in its input's dtype and returns float32.

    Used for the ladders ``Down_i``: the backbone activation it reads is what autograd keeps for the weight
    gradient, so it is kept at the backbone's precision instead of as a float32 copy.
    """

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(hidden.dtype)
        bias = None if self.bias is None else self.bias.to(hidden.dtype)
        return F.linear(hidden, weight, bias).float()


class SideAttention(nn.Module):
    """Multi-head attention through ``scaled_dot_product_attention``, with an optional key/value cache."""

    def __init__(self, shape: SideShape) -> None:
        super().__init__()
        inner = shape.heads * shape.d_kv
        self.heads, self.d_kv = shape.heads, shape.d_kv
        self.query = nn.Linear(shape.d_model, inner, bias=shape.attention_bias)
        self.key = nn.Linear(shape.d_model, inner, bias=shape.attention_bias)
        self.value = nn.Linear(shape.d_model, inner, bias=shape.attention_bias)
        self.output = nn.Linear(inner, shape.d_model, bias=shape.attention_bias)
        self.scale = 1.0 if shape.unscaled_attention else None
        self.dropout = shape.dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.d_kv).transpose(1, 2)

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        context: torch.Tensor | None = None,
        cache: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        query = self._split(self.query(hidden))
        if context is None:
            key, value = self._split(self.key(hidden)), self._split(self.value(hidden))
            if cache is not None:
                if "key" in cache:
                    key, value = torch.cat([cache["key"], key], dim=2), torch.cat([cache["value"], value], dim=2)
                cache["key"], cache["value"] = key, value
        elif cache is not None and "key" in cache:
            key, value = cache["key"], cache["value"]
        else:
            key, value = self._split(self.key(context)), self._split(self.value(context))
            if cache is not None:
                cache["key"], cache["value"] = key, value
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, scale=self.scale
        )
        batch, _, length, _ = attended.shape
        return self.output(attended.transpose(1, 2).reshape(batch, length, self.heads * self.d_kv))


class SideBlock(nn.Module):
    """A transformer block at side width, laid out like the backbone block it shadows (pre- or post-norm)."""

    def __init__(self, shape: SideShape, activation: nn.Module, cross: bool) -> None:
        super().__init__()
        d = shape.d_model
        self.pre_norm = shape.pre_norm
        self.attention_norm = shape.attention_norm.build(d)
        self.attention = SideAttention(shape)
        self.cross_attention_norm = shape.cross_attention_norm.build(d) if cross else None
        self.cross_attention = SideAttention(shape) if cross else None
        self.ffn_norm = shape.ffn_norm.build(d)
        self.ffn_input = nn.ModuleList(nn.Linear(d, shape.d_ff, bias=shape.ffn_bias) for _ in range(shape.ffn_inputs))
        self.ffn_output = nn.Linear(shape.d_ff, d, bias=shape.ffn_bias)
        self.activation = activation
        self.attention_scale = nn.Parameter(torch.ones(d)) if shape.layer_scale else None
        self.ffn_scale = nn.Parameter(torch.ones(d)) if shape.layer_scale else None
        self.dropout = nn.Dropout(shape.dropout)

    def _feed_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        inner = self.activation(self.ffn_input[0](hidden))
        if len(self.ffn_input) == 2:  # gated: act(gate(x)) * up(x)
            inner = inner * self.ffn_input[1](hidden)
        return self.ffn_output(self.dropout(inner))

    def _sublayer(self, hidden: torch.Tensor, norm: nn.Module, scale: torch.Tensor | None, run) -> torch.Tensor:
        if self.pre_norm:
            update = run(norm(hidden))
            return hidden + self.dropout(update if scale is None else update * scale)
        update = run(hidden)
        return norm(hidden + self.dropout(update if scale is None else update * scale))

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cache: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        self_cache = None if cache is None else cache.setdefault("self", {})
        hidden = self._sublayer(hidden, self.attention_norm, self.attention_scale,
                                lambda x: self.attention(x, mask, cache=self_cache))
        if self.cross_attention is not None:
            cross_cache = None if cache is None else cache.setdefault("cross", {})
            hidden = self._sublayer(hidden, self.cross_attention_norm, None,
                                    lambda x: self.cross_attention(x, context_mask, context, cross_cache))
        return self._sublayer(hidden, self.ffn_norm, self.ffn_scale, self._feed_forward)


class RelativePositionBias(nn.Module):
    """T5's bucketed relative position bias, one value per head (the side keeps the backbone's head count)."""

    def __init__(self, num_buckets: int, max_distance: int, heads: int, bidirectional: bool) -> None:
        super().__init__()
        self.table = nn.Embedding(num_buckets, heads)
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional

    def _bucket(self, relative: torch.Tensor) -> torch.Tensor:
        buckets = self.num_buckets
        offset = torch.zeros_like(relative)
        if self.bidirectional:
            buckets //= 2
            offset = (relative > 0).long() * buckets
            distance = relative.abs()
        else:
            distance = (-relative).clamp(min=0)
        exact = buckets // 2
        log_scaled = torch.log(distance.clamp(min=1).float() / exact) / math.log(self.max_distance / exact)
        far = (exact + (log_scaled * (buckets - exact)).long()).clamp(max=buckets - 1)
        return offset + torch.where(distance < exact, distance, far)

    def forward(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """Bias of shape (1, heads, queries, keys)."""
        relative = key_positions[None, :] - query_positions[:, None]
        return self.table(self._bucket(relative)).permute(2, 0, 1).unsqueeze(0)


class SideStack(nn.Module):
    """The side network over one backbone stack: first ladder, gated ladders, side blocks, final norm."""

    def __init__(
        self,
        backbone_width: int,
        num_layers: int,
        kept: list[int],
        shape: SideShape,
        activation: nn.Module,
        cross: bool,
        final_norm: NormSpec | None,
        position_bias: RelativePositionBias | None,
        gate_init: float,
        gate_temperature: float,
    ) -> None:
        super().__init__()
        self.kept = list(kept)
        self.gate_temperature = gate_temperature
        self.first_downsample = SideLinear(backbone_width, shape.d_model)
        self.downsamples = nn.ModuleDict({str(i): SideLinear(backbone_width, shape.d_model) for i in kept})
        self.gates = nn.Parameter(torch.full((num_layers,), float(gate_init)))  # one per backbone layer
        self.blocks = nn.ModuleDict({str(i): SideBlock(shape, copy.deepcopy(activation), cross) for i in kept})
        self.final_norm = final_norm.build(shape.d_model) if final_norm is not None else None
        self.position_bias = position_bias
        self.dropout = nn.Dropout(shape.dropout)

    def gate_values(self) -> torch.Tensor:
        """mu_i = sigmoid(alpha_i / T) for every backbone layer."""
        return torch.sigmoid(self.gates / self.gate_temperature)

    def forward(
        self,
        ladders: dict[int, torch.Tensor],
        mask: torch.Tensor | None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        caches: dict[int, dict] | None = None,
    ) -> torch.Tensor:
        """``ladders[-1]`` is the first block's input, ``ladders[i]`` block i's output."""
        mu = self.gate_values()
        hidden = self.dropout(self.first_downsample(ladders[-1]))
        for i in self.kept:
            hidden = mu[i] * hidden + (1 - mu[i]) * self.downsamples[str(i)](ladders[i])
            cache = None if caches is None else caches.setdefault(i, {})
            hidden = self.blocks[str(i)](hidden, mask, context, context_mask, cache)
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        return self.dropout(hidden)


class LSTNetwork(nn.Module):
    """Everything LST trains: one side stack per backbone stack, plus the up-projection or the side head."""

    def __init__(self, stacks: dict[str, SideStack], upsample: nn.Linear | None, head: nn.Linear | None,
                 dropout: float) -> None:
        super().__init__()
        self.stacks = nn.ModuleDict(stacks)
        self.upsample = upsample
        self.head = head
        self.head_dropout = nn.Dropout(dropout)


# --- recording ladders ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def record_ladders(blocks: list[Block], kept: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """While active, ``ladders[-1]`` gets the first block's input and ``ladders[i]`` block i's output (kept i)."""
    ladders: dict[int, torch.Tensor] = {}

    def first_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ladders[-1] = args[0] if args else kwargs["hidden_states"]

    def output_of(index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            ladders[index] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [blocks[0].module.register_forward_pre_hook(first_input, with_kwargs=True)]
    handles += [blocks[i].module.register_forward_hook(output_of(i)) for i in kept]
    try:
        yield ladders
    finally:
        for handle in handles:
            handle.remove()


# --- masks ---------------------------------------------------------------------------------------------------


def additive_mask(keep: torch.Tensor) -> torch.Tensor:
    """0 where ``keep`` is true, the most negative float32 elsewhere."""
    return torch.zeros(keep.shape, device=keep.device).masked_fill(~keep, torch.finfo(torch.float32).min)


def padding_keep(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(batch, 1, 1, keys) boolean mask of the keys to attend to."""
    return None if attention_mask is None else attention_mask.bool()[:, None, None, :]


def self_attention_mask(
    attention_mask: torch.Tensor | None,
    length: int,
    causal: bool,
    position_bias: RelativePositionBias | None,
    device: torch.device,
) -> torch.Tensor | None:
    """The side stack's self-attention mask: padding, causality and (T5) relative position bias combined."""
    keep = padding_keep(attention_mask)
    if causal:
        lower = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
        keep = lower if keep is None else keep & lower
    if position_bias is None:
        return keep
    positions = torch.arange(length, device=device)
    bias = position_bias(positions, positions)
    return bias if keep is None else bias + additive_mask(keep)


# --- the method ----------------------------------------------------------------------------------------------


@register
class LadderSideTuning(TuningMethod):
    name = "lst"
    config_class = LSTConfig
    merge_unsupported_reason = (
        "LST predicts through a separate side network that runs beside the backbone; there are no backbone "
        "weights to fold it into"
    )

    def attach(self, model: nn.Module, backbone: Backbone, context: AttachContext) -> LSTNetwork:
        kind = backbone.arch.kind
        if kind == "decoder":
            raise UnsupportedMethodError(f"lst supports encoder and encoder-decoder models; family "
                                         f"{backbone.family!r} is decoder-only")
        if backbone.arch.stacks[0].nested_blocks:
            raise UnsupportedMethodError(f"lst needs one hidden width across the stack; family {backbone.family!r} "
                                         "is hierarchical (its width changes between stages)")
        self.backbone = backbone
        self.stack_names = ["encoder", "decoder"] if kind == "encoder-decoder" else [next(iter(backbone.stacks))]
        if kind == "encoder":
            if not backbone.task_heads() or not hasattr(model.config, "num_labels"):
                raise UnsupportedMethodError(
                    f"lst on an encoder predicts with a side classification head; {type(model).__name__} has no "
                    "task head: use a *ForSequenceClassification or *ForImageClassification model")
        elif backbone.lm_head() is None:
            raise UnsupportedMethodError(f"lst on {type(model).__name__} needs its lm_head (use a "
                                         "*ForConditionalGeneration model)")
        self.kept = {name: self._kept_layers(backbone.stacks[name]) for name in self.stack_names}
        for name in self.stack_names:
            self._check_divisible(backbone.stacks[name])
        reference = next(model.parameters())
        with torch.device(reference.device):
            network = self._build(model, backbone)
        if self.config.init == "fisher" and not context.loading:
            from leantune.methods.lst_pruning import fisher_initialise

            if context.data is None:
                raise ValueError(
                    "LSTConfig.init='fisher' initialises the side network from task data: pass "
                    "data=<batches with labels> to leantune.wrap, or use init='random'")
            self.pruning = fisher_initialise(model, backbone, self, network, context.data)
        model.to(DTYPES[self.config.backbone_dtype])
        return network

    # --- construction ----------------------------------------------------------------------------------------

    def _kept_layers(self, stack: Stack) -> list[int]:
        count = len(stack.blocks)
        if self.config.side_layers is None:
            return list(range(count))
        out_of_range = [i for i in self.config.side_layers if i >= count]
        if out_of_range:
            raise ValueError(f"LSTConfig.side_layers: {out_of_range} out of range for the {stack.name} stack of "
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
                raise ValueError(f"LSTConfig.reduction_factor={r} does not divide the {stack.name} {what} {size}")

    def side_shape(self, stack: Stack) -> SideShape:
        """The side block shape for ``stack``: every backbone width divided by r, the head count kept."""
        r = self.config.reduction_factor
        block = stack.blocks[0]
        query, ffn_out = block.get("query")[1], block.get("ffn_output")[1]
        cross = block.find("cross_attention_norm")
        return SideShape(
            d_model=stack.hidden_size // r,
            heads=stack.num_heads,
            d_kv=linear_in_out(query)[1] // stack.num_heads // r,
            d_ff=linear_in_out(ffn_out)[0] // r,
            ffn_inputs=len(block.find("ffn_input")),
            attention_bias=query.bias is not None,
            ffn_bias=ffn_out.bias is not None,
            attention_norm=NormSpec.of(block.get("attention_norm")[1]),
            ffn_norm=NormSpec.of(block.get("ffn_norm")[1]),
            cross_attention_norm=NormSpec.of(cross[0][1]) if cross else None,
            pre_norm=self.backbone.arch.norm_position == "pre",
            unscaled_attention=self.backbone.family == "t5",
            layer_scale=bool(block.find("attention_scale")),
            dropout=self.config.side_dropout,
        )

    def _build(self, model: nn.Module, backbone: Backbone) -> LSTNetwork:
        stacks = {}
        for name in self.stack_names:
            stack = backbone.stacks[name]
            shape = self.side_shape(stack)
            position_bias = None
            found = stack.blocks[0].find("relative_position_bias")
            if found:
                table = found[0][1]
                position_bias = RelativePositionBias(
                    table.num_embeddings, model.config.relative_attention_max_distance, shape.heads,
                    bidirectional=name != "decoder")
                with torch.no_grad():
                    position_bias.table.weight.copy_(table.weight)
            final_norm = NormSpec.of(stack.final_norm[1]) if stack.final_norm else None
            stacks[name] = SideStack(
                stack.hidden_size, len(stack.blocks), self.kept[name], shape, stack.blocks[0].get("activation")[1],
                cross=name == "decoder", final_norm=final_norm, position_bias=position_bias,
                gate_init=self.config.gate_init, gate_temperature=self.config.gate_temperature)
        upsample = head = None
        last = backbone.stacks[self.stack_names[-1]]
        side_width = last.hidden_size // self.config.reduction_factor
        if backbone.arch.kind == "encoder-decoder":
            upsample = nn.Linear(side_width, last.hidden_size)
        else:
            pooled = 2 * side_width if backbone.arch.pooling == "first+patch_mean" else side_width
            head = nn.Linear(pooled, model.config.num_labels)
        network = LSTNetwork(stacks, upsample, head, self.config.side_dropout)
        for module in network.modules():  # the paper's init of every plain linear: N(0, 0.01), zero bias
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        return network

    # --- running the backbone --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _backbone_running(self, model: nn.Module, training: bool) -> Iterator[None]:
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

    def forward(self, tuned: Any, **inputs: Any) -> Any:
        if self.backbone.arch.kind == "encoder-decoder":
            return self._seq2seq_forward(tuned, **inputs)
        return self._encoder_forward(tuned, **inputs)

    def _encoder_forward(self, tuned: Any, labels: torch.Tensor | None = None, **inputs: Any) -> Any:
        model, network = tuned.base_model, tuned.method_modules
        name = self.stack_names[0]
        stack = self.backbone.stacks[name]
        attention_mask = inputs.get("attention_mask")
        with self._backbone_running(model, tuned.training), record_ladders(stack.blocks, self.kept[name]) as ladders:
            model.base_model(**inputs)
        logits = self.classify(network, ladders, attention_mask)
        loss = None if labels is None else classification_loss(model.config, logits, labels)
        output_class = SequenceClassifierOutput if self.backbone.arch.modality == "text" else ImageClassifierOutput
        return output_class(loss=loss, logits=logits)

    def classify(self, network: LSTNetwork, ladders: dict[int, torch.Tensor],
                 attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Side-head logits from recorded ladders (encoder models); the part of forward that gets gradients."""
        side = network.stacks[self.stack_names[0]](ladders, padding_keep(attention_mask))
        return network.head(network.head_dropout(self._pool(side)))

    def _pool(self, side: torch.Tensor) -> torch.Tensor:
        """The side output pooled as the family's classification head pools its hidden states."""
        pooling = self.backbone.arch.pooling
        if pooling == "first":
            return side[:, 0]
        if pooling == "patch_mean":
            return side[:, 1:].mean(dim=1)
        if pooling == "first+patch_mean":
            return torch.cat([side[:, 0], side[:, 1:].mean(dim=1)], dim=-1)
        if pooling == "mean":
            return side.mean(dim=1)
        raise UnsupportedModelError(f"lst cannot pool family {self.backbone.family!r} ({pooling!r})")

    def _run_backbone_seq2seq(
        self,
        model: nn.Module,
        training: bool,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        decoder_attention_mask: torch.Tensor | None,
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        encoder_blocks, decoder_blocks = (self.backbone.stacks[n].blocks for n in ("encoder", "decoder"))
        with self._backbone_running(model, training):
            with record_ladders(encoder_blocks, self.kept["encoder"]) as encoder_ladders:
                encoded = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)[0]
            with record_ladders(decoder_blocks, self.kept["decoder"]) as decoder_ladders:
                model.get_decoder()(input_ids=decoder_input_ids, attention_mask=decoder_attention_mask,
                                    encoder_hidden_states=encoded, encoder_attention_mask=attention_mask,
                                    use_cache=False)
        return encoder_ladders, decoder_ladders

    def _seq2seq_forward(
        self,
        tuned: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Seq2SeqLMOutput:
        model, network = tuned.base_model, tuned.method_modules
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("lst forward on an encoder-decoder model needs labels or decoder_input_ids")
            decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        encoder_ladders, decoder_ladders = self._run_backbone_seq2seq(
            model, tuned.training, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
        side_encoded = self.side_encode(network, encoder_ladders, attention_mask)
        side_decoder = network.stacks["decoder"]
        mask = self_attention_mask(decoder_attention_mask, decoder_input_ids.shape[1], True,
                                   side_decoder.position_bias, input_ids.device)
        side = side_decoder(decoder_ladders, mask, side_encoded, padding_keep(attention_mask))
        logits = self.lm_logits(model, network, side)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=logits)

    def side_encode(self, network: LSTNetwork, ladders: dict[int, torch.Tensor],
                    attention_mask: torch.Tensor) -> torch.Tensor:
        side_encoder = network.stacks["encoder"]
        mask = self_attention_mask(attention_mask, attention_mask.shape[1], False, side_encoder.position_bias,
                                   attention_mask.device)
        return side_encoder(ladders, mask)

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

    def generate(
        self,
        tuned: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool = False,
        use_cache: bool = True,
        decoder_start_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy (``num_beams=1``) or beam-search decoding through the side network.

        Returns the decoder sequences (start token first), padded with ``pad_token_id`` after their end token.
        With ``use_cache`` the backbone decoder keeps its key/value cache and the side decoder its own; without
        it every step recomputes the whole prefix (same tokens, slower).
        """
        if self.backbone.arch.kind != "encoder-decoder":
            raise UnsupportedMethodError(f"generate() needs an encoder-decoder model; {self.backbone.family!r} "
                                         "is an encoder with a classification head")
        model = tuned.base_model
        settings = model.generation_config
        start = _first_set(decoder_start_token_id, settings.decoder_start_token_id,
                           model.config.decoder_start_token_id)
        eos = _first_set(eos_token_id, settings.eos_token_id, model.config.eos_token_id)
        pad = _first_set(pad_token_id, settings.pad_token_id, model.config.pad_token_id, 0)
        if max_new_tokens is None:  # max_length counts the start token, as in transformers
            max_new_tokens = (max_length or settings.max_length or 20) - 1
        if start is None:
            raise ValueError("generate() needs decoder_start_token_id (not set in the model's config)")
        if num_beams < 1 or max_new_tokens < 1:
            raise ValueError(f"generate() needs num_beams >= 1 and max_new_tokens >= 1, got {num_beams}, "
                             f"{max_new_tokens}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        decoder = _SideDecoding(self, tuned, input_ids, attention_mask, num_beams, use_cache)
        end_tokens = set([eos] if isinstance(eos, int) else (eos or []))
        with torch.no_grad():
            if num_beams == 1:
                return _greedy(decoder, start, end_tokens, pad, max_new_tokens)
            return _beam_search(decoder, start, end_tokens, pad, max_new_tokens, num_beams, length_penalty,
                                early_stopping)


# --- generation ----------------------------------------------------------------------------------------------


def _first_set(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


class _SideDecoding:
    """Encodes once, then gives next-token log-probabilities for growing decoder prefixes.

    With ``use_cache`` the backbone decoder reads only the newest token with its own key/value cache and the side
    decoder keeps per-layer self-attention keys/values plus the cross-attention keys/values of the side encoder.
    """

    def __init__(self, method: LadderSideTuning, tuned: Any, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, num_beams: int, use_cache: bool) -> None:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        self.method, self.model, self.network = method, tuned.base_model, tuned.method_modules
        self.use_cache = use_cache
        encoder_blocks = method.backbone.stacks["encoder"].blocks
        with torch.no_grad(), method._backbone_running(self.model, training=False):
            with record_ladders(encoder_blocks, method.kept["encoder"]) as ladders:
                encoded = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)[0]
        side_was_training = self.network.training
        self.network.eval()
        side_encoded = method.side_encode(self.network, ladders, attention_mask)
        self.network.train(side_was_training)
        self.encoded = encoded.repeat_interleave(num_beams, dim=0)
        self.side_encoded = side_encoded.repeat_interleave(num_beams, dim=0)
        self.attention_mask = attention_mask.repeat_interleave(num_beams, dim=0)
        self.backbone_cache = EncoderDecoderCache(DynamicCache(config=self.model.config),
                                                  DynamicCache(config=self.model.config)) if use_cache else None
        self.side_caches: dict[int, dict] | None = {} if use_cache else None

    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """log p(next token | tokens) for each row, as float32 of shape (rows, vocab)."""
        step_tokens = tokens[:, -1:] if self.use_cache else tokens
        side_decoder = self.network.stacks["decoder"]
        blocks = self.method.backbone.stacks["decoder"].blocks
        was_training = self.network.training
        self.network.eval()
        with self.method._backbone_running(self.model, training=False):
            with record_ladders(blocks, self.method.kept["decoder"]) as ladders:
                self.model.get_decoder()(input_ids=step_tokens, encoder_hidden_states=self.encoded,
                                         encoder_attention_mask=self.attention_mask,
                                         past_key_values=self.backbone_cache, use_cache=self.use_cache)
            if self.use_cache:
                mask = None
                if side_decoder.position_bias is not None:
                    position = tokens.shape[1] - 1
                    mask = side_decoder.position_bias(torch.tensor([position], device=tokens.device),
                                                      torch.arange(position + 1, device=tokens.device))
            else:
                mask = self_attention_mask(None, tokens.shape[1], True, side_decoder.position_bias, tokens.device)
            side = side_decoder(ladders, mask, self.side_encoded, padding_keep(self.attention_mask),
                                self.side_caches)
            logits = self.method.lm_logits(self.model, self.network, side[:, -1:])[:, 0]
        self.network.train(was_training)
        return torch.log_softmax(logits, dim=-1)

    def reorder(self, beam_rows: torch.Tensor) -> None:
        """Make row j continue from row ``beam_rows[j]`` (beam search)."""
        if not self.use_cache:
            return
        self.backbone_cache.reorder_cache(beam_rows)
        for layer_cache in self.side_caches.values():
            own = layer_cache.get("self", {})
            for name in ("key", "value"):
                if name in own:
                    own[name] = own[name].index_select(0, beam_rows)


def _greedy(decoder: _SideDecoding, start: int, end_tokens: set[int], pad: int, max_new_tokens: int) -> torch.Tensor:
    rows = decoder.encoded.shape[0]
    tokens = torch.full((rows, 1), start, dtype=torch.long, device=decoder.encoded.device)
    finished = torch.zeros(rows, dtype=torch.bool, device=tokens.device)
    ends = torch.tensor(sorted(end_tokens), dtype=torch.long, device=tokens.device)
    for _ in range(max_new_tokens):
        chosen = decoder.log_probs(tokens).argmax(dim=-1)
        chosen = torch.where(finished, torch.full_like(chosen, pad), chosen)
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)
        finished |= torch.isin(chosen, ends)
        if bool(finished.all()):
            break
    return tokens


def _beam_search(decoder: _SideDecoding, start: int, end_tokens: set[int], pad: int, max_new_tokens: int,
                 beams: int, length_penalty: float, early_stopping: bool) -> torch.Tensor:
    rows = decoder.encoded.shape[0]
    batch = rows // beams
    device = decoder.encoded.device
    tokens = torch.full((rows, 1), start, dtype=torch.long, device=device)
    scores = torch.zeros(batch, beams, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    hypotheses: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch)]
    done = [False] * batch

    def normalised(total: float, length: int) -> float:
        return total / (length ** length_penalty)

    for step in range(max_new_tokens):
        log_probs = decoder.log_probs(tokens)
        vocab = log_probs.shape[-1]
        candidates = (scores.view(-1, 1) + log_probs).view(batch, beams * vocab)
        top_scores, top_ids = candidates.topk(2 * beams, dim=1)
        next_scores = torch.zeros(batch, beams, device=device)
        next_tokens = torch.full((batch, beams), pad, dtype=torch.long, device=device)
        next_rows = torch.arange(batch, device=device)[:, None].expand(batch, beams) * beams
        next_rows = next_rows.clone()
        for b in range(batch):
            if done[b]:
                continue
            filled = 0
            for rank in range(2 * beams):
                token, origin = int(top_ids[b, rank]) % vocab, int(top_ids[b, rank]) // vocab
                total = float(top_scores[b, rank])
                if token in end_tokens:
                    if rank < beams:
                        ended = torch.cat([tokens[b * beams + origin], tokens.new_tensor([token])])
                        hypotheses[b].append((normalised(total, step + 1), ended))
                        hypotheses[b] = sorted(hypotheses[b], key=lambda h: h[0], reverse=True)[:beams]
                    continue
                next_scores[b, filled], next_tokens[b, filled] = total, token
                next_rows[b, filled] = b * beams + origin
                filled += 1
                if filled == beams:
                    break
            if len(hypotheses[b]) == beams:
                best_length = max_new_tokens if length_penalty > 0 else step + 1
                best_running = normalised(float(next_scores[b].max()), best_length)
                done[b] = early_stopping or best_running <= hypotheses[b][-1][0]
        if all(done):
            break
        beam_rows = next_rows.view(-1)
        tokens = torch.cat([tokens[beam_rows], next_tokens.view(-1, 1)], dim=1)
        scores = next_scores
        decoder.reorder(beam_rows)
    for b in range(batch):
        if not done[b]:
            for k in range(beams):
                row = tokens[b * beams + k]
                hypotheses[b].append((normalised(float(scores[b, k]), row.shape[0] - 1), row))
            hypotheses[b] = sorted(hypotheses[b], key=lambda h: h[0], reverse=True)
    best = [hypotheses[b][0][1] for b in range(batch)]
    length = max(h.shape[0] for h in best)
    out = torch.full((batch, length), pad, dtype=torch.long, device=device)
    for b, h in enumerate(best):
        out[b, :h.shape[0]] = h
    return out


def classification_loss(config: Any, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss transformers' classification heads use, chosen from ``problem_type`` or the labels as they do."""
    problem = getattr(config, "problem_type", None)
    if problem is None:
        if logits.shape[-1] == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        if logits.shape[-1] == 1:
            return F.mse_loss(logits.view(-1), labels.float().view(-1))
        return F.mse_loss(logits, labels.float())
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.float())
