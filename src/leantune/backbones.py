"""The architecture map: the one place that knows the module names of each model family.

Methods never search a model themselves. They ask a :class:`Backbone` (the map resolved against one model)
for the embeddings, the stages and ordered blocks of each stack, a block's attention and feed-forward sub-layers,
the final norms and the task head. Adding a model family means adding one :class:`ArchitectureMap` entry; a
model whose ``model_type`` has no entry gets a map inferred from its module structure (see *Inference* below).

Block roles (paths relative to a block):

``attention``               the self-attention sub-layer module
``query``/``key``/``value`` its input projections (absent where they are fused, see ``qkv``)
``qkv``                     a fused query-key-value projection (GPT-2)
``attention_output``        the projection whose output is the self-attention sub-layer's output
``feed_forward``            the feed-forward sub-layer module, where one module holds it (``mlp``)
``ffn_input``               the feed-forward input projection(s)
``ffn_output``              the projection whose output is the feed-forward sub-layer's output
``cross_*``                 the same for cross-attention (decoders of encoder-decoder models)
``attention_norm``          the norm of the self-attention sub-layer (before it in pre-norm families, after it in
                            post-norm ones, see ``ArchitectureMap.norm_position``); ``cross_attention_norm``,
                            ``ffn_norm`` likewise
``activation``              the feed-forward non-linearity module
``relative_position_bias``  T5's relative position bias table (first block of a stack only)
``attention_scale``/``ffn_scale``  per-channel layer scale after a sub-layer (DINOv2)

A role may list several candidate paths; those that exist in a block are used (T5 v1.0 has ``wi``,
T5 v1.1 has ``wi_0`` and ``wi_1``). Roles in :data:`REQUIRED_ROLES` must resolve in every block.

Facts a method may need about a family are fields of :class:`ArchitectureMap` (``kind``, ``modality``,
``norm_position``, ``attention_scale``, ``pooling``, ``rescales_tied_lm_head_input``, ``lm_logits_bias``);
no method tests a family name.

Stages: every resolved :class:`Stack` lists its :class:`Stage` records. A hierarchical backbone (Swin) has one
stage per resolution, each with its own width, head count and blocks, ending in a downsampling (patch merging)
module; every other stack is one stage. ``Stack.blocks`` stays the flat list of all blocks in forward order.

Sub-layer outputs: for each sub-layer in :data:`SUBLAYERS` (``attention``, ``cross_attention``, ``feed_forward``)
:meth:`Block.sublayer_output` gives the projection whose output *is* the sub-layer's output: nothing touches it
before the sub-layer's dropout (and drop-path) and its residual add, except a layer scale
(:meth:`Block.sublayer_scale`, DINOv2) and, where ``norm_position == "res-post"`` (Swinv2), the sub-layer norm.
Adding a tensor to that output adds it to the residual stream. Checked in the transformers 5 sources of T5,
BART, BERT, ViT, DINOv2, CLIP, Swin, Swinv2, GPT-2 and Llama (and by tests/test_backbones.py).

Inference: :func:`infer_architecture` builds a map for any transformers model from its module structure: the
repeated block list(s) (same-class ``nn.ModuleList`` entries holding query/key/value or fused qkv projections; the
innermost such lists; an encoder-decoder has two, the decoder's with cross-attention), each sub-layer's projections
by common transformers names, the norms and layer scales by the call order of one no-grad forward on a made-up
4-token (or blank image) input, and the embeddings, final norms, LM head, kind, modality and pooling from the
model and its config. :func:`find_architecture` uses it for a ``model_type`` the map lacks and logs one warning
line on the ``leantune.backbones`` logger. Inference raises :class:`UnsupportedModelError` naming what it could
not find (or what was ambiguous) among the required roles.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from leantune.errors import UnsupportedModelError

logger = logging.getLogger("leantune.backbones")

REQUIRED_ROLES = ("attention", "attention_output", "ffn_output")
# Every role that names a linear projection (query/key/value, fused qkv, outputs, feed-forward, cross-attention).
PROJECTION_ROLES = (
    "query", "key", "value", "qkv", "attention_output", "ffn_input", "ffn_output",
    "cross_query", "cross_key", "cross_value", "cross_attention_output",
)
SUBLAYERS = ("attention", "cross_attention", "feed_forward")
_SUBLAYER_OUTPUT_ROLES = {"attention": "attention_output", "cross_attention": "cross_attention_output",
                          "feed_forward": "ffn_output"}
_SUBLAYER_SCALE_ROLES = {"attention": "attention_scale", "cross_attention": "cross_attention_scale",
                         "feed_forward": "ffn_scale"}
_SUBLAYER_NORM_ROLES = {"attention": "attention_norm", "cross_attention": "cross_attention_norm",
                        "feed_forward": "ffn_norm"}
NORM_POSITIONS = ("pre", "post", "res-post")
ATTENTION_SCALES = ("inverse_sqrt", "none")

# Heads that transformers creates fresh for a downstream task (a new classifier): trained and saved by default.
TASK_HEAD_NAMES = ("classifier", "score", "classification_head", "qa_outputs")

Paths = tuple[str, ...]


@dataclass(frozen=True)
class StackSpec:
    """One stack of blocks (an encoder, a decoder, a vision or text tower), paths relative to the base model.

    ``nested_blocks`` marks a hierarchical stack: ``blocks`` is then the list of stages and ``nested_blocks``
    the block list inside each stage; ``downsample`` is the stage's downsampling module (relative to a stage).
    """

    name: str
    blocks: str
    embeddings: str
    roles: dict[str, Paths]
    final_norm: str | None = None
    embedding_norm: str | None = None
    config_attr: str | None = None
    nested_blocks: str | None = None
    downsample: str | None = None


@dataclass(frozen=True)
class ArchitectureMap:
    """Where things are in one model family, and the facts about it that methods need.

    ``kind`` is ``"encoder"``, ``"decoder"`` or ``"encoder-decoder"``. ``lm_head`` is relative to the
    top-level model. ``stacks`` that do not exist in a given model (CLIP's text tower in a
    ``CLIPVisionModel``) are skipped; at least one must exist. ``inferred`` marks a map built by
    :func:`infer_architecture`.
    """

    family: str
    model_types: tuple[str, ...]
    kind: str
    stacks: tuple[StackSpec, ...]
    lm_head: str | None = None
    modality: str = "text"
    # Where the block norms sit: "pre" (norm, sub-layer, residual add), "post" (sub-layer, residual add, norm) or
    # "res-post" (sub-layer, norm, residual add: Swinv2).
    norm_position: str = "pre"
    # How attention logits are scaled: "inverse_sqrt" (by 1/sqrt(per-head width)) or "none" (T5, whose init
    # folds the scale into the query weights).
    attention_scale: str = "inverse_sqrt"
    # How the family's classification head pools the final hidden states: "first" (CLS token), "eos" (last
    # end-of-sequence token), "mean" (all tokens), "patch_mean" (all but the first), "first+patch_mean" (both,
    # concatenated, DINOv2).
    pooling: str = "first"
    # T5: with tied embeddings the decoder output is multiplied by d_model ** -0.5 before the lm_head.
    rescales_tied_lm_head_input: bool = False
    # A buffer (relative to the top-level model) added to the lm_head's logits (BART's final_logits_bias).
    lm_logits_bias: str | None = None
    inferred: bool = False


def _encoder_roles(prefix: str, q: str, k: str, v: str, o: str, ffn_in: Paths, ffn_out: str, attn: str) -> dict:
    return {
        "attention": (attn,),
        "query": (prefix + q,),
        "key": (prefix + k,),
        "value": (prefix + v,),
        "attention_output": (o,),
        "ffn_input": ffn_in,
        "ffn_output": (ffn_out,),
    }


_T5_FFN = ("DenseReluDense.wi", "DenseReluDense.wi_0", "DenseReluDense.wi_1")
_T5_ENCODER_ROLES = {
    "attention": ("layer.0.SelfAttention",),
    "query": ("layer.0.SelfAttention.q",),
    "key": ("layer.0.SelfAttention.k",),
    "value": ("layer.0.SelfAttention.v",),
    "attention_output": ("layer.0.SelfAttention.o",),
    "feed_forward": ("layer.1.DenseReluDense",),
    "ffn_input": tuple("layer.1." + p for p in _T5_FFN),
    "ffn_output": ("layer.1.DenseReluDense.wo",),
    "attention_norm": ("layer.0.layer_norm",),
    "ffn_norm": ("layer.1.layer_norm",),
    "activation": ("layer.1.DenseReluDense.act",),
    "relative_position_bias": ("layer.0.SelfAttention.relative_attention_bias",),
}
_T5_DECODER_ROLES = {
    "attention": ("layer.0.SelfAttention",),
    "query": ("layer.0.SelfAttention.q",),
    "key": ("layer.0.SelfAttention.k",),
    "value": ("layer.0.SelfAttention.v",),
    "attention_output": ("layer.0.SelfAttention.o",),
    "cross_attention": ("layer.1.EncDecAttention",),
    "cross_query": ("layer.1.EncDecAttention.q",),
    "cross_key": ("layer.1.EncDecAttention.k",),
    "cross_value": ("layer.1.EncDecAttention.v",),
    "cross_attention_output": ("layer.1.EncDecAttention.o",),
    "feed_forward": ("layer.2.DenseReluDense",),
    "ffn_input": tuple("layer.2." + p for p in _T5_FFN),
    "ffn_output": ("layer.2.DenseReluDense.wo",),
    "attention_norm": ("layer.0.layer_norm",),
    "cross_attention_norm": ("layer.1.layer_norm",),
    "ffn_norm": ("layer.2.layer_norm",),
    "activation": ("layer.2.DenseReluDense.act",),
    "relative_position_bias": ("layer.0.SelfAttention.relative_attention_bias",),
}
_BART_ENCODER_ROLES = {
    **_encoder_roles("self_attn.", "q_proj", "k_proj", "v_proj", "self_attn.out_proj", ("fc1",), "fc2", "self_attn"),
    "attention_norm": ("self_attn_layer_norm",),
    "ffn_norm": ("final_layer_norm",),
    "activation": ("activation_fn",),
}
_BART_DECODER_ROLES = {
    **_BART_ENCODER_ROLES,
    "cross_attention": ("encoder_attn",),
    "cross_query": ("encoder_attn.q_proj",),
    "cross_key": ("encoder_attn.k_proj",),
    "cross_value": ("encoder_attn.v_proj",),
    "cross_attention_output": ("encoder_attn.out_proj",),
    "cross_attention_norm": ("encoder_attn_layer_norm",),
}
_BERT_NORM_ROLES = {
    "attention_norm": ("attention.output.LayerNorm",),
    "ffn_norm": ("output.LayerNorm",),
    "activation": ("intermediate.intermediate_act_fn",),
}
_BERT_ROLES = {
    **_encoder_roles("attention.self.", "query", "key", "value", "attention.output.dense", ("intermediate.dense",),
                     "output.dense", "attention"),
    **_BERT_NORM_ROLES,
}
_DEBERTA_ROLES = {
    **_encoder_roles("attention.self.", "query_proj", "key_proj", "value_proj", "attention.output.dense",
                     ("intermediate.dense",), "output.dense", "attention"),
    **_BERT_NORM_ROLES,
}
_VIT_ROLES = {
    **_encoder_roles("attention.", "q_proj", "k_proj", "v_proj", "attention.o_proj", ("mlp.fc1",), "mlp.fc2",
                     "attention"),
    "feed_forward": ("mlp",),
    "attention_norm": ("layernorm_before", "norm1"),
    "ffn_norm": ("layernorm_after", "norm2"),
    "activation": ("mlp.activation_fn",),
    "attention_scale": ("layer_scale1",),
    "ffn_scale": ("layer_scale2",),
}
_CLIP_ROLES = {
    **_encoder_roles("self_attn.", "q_proj", "k_proj", "v_proj", "self_attn.out_proj", ("mlp.fc1",), "mlp.fc2",
                     "self_attn"),
    "feed_forward": ("mlp",),
    "attention_norm": ("layer_norm1",),
    "ffn_norm": ("layer_norm2",),
    "activation": ("mlp.activation_fn",),
}
_SWINV2_ROLES = {
    **_encoder_roles("attention.self.", "query", "key", "value", "attention.output.dense", ("intermediate.dense",),
                     "output.dense", "attention"),
    "attention_norm": ("layernorm_before",),
    "ffn_norm": ("layernorm_after",),
    "activation": ("intermediate.intermediate_act_fn",),
}
_GPT2_ROLES = {
    "attention": ("attn",),
    "qkv": ("attn.c_attn",),
    "attention_output": ("attn.c_proj",),
    "feed_forward": ("mlp",),
    "ffn_input": ("mlp.c_fc",),
    "ffn_output": ("mlp.c_proj",),
    "attention_norm": ("ln_1",),
    "ffn_norm": ("ln_2",),
    "activation": ("mlp.act",),
}
_LLAMA_ROLES = {
    **_encoder_roles("self_attn.", "q_proj", "k_proj", "v_proj", "self_attn.o_proj",
                     ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "self_attn"),
    "feed_forward": ("mlp",),
    "attention_norm": ("input_layernorm",),
    "ffn_norm": ("post_attention_layernorm",),
    "activation": ("mlp.act_fn",),
}

ARCHITECTURES: tuple[ArchitectureMap, ...] = (
    ArchitectureMap(
        family="t5", model_types=("t5", "mt5"), kind="encoder-decoder", lm_head="lm_head",
        rescales_tied_lm_head_input=True, attention_scale="none",
        stacks=(
            StackSpec("encoder", "encoder.block", "encoder.embed_tokens", _T5_ENCODER_ROLES,
                      final_norm="encoder.final_layer_norm"),
            StackSpec("decoder", "decoder.block", "decoder.embed_tokens", _T5_DECODER_ROLES,
                      final_norm="decoder.final_layer_norm"),
        ),
    ),
    ArchitectureMap(
        family="bart", model_types=("bart", "mbart"), kind="encoder-decoder", lm_head="lm_head",
        norm_position="post", pooling="eos", lm_logits_bias="final_logits_bias",
        stacks=(
            StackSpec("encoder", "encoder.layers", "encoder.embed_tokens", _BART_ENCODER_ROLES,
                      final_norm="encoder.layer_norm", embedding_norm="encoder.layernorm_embedding"),
            StackSpec("decoder", "decoder.layers", "decoder.embed_tokens", _BART_DECODER_ROLES,
                      final_norm="decoder.layer_norm", embedding_norm="decoder.layernorm_embedding"),
        ),
    ),
    ArchitectureMap(
        family="bert", model_types=("bert", "roberta", "xlm-roberta", "electra", "camembert"), kind="encoder",
        norm_position="post",
        stacks=(StackSpec("encoder", "encoder.layer", "embeddings", _BERT_ROLES),),
    ),
    ArchitectureMap(
        family="deberta-v2", model_types=("deberta-v2",), kind="encoder", norm_position="post",
        stacks=(StackSpec("encoder", "encoder.layer", "embeddings", _DEBERTA_ROLES),),
    ),
    ArchitectureMap(
        family="vit", model_types=("vit",), kind="encoder", modality="vision",
        stacks=(StackSpec("encoder", "layers", "embeddings", _VIT_ROLES, final_norm="layernorm"),),
    ),
    ArchitectureMap(
        family="dinov2", model_types=("dinov2",), kind="encoder", modality="vision", pooling="first+patch_mean",
        stacks=(StackSpec("encoder", "encoder.layer", "embeddings", _VIT_ROLES, final_norm="layernorm"),),
    ),
    ArchitectureMap(
        family="clip", model_types=("clip", "clip_vision_model", "clip_text_model"), kind="encoder",
        modality="vision-text", pooling="patch_mean",
        stacks=(
            StackSpec("vision", "vision_model.encoder.layers", "vision_model.embeddings", _CLIP_ROLES,
                      final_norm="vision_model.post_layernorm", embedding_norm="vision_model.pre_layrnorm",
                      config_attr="vision_config"),
            StackSpec("text", "text_model.encoder.layers", "text_model.embeddings", _CLIP_ROLES,
                      final_norm="text_model.final_layer_norm", config_attr="text_config"),
        ),
    ),
    ArchitectureMap(
        family="swin", model_types=("swin",), kind="encoder", modality="vision", pooling="mean",
        stacks=(StackSpec("encoder", "encoder.layers", "embeddings", _VIT_ROLES, final_norm="layernorm",
                          nested_blocks="blocks", downsample="downsample"),),
    ),
    ArchitectureMap(
        family="swinv2", model_types=("swinv2",), kind="encoder", modality="vision", pooling="mean",
        norm_position="res-post",
        stacks=(StackSpec("encoder", "encoder.layers", "embeddings", _SWINV2_ROLES, final_norm="layernorm",
                          nested_blocks="blocks", downsample="downsample"),),
    ),
    ArchitectureMap(
        family="gpt2", model_types=("gpt2",), kind="decoder", lm_head="lm_head",
        stacks=(StackSpec("decoder", "h", "wte", _GPT2_ROLES, final_norm="ln_f"),),
    ),
    ArchitectureMap(
        family="llama", model_types=("llama", "mistral", "qwen2"), kind="decoder", lm_head="lm_head",
        stacks=(StackSpec("decoder", "layers", "embed_tokens", _LLAMA_ROLES, final_norm="norm"),),
    ),
)

CUSTOM_MAP_EXAMPLE = """\
pass a custom map, e.g.:
    from leantune.backbones import ArchitectureMap, StackSpec
    my_map = ArchitectureMap(family="mymodel", model_types=("mymodel",), kind="encoder", stacks=(
        StackSpec("encoder", blocks="encoder.layer", embeddings="embeddings", roles={
            "attention": ("attention",), "query": ("attention.q",), "key": ("attention.k",),
            "value": ("attention.v",), "attention_output": ("attention.out",),
            "ffn_input": ("mlp.fc1",), "ffn_output": ("mlp.fc2",)}),))
    leantune.wrap(model, config, architecture=my_map)"""


def supported_families() -> list[str]:
    """Family names of the built-in architecture map."""
    return [arch.family for arch in ARCHITECTURES]


def find_architecture(model: nn.Module) -> ArchitectureMap:
    """The map entry for ``model``'s config ``model_type``; for a type the map lacks, a map inferred from the model.

    Inference logs one warning line on the ``leantune.backbones`` logger naming the model type and the block
    list(s) it used, and raises :class:`UnsupportedModelError` when the model's structure is not understood.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    arch = infer_architecture(model)
    base = getattr(model, "base_model", model)
    prefix = next((n for n, m in model.named_modules() if m is base), "")
    lists = " and ".join(repr(_join(prefix, spec.blocks)) for spec in arch.stacks)
    logger.warning("leantune: model type %r (%s) is not in the architecture map; inferred its map from the block "
                   "list%s %s", model_type, type(model).__name__, "s" if len(arch.stacks) > 1 else "", lists)
    return arch


