"""The architecture map v2: family facts, stages, where sub-layers join the residual stream, and inference of a
map for transformers families the map does not list (DistilBERT, DeiT, OPT)."""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
import transformers as hf
from tiny import VOCAB, assert_only_trainable_parameters_change, make_inputs, make_model
from torch import nn

import leantune
from leantune.backbones import (
    ARCHITECTURES,
    ATTENTION_SCALES,
    NORM_POSITIONS,
    SUBLAYERS,
    ArchitectureMap,
    Backbone,
    Block,
    StackSpec,
    find_architecture,
    infer_architecture,
    resolve,
    supported_families,
)
from leantune.errors import UnsupportedModelError

# --- tiny models of families the map does not list ---------------------------------------------------------------
UNMAPPED = {
    "distilbert": lambda: hf.DistilBertForSequenceClassification(hf.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, num_labels=3)),
    "deit": lambda: hf.DeiTForImageClassification(hf.DeiTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=28,
        patch_size=7, num_labels=3)),
    "opt": lambda: hf.OPTForCausalLM(hf.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
        max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=0, eos_token_id=2)),
}
TEXT_UNMAPPED = ("distilbert", "opt")


def unmapped(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return UNMAPPED[family]()


def unmapped_inputs(family: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if family == "deit":
        pixels = torch.randn(2, 3, 28, 28, generator=g)
        return {"pixel_values": pixels, "labels": torch.randint(0, 3, (2,), generator=g)}
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    if family == "opt":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (2,), generator=g)}


def any_model(family: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    if family in UNMAPPED:
        return unmapped(family), unmapped_inputs(family)
    return make_model(family), make_inputs(family)


# --- facts ---------------------------------------------------------------------------------------------------------
def test_method_facts_left_the_map_and_family_facts_are_fields() -> None:
    fields = {f.name for f in dataclasses.fields(ArchitectureMap)}
    assert "lora_targets" not in fields
    assert {"attention_scale", "norm_position", "pooling", "rescales_tied_lm_head_input", "lm_logits_bias"} <= fields
    scales = {arch.family: arch.attention_scale for arch in ARCHITECTURES}
    assert scales.pop("t5") == "none" and set(scales.values()) == {"inverse_sqrt"}
    assert all(arch.norm_position in NORM_POSITIONS and arch.attention_scale in ATTENTION_SCALES
               for arch in ARCHITECTURES)
    assert {a.family: a.norm_position for a in ARCHITECTURES if a.norm_position != "pre"} == {
        "bart": "post", "bert": "post", "deberta-v2": "post", "swinv2": "res-post"}


@pytest.mark.parametrize("family,scale", [("t5", "none"), ("bert", "inverse_sqrt"), ("llama", "inverse_sqrt")])
def test_attention_scale_agrees_with_the_attention_modules(family: str, scale: str) -> None:
    """The map's fact and the one inference reads from the module's own ``scaling`` agree."""
    model = make_model(family)
    assert find_architecture(model).attention_scale == infer_architecture(model).attention_scale == scale


# --- stages --------------------------------------------------------------------------------------------------------
SWIN_CONFIG = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=4,
                   num_labels=3)


