"""The architecture map: the one place that knows the module names of each supported model family.

Methods never search a model themselves. They ask a :class:`Backbone` (the map resolved against one model)
for the embeddings, the ordered blocks of each stack, a block's attention and feed-forward sub-layers, the
final norms and the task head. Adding a model family means adding one :class:`ArchitectureMap` entry.

Block roles (paths relative to a block):

``attention``               the self-attention sub-layer module
``query``/``key``/``value`` its input projections (absent where they are fused, see ``qkv``)
``qkv``                     a fused query-key-value projection (GPT-2)
``attention_output``        the projection whose output is the self-attention sub-layer's output
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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from leantune.errors import UnsupportedModelError

REQUIRED_ROLES = ("attention", "attention_output", "ffn_output")
# Every role that names a linear projection (query/key/value, fused qkv, outputs, feed-forward, cross-attention).
PROJECTION_ROLES = (
    "query", "key", "value", "qkv", "attention_output", "ffn_input", "ffn_output",
    "cross_query", "cross_key", "cross_value", "cross_attention_output",
)

# Heads that transformers creates fresh for a downstream task (a new classifier): trained and saved by default.
TASK_HEAD_NAMES = ("classifier", "score", "classification_head", "qa_outputs")

Paths = tuple[str, ...]


@dataclass(frozen=True)
class StackSpec:
    """One stack of blocks (an encoder, a decoder, a vision or text tower), paths relative to the base model."""

    name: str
    blocks: str
    embeddings: str
    roles: dict[str, Paths]
    final_norm: str | None = None
    embedding_norm: str | None = None
    config_attr: str | None = None
    nested_blocks: str | None = None


@dataclass(frozen=True)
class ArchitectureMap:
    """Where things are in one model family.

    ``kind`` is ``"encoder"``, ``"decoder"`` or ``"encoder-decoder"``. ``lm_head`` is relative to the
    top-level model. ``stacks`` that do not exist in a given model (CLIP's text tower in a
    ``CLIPVisionModel``) are skipped; at least one must exist.
    """

    family: str
    model_types: tuple[str, ...]
    kind: str
    stacks: tuple[StackSpec, ...]
    lora_targets: tuple[str, ...] = ("query", "value")
    lm_head: str | None = None
    modality: str = "text"
    # Where the block norms sit: "pre" (norm, sub-layer, residual add) or "post" (sub-layer, residual add, norm).
    norm_position: str = "pre"
    # How the family's classification head pools the final hidden states: "first" (CLS token), "eos" (last
    # end-of-sequence token), "mean" (all tokens), "patch_mean" (all but the first), "first+patch_mean" (both,
    # concatenated, DINOv2).
    pooling: str = "first"
    # T5: with tied embeddings the decoder output is multiplied by d_model ** -0.5 before the lm_head.
    rescales_tied_lm_head_input: bool = False
    # A buffer (relative to the top-level model) added to the lm_head's logits (BART's final_logits_bias).
    lm_logits_bias: str | None = None


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
_SWINV2_ROLES = _encoder_roles(
    "attention.self.", "query", "key", "value", "attention.output.dense", ("intermediate.dense",), "output.dense",
    "attention",
)
_GPT2_ROLES = {
    "attention": ("attn",),
    "qkv": ("attn.c_attn",),
    "attention_output": ("attn.c_proj",),
    "feed_forward": ("mlp",),
    "ffn_input": ("mlp.c_fc",),
    "ffn_output": ("mlp.c_proj",),
}
_LLAMA_ROLES = {
    **_encoder_roles("self_attn.", "q_proj", "k_proj", "v_proj", "self_attn.o_proj",
                     ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "self_attn"),
    "feed_forward": ("mlp",),
}

ARCHITECTURES: tuple[ArchitectureMap, ...] = (
    ArchitectureMap(
        family="t5", model_types=("t5", "mt5"), kind="encoder-decoder", lm_head="lm_head",
        rescales_tied_lm_head_input=True,
        lora_targets=("query", "value", "cross_query", "cross_value"),
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
        lora_targets=("query", "value", "cross_query", "cross_value"),
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
                          nested_blocks="blocks"),),
    ),
    ArchitectureMap(
        family="swinv2", model_types=("swinv2",), kind="encoder", modality="vision", pooling="mean",
        stacks=(StackSpec("encoder", "encoder.layers", "embeddings", _SWINV2_ROLES, final_norm="layernorm",
                          nested_blocks="blocks"),),
    ),
    ArchitectureMap(
        family="gpt2", model_types=("gpt2",), kind="decoder", lm_head="lm_head", lora_targets=("qkv",),
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
    """The map entry for ``model``, chosen by its config's ``model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise UnsupportedModelError(
        f"model type {model_type!r} ({type(model).__name__}) is not in leantune's architecture map; "
        f"supported families: {', '.join(supported_families())}; {CUSTOM_MAP_EXAMPLE}"
    )