def is_norm(module: nn.Module) -> bool:
    """True for LayerNorm and RMSNorm modules, including transformers' own classes (T5LayerNorm, LlamaRMSNorm)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
        return True
    name = type(module).__name__
    return name.endswith("LayerNorm") or name.endswith("RMSNorm")


@dataclass
class Block:
    """One transformer block of a stack, with its full dotted path from the top-level model.

    ``index`` counts blocks across the whole stack (all stages); ``stage`` is the index of the stage holding it.
    """

    stack: str
    index: int
    path: str
    module: nn.Module
    roles: dict[str, Paths]
    stage: int = 0

    def find(self, role: str) -> list[tuple[str, nn.Module]]:
        """``(full name, module)`` for each path of ``role`` that exists in this block (empty if none)."""
        found = []
        for relative in self.roles.get(role, ()):
            module = _get_submodule(self.module, relative)
            if module is not None:
                found.append((f"{self.path}.{relative}", module))
        return found

    def get(self, role: str) -> tuple[str, nn.Module]:
        """The single module of ``role``; raises if it is missing."""
        found = self.find(role)
        if not found:
            looked_for = self.roles.get(role)
            raise UnsupportedModelError(f"block {self.path} has no {role!r} module (looked for {looked_for})")
        return found[0]

    def sublayer_output(self, sublayer: str) -> tuple[str, nn.Module] | None:
        """The projection whose output is ``sublayer``'s output, before its dropout and residual add; ``None``
        where the block has no such sub-layer (cross-attention outside encoder-decoder decoders)."""
        found = self.find(_sublayer_role(_SUBLAYER_OUTPUT_ROLES, sublayer))
        return found[0] if found else None

    def sublayer_scale(self, sublayer: str) -> tuple[str, nn.Module] | None:
        """The layer scale between ``sublayer``'s output projection and the residual add (DINOv2), or ``None``."""
        found = self.find(_sublayer_role(_SUBLAYER_SCALE_ROLES, sublayer))
        return found[0] if found else None

    def sublayer_norm(self, sublayer: str) -> tuple[str, nn.Module] | None:
        """``sublayer``'s norm (before it, or after its residual add or output, per ``norm_position``), or ``None``."""
        found = self.find(_sublayer_role(_SUBLAYER_NORM_ROLES, sublayer))
        return found[0] if found else None

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream at this block, read from the attention output projection."""
        _, proj = self.get("attention_output")
        weight = proj.weight
        return weight.shape[1] if type(proj).__name__ == "Conv1D" else weight.shape[0]


def _sublayer_role(roles: dict[str, str], sublayer: str) -> str:
    if sublayer not in roles:
        raise ValueError(f"unknown sub-layer {sublayer!r}; sub-layers: {', '.join(SUBLAYERS)}")
    return roles[sublayer]


@dataclass
class Stage:
    """One stage of a stack: consecutive blocks of one width, then (hierarchical backbones) a downsampling module.

    ``downsample`` is ``(full name, module)`` of the module that runs after the stage's last block (Swin's patch
    merging), ``None`` where there is none (the last Swin stage, every non-hierarchical stack). ``num_heads`` is
    ``None`` where neither the config nor the attention module says.
    """

    index: int
    hidden_size: int
    num_heads: int | None
    blocks: list[Block]
    downsample: tuple[str, nn.Module] | None = None

    @property
    def depth(self) -> int:
        return len(self.blocks)


@dataclass
class Stack:
    """A resolved stack: its stages and blocks, embeddings and norms as ``(full name, module)``."""

    spec: StackSpec
    blocks: list[Block]
    embeddings: tuple[str, nn.Module]
    final_norm: tuple[str, nn.Module] | None
    embedding_norm: tuple[str, nn.Module] | None
    config: object
    stages: list[Stage] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def hidden_size(self) -> int:
        """Width of the first block (per-stage widths: ``stages``)."""
        return self.blocks[0].hidden_size

    @property
    def num_heads(self) -> int | None:
        """Attention heads of the first block (per-stage counts: ``stages``)."""
        return _num_heads(self.config, self.spec.name, 0, self.blocks[0])


def _num_heads(config: object, stack: str, stage: int, block: Block) -> int | None:
    """Heads from the config (a per-stage list for Swin), else from the block's attention module attributes."""
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(heads, (list, tuple)):
        return int(heads[stage])
    if stack == "decoder" and hasattr(config, "num_decoder_heads"):
        return int(config.num_decoder_heads)
    if heads is not None:
        return int(heads)
    for _, attention in block.find("attention"):
        for attr in ("num_heads", "num_attention_heads", "n_heads", "n_head"):
            value = getattr(attention, attr, None)
            if isinstance(value, int):
                return value
    return None