@pytest.mark.parametrize("family,build", [
    ("swin", lambda: hf.SwinForImageClassification(hf.SwinConfig(**SWIN_CONFIG))),
    ("swinv2", lambda: hf.Swinv2ForImageClassification(hf.Swinv2Config(**SWIN_CONFIG))),
])
def test_hierarchical_stack_records_its_stages(family: str, build) -> None:
    model = build().eval()
    stack = resolve(model).stacks["encoder"]
    layers = f"{family}.encoder.layers"
    assert [(s.index, s.hidden_size, s.num_heads, s.depth) for s in stack.stages] == [(0, 16, 2, 2), (1, 32, 4, 1)]
    assert stack.blocks == [b for s in stack.stages for b in s.blocks]
    assert [(b.index, b.stage, b.hidden_size) for b in stack.blocks] == [(0, 0, 16), (1, 0, 16), (2, 1, 32)]
    assert [b.path for b in stack.blocks] == [f"{layers}.0.blocks.0", f"{layers}.0.blocks.1", f"{layers}.1.blocks.0"]
    name, downsample = stack.stages[0].downsample
    assert name == f"{layers}.0.downsample" and downsample is model.get_submodule(name)
    assert "PatchMerging" in type(downsample).__name__ and stack.stages[1].downsample is None
    assert stack.hidden_size == 16 and stack.num_heads == 2

    calls = []  # the downsampling runs after the stage's last block, before the next stage's first block
    for path, module in [(b.path, b.module) for b in stack.blocks] + [(name, downsample)]:
        module.register_forward_hook(lambda _m, _a, _o, path=path: calls.append(path))
    with torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 32, 32))
    assert calls == [stack.blocks[0].path, stack.blocks[1].path, name, stack.blocks[2].path]


def test_flat_stack_is_one_stage() -> None:
    stack = resolve(make_model("bert")).stacks["encoder"]
    (stage,) = stack.stages
    assert stage.blocks == stack.blocks and stage.depth == 2 and stage.downsample is None
    assert (stage.index, stage.hidden_size, stage.num_heads) == (0, 32, 4)
    assert all(block.stage == 0 for block in stack.blocks)


# --- sub-layer outputs ---------------------------------------------------------------------------------------------
def residual_join(backbone: Backbone, block: Block, sublayer: str) -> tuple[nn.Module, bool]:
    """Where ``sublayer``'s output has just joined the residual stream: (module, True) = that module's input,
    (module, False) = its output. Post-norm: the sub-layer's own norm; pre-norm: the next sub-layer's norm, or
    the block output after the last sub-layer."""
    if backbone.arch.norm_position in ("post", "res-post"):
        return block.sublayer_norm(sublayer)[1], True
    present = [s for s in SUBLAYERS if block.sublayer_output(s) is not None]
    following = present[present.index(sublayer) + 1:]
    if following:
        return block.sublayer_norm(following[0])[1], True
    return block.module, False


def delta_at_join(model: nn.Module, inputs: dict, backbone: Backbone, block: Block, sublayer: str,
                  c: torch.Tensor) -> torch.Tensor:
    """How the residual stream right after ``sublayer`` changes when ``c`` is added to its output projection."""
    where, as_input = residual_join(backbone, block, sublayer)
    seen = []
    if as_input:
        grab = where.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    else:
        grab = where.register_forward_hook(
            lambda _m, _a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone()))
    for add in (False, True):
        handle = block.sublayer_output(sublayer)[1].register_forward_hook(lambda _m, _a, out: out + c) if add else None
        torch.manual_seed(7)
        with torch.no_grad():
            model(**inputs)
        if handle is not None:
            handle.remove()
    grab.remove()
    assert len(seen) == 2, f"{where.__class__.__name__} ran {len(seen)} times"
    return seen[1] - seen[0]


def sublayer_cases(backbone: Backbone) -> list[tuple[Block, str]]:
    return [(stack.blocks[0], s) for stack in backbone.stacks.values() for s in SUBLAYERS
            if stack.blocks[0].sublayer_output(s) is not None]


JOIN_FAMILIES = ("t5", "bart", "bert", "vit", "dinov2", "clip", "swin", "swinv2", "gpt2", "llama", *UNMAPPED)