def is_norm(module: nn.Module) -> bool:
    """True for LayerNorm and RMSNorm modules, including transformers' own classes (T5LayerNorm, LlamaRMSNorm)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
        return True
    name = type(module).__name__
    return name.endswith("LayerNorm") or name.endswith("RMSNorm")


@dataclass
class Block:
    """One transformer block of a stack, with its full dotted path from the top-level model."""

    stack: str
    index: int
    path: str
    module: nn.Module
    roles: dict[str, Paths]

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

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream at this block, read from the attention output projection."""
        _, proj = self.get("attention_output")
        weight = proj.weight
        return weight.shape[1] if type(proj).__name__ == "Conv1D" else weight.shape[0]


@dataclass
class Stack:
    """A resolved stack: its blocks, embeddings and norms as ``(full name, module)``."""

    spec: StackSpec
    blocks: list[Block]
    embeddings: tuple[str, nn.Module]
    final_norm: tuple[str, nn.Module] | None
    embedding_norm: tuple[str, nn.Module] | None
    config: object

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def hidden_size(self) -> int:
        return self.blocks[0].hidden_size

    @property
    def num_heads(self) -> int:
        heads = getattr(self.config, "num_attention_heads", None)
        if isinstance(heads, (list, tuple)):  # Swin: heads per stage
            return int(heads[0])
        if self.spec.name == "decoder" and hasattr(self.config, "num_decoder_heads"):
            return int(self.config.num_decoder_heads)
        return int(heads)


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
        lines = [f"family {self.family} ({self.arch.kind}, {self.arch.modality})"]
        for stack in self.stacks.values():
            lines.append(
                f"  {stack.name}: {len(stack.blocks)} blocks at {stack.blocks[0].path.rsplit('.', 1)[0]}, "
                f"hidden {stack.hidden_size}, heads {stack.num_heads}, embeddings {stack.embeddings[0]}"
            )
        return "\n".join(lines)


def resolve(model: nn.Module, arch: ArchitectureMap | None = None) -> Backbone:
    """Resolve the architecture map (the built-in one for the model's family, or ``arch``) against ``model``."""
    arch = arch or find_architecture(model)
    base = getattr(model, "base_model", model)
    base_prefix = next((n for n, m in model.named_modules() if m is base), "")
    backbone = Backbone(arch=arch, model=model, base_prefix=base_prefix)
    for spec in arch.stacks:
        container = _get_submodule(base, spec.blocks)
        if container is None:
            continue
        blocks_path = _join(base_prefix, spec.blocks)
        modules: list[tuple[str, nn.Module]] = []
        for i, child in enumerate(container):
            if spec.nested_blocks:
                nested = getattr(child, spec.nested_blocks)
                modules += [(f"{blocks_path}.{i}.{spec.nested_blocks}.{j}", b) for j, b in enumerate(nested)]
            else:
                modules.append((f"{blocks_path}.{i}", child))
        blocks = [Block(spec.name, i, path, module, spec.roles) for i, (path, module) in enumerate(modules)]
        for block in blocks:
            for role in REQUIRED_ROLES:
                block.get(role)
        config = model.config
        if spec.config_attr and hasattr(config, spec.config_attr):
            config = getattr(config, spec.config_attr)
        backbone.stacks[spec.name] = Stack(
            spec=spec,
            blocks=blocks,
            embeddings=_named(base, base_prefix, spec.embeddings, required=True),
            final_norm=_named(base, base_prefix, spec.final_norm),
            embedding_norm=_named(base, base_prefix, spec.embedding_norm),
            config=config,
        )
    if not backbone.stacks:
        raise UnsupportedModelError(
            f"{type(model).__name__} matched family {arch.family!r} but none of its stacks "
            f"({', '.join(s.blocks for s in arch.stacks)}) exist in the model; {CUSTOM_MAP_EXAMPLE}"
        )
    return backbone


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