@dataclass
class Backbone:
    """The architecture map resolved against one model instance."""

    arch: ArchitectureMap
    model: nn.Module
    base_prefix: str
    stacks: dict[str, Stack] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.arch.family

    @property
    def num_layers(self) -> int:
        """Blocks in the first stack (the encoder of an encoder-decoder model)."""
        return len(next(iter(self.stacks.values())).blocks)

    def blocks(self, stacks: list[str] | None = None) -> list[Block]:
        """All blocks, stack by stack, in forward order."""
        return [b for name, s in self.stacks.items() if stacks is None or name in stacks for b in s.blocks]

    def modules_for_role(self, role: str) -> list[tuple[str, nn.Module]]:
        """Every module that plays ``role`` in any block."""
        return [found for block in self.blocks() for found in block.find(role)]

    def sublayer_outputs(self, sublayer: str) -> list[tuple[str, nn.Module]]:
        """:meth:`Block.sublayer_output` of every block that has ``sublayer``."""
        return [found for block in self.blocks() if (found := block.sublayer_output(sublayer)) is not None]

    def norm_modules(self) -> list[tuple[str, nn.Module]]:
        """Every LayerNorm/RMSNorm in the model, embeddings and final norms included."""
        return [(n, m) for n, m in self.model.named_modules() if is_norm(m)]

    def task_heads(self) -> list[tuple[str, nn.Module]]:
        """Heads a task model creates fresh (``classifier``, ``score`` ...), as direct children of the model."""
        return [(n, m) for n, m in self.model.named_children() if n in TASK_HEAD_NAMES]

    def lm_head(self) -> tuple[str, nn.Module] | None:
        if self.arch.lm_head is None:
            return None
        module = _get_submodule(self.model, self.arch.lm_head)
        return None if module is None else (self.arch.lm_head, module)

    def input_embeddings(self) -> nn.Module:
        """The token embedding table (text models)."""
        return self.model.get_input_embeddings()

    def describe(self) -> str:
        """A short human-readable summary, used by ``leantune inspect``."""
        inferred = ", inferred" if self.arch.inferred else ""
        lines = [f"family {self.family} ({self.arch.kind}, {self.arch.modality}{inferred})"]
        for stack in self.stacks.values():
            lines.append(
                f"  {stack.name}: {len(stack.blocks)} blocks at {_join(self.base_prefix, stack.spec.blocks)}, "
                f"hidden {stack.hidden_size}, heads {stack.num_heads}, embeddings {stack.embeddings[0]}"
            )
            if len(stack.stages) > 1:
                lines.append("    stages: " + ", ".join(
                    f"{s.depth} x {s.hidden_size}/{s.num_heads} heads" for s in stack.stages))
        return "\n".join(lines)