@pytest.mark.parametrize("family", JOIN_FAMILIES)
def test_sublayer_output_joins_the_residual_stream_unchanged(family: str) -> None:
    """Adding c to the projection adds exactly c (times the layer scale) to the residual stream: nothing else
    (no norm, no other projection) sits between the recorded output and the residual add."""
    model, inputs = any_model(family)
    model.eval()
    backbone = resolve(model)
    cases = sublayer_cases(backbone)
    assert {s for _, s in cases} >= {"attention", "feed_forward"}
    for block, sublayer in cases:
        scale = block.sublayer_scale(sublayer)
        if scale is not None:  # DINOv2: make the layer scale differ from one so the check can see it
            with torch.no_grad():
                for p in scale[1].parameters():
                    p.uniform_(0.5, 1.5)
        c = torch.linspace(0.5, 1.5, block.hidden_size)
        expected = c if scale is None else scale[1](c)
        delta = delta_at_join(model, inputs, backbone, block, sublayer, c)
        torch.testing.assert_close(delta, expected.expand_as(delta), rtol=0, atol=2e-5,
                                   msg=f"{family} {block.path} {sublayer}")
    assert any(block.sublayer_scale(s) is not None for block, s in cases) == (family == "dinov2")


def with_dropout(model: nn.Module, p: float) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(getattr(module, "dropout", None), float):  # BART: functional dropout with a float rate
            module.dropout = p
    return model


@pytest.mark.parametrize("family", ["t5", "bart", "bert", "gpt2"])
def test_sublayer_output_is_taken_before_dropout(family: str) -> None:
    """In training mode with dropout 0.5 the added c is dropped or doubled element by element: the hook sits
    before the sub-layer's dropout (after it, the residual stream would change by exactly c)."""
    model, inputs = any_model(family)
    model = with_dropout(model, 0.5).train()
    backbone = resolve(model)
    for block, sublayer in sublayer_cases(backbone):
        c = torch.linspace(0.5, 1.5, block.hidden_size)
        ratio = delta_at_join(model, inputs, backbone, block, sublayer, c) / c
        dropped, kept = ratio.abs() < 1e-4, (ratio - 2).abs() < 1e-4
        assert torch.all(dropped | kept) and dropped.any() and kept.any(), f"{family} {block.path} {sublayer}"


def test_sublayer_api() -> None:
    backbone = resolve(make_model("t5"))
    decoder_block = backbone.stacks["decoder"].blocks[0]
    assert decoder_block.sublayer_output("cross_attention")[0] == "decoder.block.0.layer.1.EncDecAttention.o"
    assert backbone.stacks["encoder"].blocks[0].sublayer_output("cross_attention") is None
    assert [n for n, _ in backbone.sublayer_outputs("feed_forward")] == [
        f"{s}.block.{i}.layer.{2 if s == 'decoder' else 1}.DenseReluDense.wo" for s in ("encoder", "decoder")
        for i in range(2)]
    with pytest.raises(ValueError, match="unknown sub-layer 'mlp'"):
        decoder_block.sublayer_output("mlp")


# --- inference -----------------------------------------------------------------------------------------------------
EXPECTED = {
    "distilbert": dict(
        kind="encoder", modality="text", norm_position="post", pooling="first", lm_head=None,
        stacks=[("encoder", "transformer.layer", "embeddings", None, {
            "attention": ("attention",), "query": ("attention.q_lin",), "key": ("attention.k_lin",),
            "value": ("attention.v_lin",), "attention_output": ("attention.out_lin",), "feed_forward": ("ffn",),
            "ffn_input": ("ffn.lin1",), "ffn_output": ("ffn.lin2",), "activation": ("ffn.activation",),
            "attention_norm": ("sa_layer_norm",), "ffn_norm": ("output_layer_norm",)})]),
    "deit": dict(
        kind="encoder", modality="vision", norm_position="pre", pooling="first", lm_head=None,
        stacks=[("encoder", "layers", "embeddings", "layernorm", {
            "attention": ("attention",), "query": ("attention.q_proj",), "key": ("attention.k_proj",),
            "value": ("attention.v_proj",), "attention_output": ("attention.o_proj",), "feed_forward": ("mlp",),
            "ffn_input": ("mlp.fc1",), "ffn_output": ("mlp.fc2",), "activation": ("mlp.activation_fn",),
            "attention_norm": ("layernorm_before",), "ffn_norm": ("layernorm_after",)})]),
    "opt": dict(
        kind="decoder", modality="text", norm_position="pre", pooling="eos", lm_head="lm_head",
        stacks=[("decoder", "decoder.layers", "decoder.embed_tokens", "decoder.final_layer_norm", {
            "attention": ("self_attn",), "query": ("self_attn.q_proj",), "key": ("self_attn.k_proj",),
            "value": ("self_attn.v_proj",), "attention_output": ("self_attn.out_proj",), "ffn_input": ("fc1",),
            "ffn_output": ("fc2",), "activation": ("activation_fn",), "attention_norm": ("self_attn_layer_norm",),
            "ffn_norm": ("final_layer_norm",)})]),
}


