"""LAVISH on tiny random ViT, DINOv2, Swin and Swinv2 two-stream models: identity at init, what trains, the adapter
against a hand computation, the block placement and stage transitions against a per-stream reference, wiring,
save/load, and the Swinv2-Large parameter count."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers as hf
from tiny import make_model

import leantune
from leantune.config import ConfigError
from leantune.errors import UnsupportedMethodError
from leantune.methods.lavish import Lavish, LavishAdapter, LavishConfig, StreamShapeError
from leantune.methods.lavish.adapter import GroupedLinear, TokenBatchNorm
from leantune.methods.lavish.head import pool

SWIN_DEPTHS = [2, 2]  # two blocks per stage: a shifted window in each stage, one patch merging between them


def tiny_swin(family: str) -> torch.nn.Module:
    """A two-stage Swin or Swinv2 classifier (32 x 32 images, 8 x 8 then 4 x 4 tokens)."""
    torch.manual_seed(0)
    options = dict(image_size=32, patch_size=4, embed_dim=16, depths=SWIN_DEPTHS, num_heads=[2, 4], window_size=4,
                   num_labels=3)
    if family == "swin":
        return hf.SwinForImageClassification(hf.SwinConfig(**options))
    return hf.Swinv2ForImageClassification(hf.Swinv2Config(**options))


def build(family: str) -> torch.nn.Module:
    return tiny_swin(family) if family in ("swin", "swinv2") else make_model(family)


def stream_inputs(family: str, seed: int = 0, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames and spectrogram images; a ViT's spectrogram has another patch grid (2 x 3) than its frames (4 x 4)."""
    g = torch.Generator().manual_seed(seed)
    size = 32 if family.startswith("swin") else 28
    audio_shape = (size, size) if family.startswith("swin") else (14, 21)
    return torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, *audio_shape, generator=g)


def wrapped(family: str, base: torch.nn.Module | None = None, **options) -> leantune.TunedModel:
    return leantune.wrap(build(family) if base is None else base, LavishConfig(num_labels=5, **options))