def resolve(model: nn.Module, arch: ArchitectureMap | None = None) -> Backbone:
    """Resolve the architecture map (the family's entry, an inferred one, or ``arch``) against ``model``."""
    arch = arch or find_architecture(model)
    base = getattr(model, "base_model", model)
    base_prefix = next((n for n, m in model.named_modules() if m is base), "")
    backbone = Backbone(arch=arch, model=model, base_prefix=base_prefix)
    for spec in arch.stacks:
        container = _get_submodule(base, spec.blocks)
        if container is None:
            continue
        config = model.config
        if spec.config_attr and hasattr(config, spec.config_attr):
            config = getattr(config, spec.config_attr)
        stages = _resolve_stages(spec, container, _join(base_prefix, spec.blocks), config)
        backbone.stacks[spec.name] = Stack(
            spec=spec,
            blocks=[block for stage in stages for block in stage.blocks],
            embeddings=_named(base, base_prefix, spec.embeddings, required=True),
            final_norm=_named(base, base_prefix, spec.final_norm),
            embedding_norm=_named(base, base_prefix, spec.embedding_norm),
            config=config,
            stages=stages,
        )
    if not backbone.stacks:
        raise UnsupportedModelError(
            f"{type(model).__name__} matched family {arch.family!r} but none of its stacks "
            f"({', '.join(s.blocks for s in arch.stacks)}) exist in the model; {CUSTOM_MAP_EXAMPLE}"
        )
    return backbone