@pytest.mark.parametrize("family", UNMAPPED)
def test_inferred_roles_match_the_real_module_names(family: str) -> None:
    model = unmapped(family)
    assert family not in supported_families()
    arch = infer_architecture(model)
    expected = EXPECTED[family]
    assert arch.inferred and arch.family == family and arch.attention_scale == "inverse_sqrt"
    assert {k: getattr(arch, k) for k in ("kind", "modality", "norm_position", "pooling", "lm_head")} == {
        k: v for k, v in expected.items() if k != "stacks"}
    assert [(s.name, s.blocks, s.embeddings, s.final_norm, s.roles) for s in arch.stacks] == expected["stacks"]
    backbone = resolve(model, arch)
    for block in backbone.blocks():  # every block has every role, and the names are real modules
        for role in arch.stacks[0].roles:
            assert len(block.find(role)) == len(arch.stacks[0].roles[role])
    assert backbone.stacks[arch.stacks[0].name].num_heads == 4


def test_inference_handles_an_encoder_decoder_and_a_hierarchical_backbone() -> None:
    marian = infer_architecture(hf.MarianMTModel(hf.MarianConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=1, decoder_start_token_id=1)))
    assert marian.kind == "encoder-decoder" and marian.norm_position == "post"
    assert [(s.name, s.blocks) for s in marian.stacks] == [("encoder", "encoder.layers"),
                                                           ("decoder", "decoder.layers")]
    decoder_roles = marian.stacks[1].roles
    assert decoder_roles["cross_query"] == ("encoder_attn.q_proj",)
    assert decoder_roles["cross_attention_output"] == ("encoder_attn.out_proj",)
    assert decoder_roles["cross_attention_norm"] == ("encoder_attn_layer_norm",)
    assert marian.lm_logits_bias == "final_logits_bias" and "cross_attention" not in marian.stacks[0].roles

    swin = make_model("swin")
    inferred, mapped = infer_architecture(swin).stacks[0], find_architecture(swin).stacks[0]
    assert (inferred.blocks, inferred.nested_blocks, inferred.downsample, inferred.final_norm) == (
        mapped.blocks, mapped.nested_blocks, mapped.downsample, mapped.final_norm)
    assert all(inferred.roles[r] == mapped.roles[r] for r in ("query", "attention_output", "ffn_input", "ffn_output"))


def test_inference_logs_one_line(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="leantune.backbones"):
        resolve(make_model("bert"))
        assert not caplog.records
        resolve(unmapped("opt"))
    (record,) = caplog.records
    message = record.getMessage()
    assert record.name == "leantune.backbones" and "\n" not in message
    assert "model type 'opt'" in message and "inferred" in message and "'model.decoder.layers'" in message


def test_custom_map_wins_over_inference(caplog) -> None:
    custom = ArchitectureMap(family="mine", model_types=("distilbert",), kind="encoder", stacks=(
        StackSpec("encoder", "transformer.layer", "embeddings", {
            "attention": ("attention",), "attention_output": ("attention.out_lin",), "ffn_output": ("ffn.lin2",)}),))
    with caplog.at_level(logging.WARNING, logger="leantune.backbones"):
        tuned = leantune.wrap(unmapped("distilbert"), leantune.make_config("adapter"), architecture=custom)
    assert tuned.backbone.arch is custom and not caplog.records