def activate(tuned: leantune.TunedModel, seed: int = 0) -> None:
    """Non-zero gates and non-trivial BatchNorm statistics, so that every adapter changes its stream."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if name.endswith("gate"):
                param.copy_(torch.rand(param.shape, generator=g) + 0.5)
        for name, buffer in tuned.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=g) + 0.5)


def features(tuned: leantune.TunedModel, visual: torch.Tensor, audio: torch.Tensor):
    with torch.no_grad():
        return Lavish.features(tuned, visual, audio)


def backbone_features(base: torch.nn.Module, family: str, pixels: torch.Tensor) -> torch.Tensor:
    """The frozen backbone alone on one stream, pooled as LAVISH pools."""
    model = base.base_model
    size = model.config.image_size
    extra = {"interpolate_pos_encoding": True} if family == "vit" and pixels.shape[-1] != size else {}
    with torch.no_grad():
        states = model(pixel_values=pixels, **extra).last_hidden_state
    return pool(states, leantune.wrap(copy.deepcopy(base), LavishConfig()).backbone.arch.pooling)


# --- identity at init and what trains --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vit", "dinov2", "swin", "swinv2"])
def test_streams_equal_the_frozen_backbone_at_init(family: str) -> None:
    base = build(family).eval()
    tuned = wrapped(family, copy.deepcopy(base))
    visual, audio = stream_inputs(family)
    for mode in ("train", "eval"):  # BatchNorm with batch statistics too: the gates alone make the identity
        tuned.train(mode == "train")
        for module in tuned.modules():
            if "DropPath" in type(module).__name__:
                module.eval()  # Swinv2's stochastic depth on the frozen backbone is random in train mode
        got_visual, got_audio = features(tuned, visual, audio)
        # Swin stacks equal-sized streams: exactly equal; a ViT's padded, masked spectrogram stream: to rounding
        tolerance = 0.0 if family.startswith("swin") else 1e-6
        torch.testing.assert_close(got_visual, backbone_features(base, family, visual), rtol=0, atol=tolerance)
        torch.testing.assert_close(got_audio, backbone_features(base, family, audio), rtol=0, atol=tolerance)


@pytest.mark.parametrize("train_norms", [False, True])
def test_only_adapters_head_and_asked_norms_train(train_norms: bool) -> None:
    tuned = wrapped("swinv2", train_backbone_norms=train_norms)
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    lavish = {n for n, _ in tuned.named_parameters() if ".lavish." in n or n.startswith("method_modules.")}
    norms = {n for n, _ in tuned.named_parameters() if "layernorm" in n or ".norm." in n} - lavish
    assert lavish and norms and trainable == (lavish | norms if train_norms else lavish)
    assert not any(n.startswith("base_model.classifier") for n in trainable)  # the HF classifier is unused

    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    tuned.train()
    for step in range(3):
        visual, audio = stream_inputs("swinv2", seed=step)
        tuned(pixel_values=visual, audio_values=audio, labels=torch.tensor([1, 4])).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for name, param in tuned.named_parameters():
        if name in trainable:
            continue
        assert torch.equal(param, before[name]), f"frozen {name} changed"
        assert param.grad is None, f"frozen {name} holds a .grad"
    gates = [n for n in trainable if n.endswith("gate")]
    assert gates and all(not torch.equal(tuned.get_parameter(n), before[n]) for n in gates)


# --- the adapter -----------------------------------------------------------------------------------------------------
def test_latent_compression_shapes() -> None:
    adapter = LavishAdapter(8, LavishConfig(latent_tokens=3, reduction_factor=2), True, True, torch.empty(0))
    own, other = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    assert adapter.latents.shape == (3, 8) and adapter.compress(other).shape == (2, 3, 8)
    assert adapter(own, other).shape == own.shape
    assert adapter.down.weight.shape == (2, 4, 2) and adapter.up.weight.shape == (2, 2, 4)  # 2 groups


def test_grouped_projection_and_token_batch_norm_equal_the_papers_conv_and_batch_norm() -> None:
    x = torch.randn(3, 5, 8)
    grouped = GroupedLinear(8, 4, 2, x)
    conv = torch.nn.Conv1d(8, 4, 1, groups=2, bias=False)
    with torch.no_grad():  # conv weight (out, in/groups, 1); group g's outputs are rows [2g, 2g + 2)
        conv.weight.copy_(grouped.weight.transpose(1, 2).reshape(4, 4, 1))
    torch.testing.assert_close(grouped(x), conv(x.transpose(1, 2)).transpose(1, 2))
    ours, reference = TokenBatchNorm(8).train(), torch.nn.BatchNorm1d(8).train()
    torch.testing.assert_close(ours(x), reference(x.transpose(1, 2)).transpose(1, 2))
    torch.testing.assert_close(ours.running_var, reference.running_var)


def _softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * weight + bias


def test_adapter_output_matches_a_hand_computation() -> None:
    """d = 4, r = 2, G = 2, m = 2, one row: every step written out with numpy in float64, block-diagonal weights."""
    adapter = LavishAdapter(4, LavishConfig(reduction_factor=2, groups=2), True, True, torch.empty(0)).eval()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
    latents = rng.uniform(size=(2, 4))
    down, up = rng.normal(size=(2, 2)), rng.normal(size=(4, 1))  # per group: 2 inputs -> 1, 1 input -> 2
    ln = [(rng.normal(size=4), rng.normal(size=4)) for _ in range(2)]
    bn = [(rng.normal(size=n), rng.uniform(0.5, 2, size=n), rng.normal(size=n), rng.normal(size=n)) for n in (2, 4)]
    fusion_gate, gate = 0.7, -1.3
    with torch.no_grad():
        adapter.latents.copy_(torch.tensor(latents))
        adapter.fusion_gate.fill_(fusion_gate)
        adapter.gate.fill_(gate)
        adapter.down.weight.copy_(torch.tensor(down).reshape(2, 2, 1))  # (groups, inputs, outputs) per group
        adapter.up.weight.copy_(torch.tensor(up).reshape(2, 1, 2))
        for norm, (weight, bias) in zip((adapter.norm_before, adapter.norm_after), ln):
            norm.weight.copy_(torch.tensor(weight)), norm.bias.copy_(torch.tensor(bias))
        for norm, (mean, var, weight, bias) in zip((adapter.down_norm, adapter.up_norm), bn):
            norm.running_mean.copy_(torch.tensor(mean)), norm.running_var.copy_(torch.tensor(var))
            norm.weight.copy_(torch.tensor(weight)), norm.bias.copy_(torch.tensor(bias))
        got = adapter(torch.tensor(x, dtype=torch.float32)[None], torch.tensor(y, dtype=torch.float32)[None])[0]

    summary = latents + _softmax(latents @ y.T) @ y                       # S = L + softmax(L Y^T) Y
    fused = x + fusion_gate * _softmax(x @ summary.T) @ summary          # X' = X + g_av softmax(X S^T) S
    w_down = np.array([[down[0, 0], down[0, 1], 0, 0], [0, 0, down[1, 0], down[1, 1]]])
    w_up = np.array([[up[0, 0], 0], [up[1, 0], 0], [0, up[2, 0]], [0, up[3, 0]]])

    def batch_norm(z: np.ndarray, stats: tuple) -> np.ndarray:
        mean, var, weight, bias = stats
        return (z - mean) / np.sqrt(var + 1e-5) * weight + bias

    hidden = np.maximum(batch_norm(_layer_norm(fused, *ln[0]) @ w_down.T, bn[0]), 0)
    expected = gate * _layer_norm(batch_norm(hidden @ w_up.T, bn[1]), *ln[1])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_latent_init_and_plain_adapters() -> None:
    assert not wrapped("vit", latent_init="zeros").get_submodule(
        "base_model.vit.layers.0.lavish.visual_attention").latents.any()
    plain = wrapped("vit", cross_modal=False)
    assert not any("latents" in n or "fusion_gate" in n for n, _ in plain.named_parameters())
    ungated = wrapped("vit", audio_gate=False).get_submodule("base_model.vit.layers.1.lavish")
    assert ungated.audio_attention.gate is None and ungated.visual_attention.gate is not None


# --- placement, stage transitions and wiring -------------------------------------------------------------------------
FEED_FORWARD = {  # the frozen feed-forward residual branch of one block, and the module that reads its input
    "vit": (lambda b, y: b.mlp(b.layernorm_after(y)), "layernorm_after"),
    "swin": (lambda b, y: b.mlp(b.layernorm_after(y)), "layernorm_after"),
    "swinv2": (lambda b, y: b.layernorm_after(b.output(b.intermediate(y))), "intermediate"),
}


def _post_attention(block: torch.nn.Module, entry: str, x: torch.Tensor, *args) -> torch.Tensor:
    """``x + Attn(x)``: the input of the block's feed-forward sub-layer when the frozen block runs on ``x``."""
    seen = []
    handle = block.get_submodule(entry).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    block(x, *args)
    handle.remove()
    return seen[0]