def _resolve_stages(spec: StackSpec, container: nn.Module, path: str, config: object) -> list[Stage]:
    """The stack's stages (one for a flat stack), each block checked for the required roles."""
    if spec.nested_blocks:
        groups = [(f"{path}.{s}", stage, _get_submodule(stage, spec.nested_blocks))
                  for s, stage in enumerate(container)]
    else:
        groups = [(None, None, container)]
    stages: list[Stage] = []
    count = 0
    for s, (stage_path, stage_module, members) in enumerate(groups):
        if members is None:
            raise UnsupportedModelError(f"stage {stage_path} has no block list {spec.nested_blocks!r}")
        prefix = path if stage_path is None else f"{stage_path}.{spec.nested_blocks}"
        blocks = [Block(spec.name, count + j, f"{prefix}.{j}", b, spec.roles, stage=s) for j, b in enumerate(members)]
        count += len(blocks)
        for block in blocks:
            for role in REQUIRED_ROLES:
                block.get(role)
        downsample = None
        if stage_module is not None and spec.downsample:
            downsample = _named(stage_module, stage_path, spec.downsample)
        stages.append(Stage(s, blocks[0].hidden_size, _num_heads(config, spec.name, s, blocks[0]), blocks,
                            downsample))
    return stages


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


def _get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _named(base: nn.Module, prefix: str, path: str | None, required: bool = False):
    if path is None:
        return None
    module = _get_submodule(base, path)
    if module is None:
        if required:
            raise UnsupportedModelError(f"{type(base).__name__} has no module {path!r} named in the architecture map")
        return None
    return _join(prefix, path), module