BASELINES = ("full", "bitfit", "layernorm", "lora", "adapter", "prompt")
CASES = [(m, f) for f in UNMAPPED for m in BASELINES if m != "prompt" or f in TEXT_UNMAPPED]


def train_two_steps(tuned: leantune.TunedModel, family: str) -> None:
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    tuned.train()
    for step in range(2):
        tuned(**unmapped_inputs(family, seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("method,family", CASES)
def test_baseline_on_inferred_family_trains_only_its_parameters(method: str, family: str) -> None:
    tuned = leantune.wrap(unmapped(family), leantune.make_config(method))
    assert tuned.backbone.arch.inferred
    assert_only_trainable_parameters_change(tuned, lambda: train_two_steps(tuned, family))


@pytest.mark.parametrize("method,family", [c for c in CASES if c[0] in ("bitfit", "layernorm", "lora", "adapter")])
def test_baseline_on_inferred_family_is_identity_at_init(method: str, family: str) -> None:
    base = unmapped(family).eval()
    tuned = leantune.wrap(copy.deepcopy(base), leantune.make_config(method)).eval()
    inputs = unmapped_inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(tuned(**inputs).logits, base(**inputs).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,family", CASES)
def test_baseline_on_inferred_family_round_trips(method: str, family: str, tmp_path) -> None:
    torch.manual_seed(3)
    tuned = leantune.wrap(unmapped(family), leantune.make_config(method))
    train_two_steps(tuned, family)
    tuned.save_pretrained(tmp_path)
    restored = leantune.load(unmapped(family), tmp_path)
    assert set(restored.delta_state_dict()) == set(tuned.delta_state_dict())
    inputs = unmapped_inputs(family, seed=9)
    tuned.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(**inputs).logits, tuned(**inputs).logits)


# --- what inference refuses ----------------------------------------------------------------------------------------
class ToyConfig:
    model_type = "toy"

    def to_dict(self) -> dict:
        return {}


class ToyAttention(nn.Module):
    def __init__(self, output: bool = True) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        if output:
            self.o_proj = nn.Linear(8, 8)


class ToyBlock(nn.Module):
    def __init__(self, attention: bool = True, output: bool = True) -> None:
        super().__init__()
        if attention:
            self.self_attn = ToyAttention(output)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)


class Toy(nn.Module):
    def __init__(self, **lists: nn.Module) -> None:
        super().__init__()
        self.config = ToyConfig()
        self.embed_tokens = nn.Embedding(10, 8)
        for name, module in lists.items():
            self.add_module(name, module)


@pytest.mark.parametrize("toy,message", [
    (lambda: Toy(mlp=nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))),
     r"no repeated block list \(an nn.ModuleList of same-class modules\) found"),
    (lambda: Toy(layers=nn.ModuleList(ToyBlock(attention=False) for _ in range(2))),
     r"no query/key/value projections \(.*\) found in block 'layers.0'"),
    (lambda: Toy(layers=nn.ModuleList(ToyBlock(output=False) for _ in range(2))),
     r"no attention output projection \(.*\) found in 'layers.0.self_attn'"),
    (lambda: Toy(a=nn.ModuleList(ToyBlock() for _ in range(2)), b=nn.ModuleList(ToyBlock() for _ in range(2))),
     r"ambiguous: block lists 'a', 'b' are equally long"),
])
def test_incomplete_or_ambiguous_structure_is_refused_by_name(toy, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message) as info:
        leantune.wrap(toy(), leantune.make_config("adapter"))
    text = str(info.value)
    assert "model type 'toy'" in text and "architecture=" in text and "supported families: t5" in text