def reference_features(base: torch.nn.Module, tuned: leantune.TunedModel, family: str, visual: torch.Tensor,
                       audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's block equations, each stream through its own copy of the frozen backbone (never stacked), stage by
    stage (the frozen patch merging applied to each stream), with the tuned model's adapters called directly."""
    model, tuned_model = base.base_model, tuned.base_model.base_model
    feed_forward, entry = FEED_FORWARD[family]
    swin = family.startswith("swin")
    stages = model.encoder.layers if swin else [model]
    tuned_stages = tuned_model.encoder.layers if swin else [tuned_model]
    streams = []
    for pixels in (visual, audio):
        extra = {"interpolate_pos_encoding": True} if not swin and pixels.shape[-1] != 28 else {}
        embedded = model.embeddings(pixels, **extra)
        streams.append(embedded if not swin else embedded[0])
    dims = model.embeddings(visual)[1] if swin else None
    with torch.no_grad():
        for stage, tuned_stage in zip(stages, tuned_stages):
            blocks = stage.blocks if swin else stage.layers
            for block, tuned_block in zip(blocks, tuned_stage.blocks if swin else tuned_stage.layers):
                lavish, (xv, xa), args = tuned_block.lavish, streams, (dims,) if swin else ()
                mid_v = _post_attention(block, entry, xv, *args) + lavish.visual_attention(xv, xa)
                mid_a = _post_attention(block, entry, xa, *args) + lavish.audio_attention(xa, xv)
                streams = [mid_v + feed_forward(block, mid_v) + lavish.visual_feed_forward(mid_v, mid_a),
                           mid_a + feed_forward(block, mid_a) + lavish.audio_feed_forward(mid_a, mid_v)]
            if swin and stage.downsample is not None:
                streams = [stage.downsample(s, dims) for s in streams]
                dims = ((dims[0] + 1) // 2, (dims[1] + 1) // 2)
        final = [model.layernorm(s) for s in streams]
    return tuple(pool(s, tuned.backbone.arch.pooling) for s in final)


@pytest.mark.parametrize("family", ["vit", "swin", "swinv2"])
def test_blocks_and_stage_transitions_match_a_per_stream_reference(family: str) -> None:
    base = build(family).eval()
    tuned = wrapped(family, copy.deepcopy(base)).eval()
    activate(tuned)
    visual, audio = stream_inputs(family, seed=3)
    got = features(tuned, visual, audio)
    expected = reference_features(base, tuned, family, visual, audio)
    assert not torch.allclose(got[0], backbone_features(base, family, visual), atol=1e-3)  # the adapters act
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_swin_stage_transitions_carry_both_streams() -> None:
    tuned = wrapped("swin").eval()
    seen = []
    for block in tuned.backbone.blocks():
        block.module.lavish.visual_feed_forward.register_forward_hook(lambda m, a, o: seen.append(("v", a[0].shape)))
        block.module.lavish.audio_feed_forward.register_forward_hook(lambda m, a, o: seen.append(("a", a[0].shape)))
    visual, audio = stream_inputs("swin")
    features(tuned, visual, audio)
    shapes = [(2, 64, 16)] * 2 + [(2, 16, 32)] * 2  # 8 x 8 tokens of width 16, merged to 4 x 4 of width 32
    assert seen == [(s, torch.Size(shape)) for shape in shapes for s in ("v", "a")]


@pytest.mark.parametrize("bidirectional,cross_modal,audio_reads,visual_reads", [
    (True, True, True, True), (False, True, False, True), (True, False, False, False)])
def test_cross_modal_wiring(bidirectional: bool, cross_modal: bool, audio_reads: bool, visual_reads: bool) -> None:
    tuned = wrapped("swin", bidirectional=bidirectional, cross_modal=cross_modal).eval()
    activate(tuned)
    visual, audio = stream_inputs("swin")
    other_visual, other_audio = stream_inputs("swin", seed=7)
    v0, a0 = features(tuned, visual, audio)
    v1, a1 = features(tuned, other_visual, audio)  # only the frames change
    v2, a2 = features(tuned, visual, other_audio)  # only the spectrograms change
    assert not torch.allclose(v0, v1) and not torch.allclose(a0, a2)
    assert (not torch.equal(a0, a1)) == audio_reads  # the audio stream depends on the frames
    assert (not torch.equal(v0, v2)) == visual_reads  # the visual stream depends on the spectrograms


def test_start_layer_skips_early_blocks() -> None:
    tuned = wrapped("swin", start_layer=2)
    assert [hasattr(b.module, "lavish") for b in tuned.backbone.blocks()] == [False, False, True, True]
    head_only = wrapped("swin", start_layer=4)  # the paper's baseline: frozen backbone, audio-visual head
    assert {n for n, p in head_only.named_parameters() if p.requires_grad} == {
        f"method_modules.{layer}.{kind}" for layer in ("fuse", "classifier") for kind in ("weight", "bias")}


# --- errors ----------------------------------------------------------------------------------------------------------
def test_refusals_name_what_is_wrong() -> None:
    with pytest.raises(UnsupportedMethodError, match="image transformer encoder"):
        leantune.wrap(make_model("bert"), LavishConfig())
    with pytest.raises(ConfigError, match="groups=3"):
        wrapped("vit", groups=3)
    with pytest.raises(ConfigError, match="start_layer=9"):
        wrapped("vit", start_layer=9)
    with pytest.raises(ConfigError, match="train_head"):
        LavishConfig(train_head=True)
    tuned = wrapped("swin")
    visual, _ = stream_inputs("swin")
    with pytest.raises(ConfigError, match="audio_values"):
        tuned(pixel_values=visual)
    with pytest.raises(StreamShapeError, match="same height and width"):
        tuned(pixel_values=visual, audio_values=visual[..., :24])
    with pytest.raises(StreamShapeError, match="called directly"):
        tuned.base_model(pixel_values=visual)


# --- save / load -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vit", "swinv2"])
def test_save_load_and_deepcopy_round_trip(family: str, tmp_path) -> None:
    torch.manual_seed(1)
    tuned = wrapped(family)
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    tuned.train()
    for step in range(2):
        visual, audio = stream_inputs(family, seed=step)
        tuned(pixel_values=visual, audio_values=audio, labels=torch.tensor([0, 3])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tuned.save_pretrained(tmp_path)
    restored = leantune.load(build(family), tmp_path).eval()
    twin = copy.deepcopy(tuned).eval()
    tuned.eval()
    delta = tuned.delta_state_dict()
    assert any(n.endswith("running_var") for n in delta) and set(restored.delta_state_dict()) == set(delta)
    visual, audio = stream_inputs(family, seed=9)
    with torch.no_grad():
        logits = tuned(pixel_values=visual, audio_values=audio).logits
        assert torch.equal(restored(pixel_values=visual, audio_values=audio).logits, logits)
        assert torch.equal(twin(pixel_values=visual, audio_values=audio).logits, logits)
        for name, param in twin.named_parameters():
            if name.endswith("gate"):
                param.zero_()
        assert not torch.equal(twin(pixel_values=visual, audio_values=audio).logits, logits)  # its own adapters
        assert torch.equal(tuned(pixel_values=visual, audio_values=audio).logits, logits)


# --- the paper's parameter count -------------------------------------------------------------------------------------
def adapter_parameters(width: int, config: LavishConfig) -> int:
    """The note's count per adapter: latents, 2 gates, 2 grouped 1x1 projections, 2 BatchNorms, 2 LayerNorms."""
    bottleneck = width // config.reduction_factor
    return (config.latent_tokens * width + 2 + 2 * width * bottleneck // config.groups
            + 2 * bottleneck + 2 * width + 2 * width + 2 * width)


def test_swinv2_large_ave_configuration_has_the_papers_trainable_count() -> None:
    """Swinv2-Large (window 12, 192 px), r=8, G=2, m=2, BatchNorm and both LayerNorms, the AVE head: ~10.1M."""
    widths, depths = [192, 384, 768, 1536], [2, 2, 18, 2]
    config = hf.Swinv2Config(image_size=192, patch_size=4, embed_dim=192, depths=depths, num_heads=[6, 12, 24, 48],
                             window_size=12)
    with torch.device("meta"):
        model = hf.Swinv2Model(config)
    lavish = LavishConfig(num_labels=29)
    tuned = leantune.wrap(model, lavish)
    trainable, _ = tuned.trainable_parameter_count()
    adapters = sum(4 * depth * adapter_parameters(width, lavish) for width, depth in zip(widths, depths))
    head = 2 * 1536 * 512 + 512 + 512 * 29 + 29
    assert trainable == adapters + head
    assert abs(trainable - 10.1e6) / 10.1e6 < 0.015