def linear_in_out(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[0], module.weight.shape[1]
    raise UnsupportedModelError(f"{type(module).__name__} is not a linear projection (nn.Linear or Conv1D)")


def linear_weight_as_out_in(module: nn.Module) -> torch.Tensor:
    """The weight of a linear projection laid out as (out, in), whatever the module's own layout."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


# --- inference --------------------------------------------------------------------------------------------------
# Common transformers names of each projection, matched against a module path's last component(s).
_QUERY = ("q", "q_proj", "query", "q_lin", "query_proj", "wq", "q_linear", "to_q")
_KEY = ("k", "k_proj", "key", "k_lin", "key_proj", "wk", "k_linear", "to_k")
_VALUE = ("v", "v_proj", "value", "v_lin", "value_proj", "wv", "v_linear", "to_v")
_FUSED_QKV = ("qkv", "qkv_proj", "query_key_value", "c_attn", "Wqkv", "wqkv", "to_qkv")
_ATTENTION_OUTPUT = ("o", "o_proj", "out_proj", "out_lin", "dense", "c_proj", "wo", "Wo", "out", "proj", "o_linear",
                     "to_out")
_ATTENTION_OUTPUT_BESIDE = ("output.dense", "output")  # BERT-style: attention.self.{query,...}, attention.output.dense
_FFN_INPUT = ("fc1", "c_fc", "up_proj", "gate_proj", "gate_up_proj", "dense_h_to_4h", "intermediate.dense", "lin1",
              "wi", "wi_0", "wi_1", "fc_in", "ffn", "w1", "w3", "Wi", "linear1")
_FFN_OUTPUT = ("fc2", "c_proj", "down_proj", "dense_4h_to_h", "output.dense", "lin2", "wo", "Wo", "fc_out",
               "ffn_output", "w2", "linear2")
_CROSS_MARKERS = ("cross", "encdec", "encoder_attn", "enc_dec", "src_attn")
_QK_NORMS = ("q_norm", "k_norm", "query_norm", "key_norm", "q_layernorm", "k_layernorm")
_ACTIVATION = re.compile(r"gelu|relu|silu|swish|tanh|sigmoid|mish|activation", re.IGNORECASE)
_MODALITIES = {"input_ids": "text", "pixel_values": "vision", "input_values": "audio", "input_features": "audio"}

Events = list[tuple[str, str]]


class _Incomplete(Exception):
    """Inference could not find, or could not single out, a required part; the message says which."""


@dataclass
class _BlockGuess:
    """A block's roles found by name, and what the call order must place: sub-layers, norms, layer scales."""

    roles: dict[str, Paths]
    sublayers: list[tuple[str, str, str]]  # (sub-layer, module whose call starts it, its output projection)
    norms: list[str]
    scales: list[str]
    unscaled_attention: bool


@dataclass
class _Candidate:
    """A block list (or, for a hierarchical stack, a list of stages each holding one) that inference may use."""

    path: str
    nested: str | None
    count: int
    guess: _BlockGuess
    first_block: str
    last_block: str


def infer_architecture(model: nn.Module) -> ArchitectureMap:
    """An :class:`ArchitectureMap` for ``model`` read from its module structure (see the module docstring).

    Raises :class:`UnsupportedModelError` naming what is missing or ambiguous among the required roles.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    try:
        return _infer(model, config, model_type or type(model).__name__)
    except _Incomplete as err:
        raise UnsupportedModelError(
            f"model type {model_type!r} ({type(model).__name__}) is not in leantune's architecture map and its "
            f"architecture could not be inferred: {err}; supported families: {', '.join(supported_families())}; "
            f"{CUSTOM_MAP_EXAMPLE}"
        ) from None


def _infer(model: nn.Module, config: object, family: str) -> ArchitectureMap:
    base = getattr(model, "base_model", model)
    prefix = next((n for n, m in model.named_modules() if m is base), "")
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    kind = "encoder-decoder" if encoder_decoder else "decoder" if _is_decoder(model, config) else "encoder"
    modality = _MODALITIES.get(getattr(model, "main_input_name", "input_ids"), "text")
    chosen = _choose_stacks(_candidates(base, prefix), kind)
    watched = {}
    for _, candidate in chosen:
        first = base.get_submodule(candidate.first_block)
        for _, entry, output in candidate.guess.sublayers:
            watched.update({_join(candidate.first_block, p): first.get_submodule(p) for p in (entry, output)})
        for path in candidate.guess.norms + candidate.guess.scales:
            watched[_join(candidate.first_block, path)] = first.get_submodule(path)
        for path in (candidate.first_block, candidate.last_block, *_outer_norms(base, candidate)):
            watched[path] = base.get_submodule(path)
    events = _call_order(model, watched, _probe_inputs(model, config, encoder_decoder))
    specs, norm_position = [], None
    for name, candidate in chosen:
        placed, position = _place_block_norms(events, candidate)
        norm_position = norm_position or position
        final_norm, embedding_norm = _place_outer_norms(events, candidate, _outer_norms(base, candidate))
        holder = base.get_submodule(candidate.path)
        stages = list(holder) if candidate.nested else []
        downsample = "downsample" if len(stages) > 1 and all(
            isinstance(getattr(stage, "downsample", None), nn.Module) for stage in stages[:-1]) else None
        specs.append(StackSpec(
            name, candidate.path, _embeddings(model, base, candidate.path.rpartition(".")[0], name),
            {**candidate.guess.roles, **placed}, final_norm=final_norm, embedding_norm=embedding_norm,
            nested_blocks=candidate.nested, downsample=downsample,
        ))
    return ArchitectureMap(
        family=family, model_types=(family,), kind=kind, stacks=tuple(specs), lm_head=_lm_head(model),
        modality=modality, norm_position=norm_position or "pre",
        attention_scale="none" if chosen[0][1].guess.unscaled_attention else "inverse_sqrt",
        pooling=_pooling(kind, modality, config, base.get_submodule(specs[0].embeddings)),
        lm_logits_bias="final_logits_bias" if "final_logits_bias" in dict(model.named_buffers()) else None,
        inferred=True,
    )


def _is_decoder(model: nn.Module, config: object) -> bool:
    """A causal LM: ``config.is_decoder``, a causal-LM class, or a model type with a causal LM but no masked LM."""
    if getattr(config, "is_decoder", False):
        return True
    name = type(model).__name__
    if "CausalLM" in name or "LMHeadModel" in name:
        return True
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _candidates(base: nn.Module, prefix: str) -> list[_Candidate]:
    """Every innermost block list whose first block has attention projections, stage lists grouped."""
    lists = {n: m for n, m in base.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1 and m[0]._modules}
    if not lists:
        raise _Incomplete("no repeated block list (an nn.ModuleList of same-class modules) found")
    guesses, failures = {}, {}
    for name, blocks in lists.items():
        try:
            guesses[name] = _guess_block(blocks[0], _join(prefix, f"{name}.0"))
        except _Incomplete as err:
            failures[name] = err
    innermost = [n for n in guesses if not any(other.startswith(n + ".") for other in guesses)]
    if not innermost:
        raise failures[max(lists, key=lambda n: len(lists[n]))]
    candidates, used = [], set()
    for name in innermost:
        if name in used:
            continue
        stage_list = _stage_list(name, lists)
        if stage_list is not None:
            outer, inner = stage_list
            members = [f"{outer}.{i}.{inner}" for i in range(len(lists[outer]))]
            if all(member in guesses for member in members):
                used.update(members)
                count = sum(len(lists[member]) for member in members)
                candidates.append(_Candidate(outer, inner, count, guesses[name], f"{members[0]}.0",
                                             f"{members[-1]}.{len(lists[members[-1]]) - 1}"))
                continue
        candidates.append(_Candidate(name, None, len(lists[name]), guesses[name], f"{name}.0",
                                     f"{name}.{len(lists[name]) - 1}"))
    return candidates


def _stage_list(name: str, lists: dict[str, nn.ModuleList]) -> tuple[str, str] | None:
    """``(stage list, block list inside a stage)`` where ``name`` is ``<stage list>.<i>.<block list>``."""
    for outer in sorted(lists, key=len, reverse=True):
        if name.startswith(outer + "."):
            index, _, inner = name[len(outer) + 1:].partition(".")
            if index.isdigit() and inner:
                return outer, inner
    return None


def _choose_stacks(candidates: list[_Candidate], kind: str) -> list[tuple[str, _Candidate]]:
    """The encoder and decoder block lists of an encoder-decoder model, else the longest block list."""
    if kind != "encoder-decoder":
        return [(kind, _longest(candidates))]
    decoders = [c for c in candidates if "cross_attention" in c.guess.roles]
    encoders = [c for c in candidates if "cross_attention" not in c.guess.roles]
    if len(decoders) != 1 or not encoders:
        found = ", ".join(repr(c.path) for c in candidates)
        raise _Incomplete("an encoder-decoder model needs one encoder block list and one decoder block list with "
                          f"cross-attention; found {found}")
    return [("encoder", _longest(encoders)), ("decoder", decoders[0])]


def _longest(candidates: list[_Candidate]) -> _Candidate:
    most = max(c.count for c in candidates)
    longest = [c for c in candidates if c.count == most]
    if len(longest) > 1:
        raise _Incomplete(f"ambiguous: block lists {', '.join(repr(c.path) for c in longest)} are equally long")
    return longest[0]


def _guess_block(block: nn.Module, path: str) -> _BlockGuess:
    """Roles of one block by common transformers names (and shapes, for the feed-forward projections)."""
    holders = _attention_holders(block)
    own = [h for h in holders if not _is_cross(h[0])]
    cross = [h for h in holders if _is_cross(h[0])]
    if not own:
        attention = next((n for n, _ in block.named_modules()
                          if re.search("attn|attention", n.rsplit(".", 1)[-1], re.IGNORECASE)), None)
        names = "/".join(_QUERY[:3] + _KEY[:3] + _VALUE[:3]) + ", or fused " + "/".join(_FUSED_QKV[:4])
        where = f"{path}.{attention}" if attention else path
        raise _Incomplete(f"no query/key/value projections ({names}) found in block {where!r}")
    if len(own) > 1 or len(cross) > 1:
        several = ", ".join(repr(f"{path}.{h[0]}") for h in (own if len(own) > 1 else cross))
        raise _Incomplete(f"ambiguous: block {path!r} has several attention modules with projections: {several}")
    roles: dict[str, Paths] = {}
    sublayers = []
    for key, found in (("attention", own), ("cross_attention", cross)):
        if not found:
            continue
        holder, projections = found[0]
        module, output = _attention_output(block, holder, f"{path}.{holder}")
        role_prefix = "cross_" if key == "cross_attention" else ""
        roles[key] = (module,)
        roles.update({role_prefix + role: (p,) for role, p in projections.items()})
        roles[f"{key}_output"] = (output,)
        sublayers.append((key, module, output))
    hidden = linear_in_out(block.get_submodule(roles["attention_output"][0]))[1]
    attention_parts = [paths[0] for key, paths in roles.items() if key in ("attention", "cross_attention")]
    inputs, output = _feed_forward(block, attention_parts, hidden, path)
    container = _common_parent(inputs + [output])
    roles["ffn_output"] = (output,)
    if inputs:
        roles["ffn_input"] = tuple(inputs)
    if container:
        roles["feed_forward"] = (container,)
    sublayers.append(("feed_forward", container or (inputs or [output])[0], output))
    activations = [n for n, m in block.named_modules() if n and not _inside(n, attention_parts) and _is_activation(m)]
    if activations:
        roles["activation"] = (activations[0],)
    norms = [n for n, m in block.named_modules() if n and is_norm(m) and _norm_width(m) == hidden
             and n.rsplit(".", 1)[-1] not in _QK_NORMS]
    scales = [n for n, m in block.named_modules() if n and "LayerScale" in type(m).__name__]
    scaling = getattr(block.get_submodule(own[0][0]), "scaling", None)
    return _BlockGuess(roles, sublayers, norms, scales, isinstance(scaling, float) and scaling == 1.0)


def _attention_holders(block: nn.Module) -> list[tuple[str, dict[str, str]]]:
    """Modules (below the block) with query, key and value projections, or a fused one, as direct children."""
    found = []
    for name, module in block.named_modules():
        if not name:
            continue
        linears = {n for n, child in module.named_children() if _is_linear(child)}
        q, k, v = (next((n for n in names if n in linears), None) for names in (_QUERY, _KEY, _VALUE))
        fused = next((n for n in _FUSED_QKV if n in linears), None)
        if q and k and v:
            found.append((name, {"query": f"{name}.{q}", "key": f"{name}.{k}", "value": f"{name}.{v}"}))
        elif fused:
            found.append((name, {"qkv": f"{name}.{fused}"}))
    return found


def _attention_output(block: nn.Module, holder: str, where: str) -> tuple[str, str]:
    """``(attention sub-layer module, its output projection)``: inside the holder, or beside it (BERT)."""
    module = block.get_submodule(holder)
    for name in _ATTENTION_OUTPUT:
        if _is_linear(module._modules.get(name)):
            return holder, f"{holder}.{name}"
    parent = holder.rpartition(".")[0]
    if parent:
        for name in _ATTENTION_OUTPUT_BESIDE + _ATTENTION_OUTPUT:
            if _is_linear(_get_submodule(block.get_submodule(parent), name)):
                return parent, f"{parent}.{name}"
    raise _Incomplete(f"no attention output projection ({', '.join(_ATTENTION_OUTPUT)}, or output.dense beside "
                      f"it) found in {where!r}")


def _feed_forward(block: nn.Module, attention: list[str], hidden: int, path: str) -> tuple[list[str], str]:
    """``(input projections, output projection)`` of the feed-forward sub-layer: by name, else by shape."""
    linears = {n: m for n, m in block.named_modules() if n and _is_linear(m) and not _inside(n, attention)}
    shapes = {n: linear_in_out(m) for n, m in linears.items()}
    outputs = _by_name(linears, _FFN_OUTPUT)
    if len(outputs) > 1:
        outputs = [n for n in outputs if shapes[n][1] == hidden]
    if not outputs:  # the one projection from another width back to the hidden width
        outputs = [n for n, (i, o) in shapes.items() if o == hidden and i != hidden]
    if len(outputs) != 1:
        found = f": {', '.join(outputs)}" if outputs else ""
        raise _Incomplete(f"{'ambiguous' if outputs else 'no'} feed-forward output projection "
                          f"({', '.join(_FFN_OUTPUT)}){found} in block {path!r}")
    inputs = _by_name(linears, _FFN_INPUT) or [n for n, (i, o) in shapes.items()
                                               if n != outputs[0] and i == hidden and o != hidden]
    return inputs, outputs[0]


def _by_name(modules: dict[str, nn.Module], names: tuple[str, ...]) -> list[str]:
    return [p for p in modules if any(p == n or p.endswith("." + n) for n in names)]


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def _common_parent(paths: list[str]) -> str:
    common: list[str] = []
    for parts in zip(*(p.split(".")[:-1] for p in paths)):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _is_cross(path: str) -> bool:
    return any(marker in part.lower() for part in path.split(".") for marker in _CROSS_MARKERS)


def _is_linear(module: nn.Module | None) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _is_activation(module: nn.Module) -> bool:
    return (not module._modules and next(module.parameters(), None) is None
            and _ACTIVATION.search(type(module).__name__) is not None)


def _norm_width(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.shape[0]
    shape = getattr(module, "normalized_shape", None)
    return int(shape[-1]) if shape else None


def _outer_norms(base: nn.Module, candidate: _Candidate) -> list[str]:
    """Norms of the first or last block's width that are children of the module holding the block list or of its
    ancestors."""
    output = candidate.guess.roles["attention_output"][0]
    widths = {linear_in_out(base.get_submodule(f"{block}.{output}"))[1]
              for block in (candidate.first_block, candidate.last_block)}
    parts = candidate.path.split(".")[:-1]
    found = []
    for depth in range(len(parts), -1, -1):
        owner = ".".join(parts[:depth])
        for name, child in base.get_submodule(owner).named_children():
            if is_norm(child) and _norm_width(child) in widths:
                found.append(_join(owner, name))
    return found


def _probe_inputs(model: nn.Module, config: object, encoder_decoder: bool) -> dict[str, torch.Tensor] | None:
    """A made-up batch of one (4 tokens, or a blank image) for the call-order probe; ``None`` where unknown."""
    param = next(model.parameters(), None)
    if param is None or param.is_meta:
        return None
    name = getattr(model, "main_input_name", "input_ids")
    if name == "input_ids":
        vocab = getattr(config, "vocab_size", None)
        if not isinstance(vocab, int) or vocab < 2:
            return None
        ids = (torch.arange(4, device=param.device) % (vocab - 1) + 1).unsqueeze(0)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if encoder_decoder:
            inputs["decoder_input_ids"] = ids[:, :2]
        return inputs
    if name == "pixel_values":
        size = getattr(config, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        dtype = param.dtype if param.is_floating_point() else torch.float32
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.zeros(1, channels, height, width, device=param.device, dtype=dtype)}
    return None


def _call_order(model: nn.Module, watched: dict[str, nn.Module], inputs: dict | None) -> Events | None:
    """``(name, "pre" | "post")`` for every call of the watched modules in one no-grad eval forward."""
    if inputs is None:
        return None
    events: Events = []
    handles = []
    for name, module in watched.items():
        handles.append(module.register_forward_pre_hook(lambda _m, _a, n=name: events.append((n, "pre"))))
        handles.append(module.register_forward_hook(lambda _m, _a, _o, n=name: events.append((n, "post"))))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(**inputs)
    except Exception:  # a forward on made-up inputs may fail for many reasons; the call order then stays unknown
        return None
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return events


def _place_block_norms(events: Events | None, candidate: _Candidate) -> tuple[dict[str, Paths], str | None]:
    """Norm and layer-scale roles from the first call of the first block, and pre- or post-norm (``None``: unknown).

    Pre-norm: a norm runs before the first sub-layer; each sub-layer's norm is the last one to finish between the
    previous sub-layer's output and its start. Post-norm: each sub-layer's norm is the first to start after its
    output projection and before the next sub-layer. A layer scale is the first to start after the output.
    """
    first, guess = candidate.first_block, candidate.guess
    if events is None or (first, "pre") not in events:
        return {}, None
    begin = events.index((first, "pre"))
    window = events[begin:events.index((first, "post"), begin)]

    def at(path: str, phase: str) -> int | None:
        key = (_join(first, path), phase)
        return window.index(key) if key in window else None

    spans = []
    for sublayer, entry, output in guess.sublayers:
        start, stop = at(entry, "pre"), at(output, "post")
        if start is None or stop is None:
            return {}, None
        spans.append((start, stop, sublayer))
    spans.sort()
    ends = {n: at(n, "post") for n in guess.norms}
    starts = {n: at(n, "pre") for n in guess.norms + guess.scales}
    pre = any(end is not None and end < spans[0][0] for end in ends.values())
    roles: dict[str, Paths] = {}
    for k, (start, stop, sublayer) in enumerate(spans):
        after = spans[k + 1][0] if k + 1 < len(spans) else len(window)
        if pre:
            before = spans[k - 1][1] if k else -1
            norms = [n for n in guess.norms if ends[n] is not None and before < ends[n] < start]
            norm = max(norms, key=lambda n: ends[n], default=None)
        else:
            norms = [n for n in guess.norms if starts[n] is not None and stop < starts[n] < after]
            norm = min(norms, key=lambda n: starts[n], default=None)
        if norm is not None:
            roles[_SUBLAYER_NORM_ROLES[sublayer]] = (norm,)
        scales = [s for s in guess.scales if starts[s] is not None and stop < starts[s] < after]
        if scales:
            roles[_SUBLAYER_SCALE_ROLES[sublayer]] = (min(scales, key=lambda s: starts[s]),)
    return roles, "pre" if pre else "post" if roles else None


def _place_outer_norms(events: Events | None, candidate: _Candidate,
                       norms: list[str]) -> tuple[str | None, str | None]:
    """``(final norm, embedding norm)``: the nearest outer norm that runs after the last block / before the first."""
    if events is None or (candidate.first_block, "pre") not in events:
        return None, None
    begin = events.index((candidate.first_block, "pre"))
    end = len(events) - 1 - events[::-1].index((candidate.last_block, "post"))
    final = next((n for n in norms if any(e == (n, "pre") and i > end for i, e in enumerate(events))), None)
    embedding = next((n for n in norms if any(e == (n, "post") and i < begin for i, e in enumerate(events))), None)
    return final, embedding


def _embeddings(model: nn.Module, base: nn.Module, owner: str, stack: str) -> str:
    """The stack's input embeddings: the owner's own token table, else the model's input embeddings (or the
    ``*Embeddings`` module holding them)."""
    try:
        table = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        table = None
    path = next((n for n, m in base.named_modules() if m is table), None) if table is not None else None
    if path is None:
        raise _Incomplete(f"no input embeddings for the {stack} stack (get_input_embeddings() names no module of "
                          f"{type(base).__name__})")
    weight = getattr(table, "weight", None)
    for name, child in base.get_submodule(owner).named_children():
        if isinstance(child, nn.Embedding) and weight is not None and child.weight.shape == weight.shape:
            return _join(owner, name)
    parent = path.rpartition(".")[0]
    if parent and type(base.get_submodule(parent)).__name__.endswith("Embeddings"):
        return parent
    return path


def _lm_head(model: nn.Module) -> str | None:
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def _pooling(kind: str, modality: str, config: object, embeddings: nn.Module) -> str:
    """Decoders and encoder-decoders pool the last token; vision encoders their patches (mean) unless they have a
    class token; text encoders the first token."""
    if kind != "encoder":
        return "eos"
    if modality == "vision":
        if getattr(config, "use_mean_pooling", False):
            return "patch_mean"
        return "first" if any(n.endswith("cls_token") for n, _ in embeddings.named_parameters()) else "mean"
    return "first"
