"""Ladder side-tuning: paper parameter counts, side shapes, gates, freezing, memory kept for backward, layer
dropping, Fisher-pruned initialisation, save/load, generation with the side cache."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as hf
from tiny import main_output, make_inputs, make_model
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

import leantune
from leantune.errors import ConfigError, UnsupportedMethodError
from leantune.methods.lst import LadderSideTuning
from leantune.methods.lst.generation import cache_argument

FAMILIES = ("t5", "bart", "bert", "vit")
R = 4  # tiny models: d 32 -> 8, d_kv 8 -> 2, d_ff 64 -> 16


def clip_classifier(seed: int = 0) -> hf.CLIPForImageClassification:
    """CLIP's vision tower with an image-classification head (the tiny CLIPModel has no task head)."""
    torch.manual_seed(seed)
    return hf.CLIPForImageClassification(hf.CLIPConfig(
        text_config=dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           image_size=28, patch_size=7),
        num_labels=3))


def model_of(family: str, seed: int = 0) -> torch.nn.Module:
    return clip_classifier(seed) if family == "clip-vision" else make_model(family, seed)


def inputs_of(family: str, **kwargs) -> dict:
    return make_inputs("vit" if family == "clip-vision" else family, **kwargs)


def lst(family: str, seed: int = 0, data_seed: int = 0, **options) -> leantune.TunedModel:
    options.setdefault("reduction_factor", R)
    options.setdefault("init", "random")
    data = None
    if options["init"] == "fisher":
        options.setdefault("fisher_samples", 6)
        options.setdefault("fisher_fraction", 1.0)
        data = [inputs_of(family, batch=3, seed=data_seed + s) for s in range(2)]
    return leantune.wrap(model_of(family, seed), leantune.make_config("lst", **options), data=data)


def train_steps(tuned: leantune.TunedModel, family: str, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    tuned.train()
    for step in range(steps):
        tuned(**inputs_of(family, seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("side_layers,expected", [([1, 2, 3, 5, 6, 7, 9, 10, 11], 3_878_712), (None, 5_097_240)])
def test_paper_parameter_counts_t5_base(side_layers, expected) -> None:
    config = hf.T5Config(d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64, vocab_size=32128)
    with torch.device("meta"):
        model = hf.T5ForConditionalGeneration(config)
    tuned = leantune.wrap(model, leantune.make_config("lst", init="random", side_layers=side_layers))
    trainable, _ = tuned.trainable_parameter_count()
    assert trainable == expected
    assert all(n.startswith("method_modules.") for n, p in tuned.named_parameters() if p.requires_grad)
    # the paper's denominator (t5-base counted with its 32,100-token tokenizer vocabulary)
    assert round(100 * trainable / 222_882_048, 2) == {3_878_712: 1.74, 5_097_240: 2.29}[expected]


@pytest.mark.parametrize("family", FAMILIES)
def test_side_shapes_and_gates(family: str) -> None:
    tuned = lst(family)
    for name, side in tuned.method_modules.stacks.items():
        stack = tuned.backbone.stacks[name]
        d, heads = stack.hidden_size, stack.num_heads
        assert sorted(side.blocks) == sorted(side.downsamples) == [str(i) for i in range(len(stack.blocks))]
        assert side.first_downsample.weight.shape == (d // R, d)
        assert side.gates.shape == (len(stack.blocks),)
        torch.testing.assert_close(side.gate_values(), torch.full((len(stack.blocks),), 0.5))
        for block in side.blocks.values():
            assert block.attention.heads == heads and block.attention.d_kv == d // heads // R
            assert block.attention.scale == (1.0 if family == "t5" else None)  # T5's attention is unscaled
            assert block.attention.query.weight.shape == (d // R, d // R)
            assert block.ffn_input[0].weight.shape == (64 // R, d // R)
            assert block.ffn_output.weight.shape == (d // R, 64 // R)
            assert (block.cross_attention is not None) == (name == "decoder")
    if tuned.backbone.arch.kind == "encoder-decoder":
        assert tuned.method_modules.upsample.weight.shape == (32, 32 // R)
    else:
        assert tuned.method_modules.head.weight.shape == (3, 32 // R)
        assert not any(p.requires_grad for _, head in tuned.backbone.task_heads() for p in head.parameters())


@pytest.mark.parametrize("family", FAMILIES + ("dinov2", "clip-vision"))
def test_backbone_gets_no_gradient_and_stays_bitwise_unchanged(family: str) -> None:
    tuned = lst(family)
    before = {n: p.detach().clone() for n, p in tuned.base_model.named_parameters()}
    side_before = {n: p.detach().clone() for n, p in tuned.method_modules.named_parameters()}
    train_steps(tuned, family)
    for name, param in tuned.base_model.named_parameters():
        assert not param.requires_grad and param.grad is None, name
        assert torch.equal(param, before[name]), f"backbone {name} changed"
    changed = [n for n, p in tuned.method_modules.named_parameters() if not torch.equal(p, side_before[n])]
    assert any(".blocks." in n for n in changed) and any("downsample" in n for n in changed)


def saved_bytes(tuned: leantune.TunedModel, inputs: dict) -> tuple[int, list[torch.Tensor]]:
    """Bytes autograd keeps for backward during one forward (parameters excluded, shared storage counted once)."""
    params = {p.data_ptr() for p in tuned.parameters()}
    saved: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = tensor
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tuned(**inputs).loss.backward()
    return sum(t.untyped_storage().nbytes() for t in saved.values()), list(saved.values())


def medium_t5() -> hf.T5ForConditionalGeneration:
    torch.manual_seed(0)
    return hf.T5ForConditionalGeneration(hf.T5Config(
        vocab_size=96, d_model=256, d_ff=1024, num_layers=4, num_heads=4, d_kv=64, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1, dropout_rate=0.0))


@pytest.mark.parametrize("backbone_dtype", ["float32", "bfloat16"])
def test_saved_for_backward_is_ladders_plus_side_activations(backbone_dtype: str) -> None:
    batch, source, target, r, layers = 4, 48, 6, 8, [1, 3]
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(2, 96, (batch, source), generator=g),
              "labels": torch.randint(2, 96, (batch, target), generator=g)}
    tuned = leantune.wrap(medium_t5(), leantune.make_config(
        "lst", init="random", reduction_factor=r, side_layers=layers, backbone_dtype=backbone_dtype))
    lst_bytes, tensors = saved_bytes(tuned.train(), inputs)
    lora_bytes, _ = saved_bytes(leantune.wrap(medium_t5(), leantune.make_config("lora", r=8)).train(), inputs)

    d, heads, d_ff, vocab = 256, 4, 1024, 96
    width = 2 if backbone_dtype == "bfloat16" else 4
    ladders = (len(layers) + 1) * batch * (source + target) * d * width
    if backbone_dtype == "bfloat16":  # what autograd keeps in the backbone's dtype is exactly the ladders
        kept_in_bf16 = [t for t in tensors if t.dtype == torch.bfloat16]
        assert len(kept_in_bf16) == 2 * (len(layers) + 1)
        assert sum(t.numel() * width for t in kept_in_bf16) == ladders
    # side activations: a generous 24 side-width tensors per layer and sub-layer, the attention bias maps,
    # the up-projection output and three logits-sized tensors (log-softmax, cross-entropy)
    per_token = 24 * max(d_ff, d) // r * 4
    side = 3 * len(layers) * batch * (source + target) * per_token
    attention = 3 * len(layers) * batch * heads * (source + target) ** 2 * 4
    head = batch * target * (d + 3 * vocab) * 4
    assert lst_bytes <= ladders + side + attention + head
    assert lst_bytes < lora_bytes / 3, (lst_bytes, lora_bytes)


@pytest.mark.parametrize("family", ["t5", "bert"])
def test_layer_dropping_removes_side_layers_and_ladders(family: str) -> None:
    full, dropped = lst(family), lst(family, side_layers=[1])
    removed = 0
    for name, side in dropped.method_modules.stacks.items():
        assert list(side.blocks) == ["1"] and list(side.downsamples) == ["1"]
        assert side.gates.shape == (2,)  # one gate per backbone layer, as the paper counts
        full_side = full.method_modules.stacks[name]
        removed += sum(p.numel() for m in (full_side.blocks["0"], full_side.downsamples["0"]) for p in m.parameters())
    assert full.trainable_parameter_count()[0] - dropped.trainable_parameter_count()[0] == removed
    # the side network receives only the embedding ladder (-1) and the kept layer's ladder
    received = []
    for side in dropped.method_modules.stacks.values():
        side.register_forward_pre_hook(lambda module, args: received.append(sorted(args[0])))
    dropped(**make_inputs(family))
    assert received and all(keys == [-1, 1] for keys in received)


@pytest.mark.parametrize("family,variant", [(f, "head_aligned") for f in ("t5", "bart", "bert", "vit", "dinov2",
                                                                          "clip-vision")]
                         + [("t5", "rows"), ("bert", "rows")])
def test_fisher_init_copies_selected_rows(family: str, variant: str) -> None:
    tuned = lst(family, init="fisher", fisher_pruning=variant)
    selections = tuned.method.pruning
    for name, side in tuned.method_modules.stacks.items():
        stack = tuned.backbone.stacks[name]
        d_kv = stack.hidden_size // stack.num_heads
        for i, block in enumerate(stack.blocks):
            chosen, side_block = selections[name][i], side.blocks[str(i)]
            prefixes = ["", "cross_"] if name == "decoder" else [""]
            for prefix in prefixes:
                attention = side_block.attention if not prefix else side_block.cross_attention
                rows_q, _ = chosen[prefix + "query"]
                assert torch.equal(rows_q, chosen[prefix + "key"][0])
                assert torch.equal(rows_q, chosen[prefix + "value"][0])
                per_head = torch.bincount(rows_q // d_kv, minlength=stack.num_heads)
                if variant == "head_aligned":
                    assert torch.all(per_head == d_kv // R)
                for role, target in (("query", attention.query), ("value", attention.value),
                                     ("attention_output", attention.output)):
                    rows, columns = chosen[prefix + role]
                    source = block.get(prefix + role)[1]
                    torch.testing.assert_close(target.weight, source.weight[rows][:, columns], rtol=0, atol=0)
                    if target.bias is not None:
                        torch.testing.assert_close(target.bias, source.bias[rows], rtol=0, atol=0)
            rows, columns = chosen["ffn_input"]
            assert len(rows) == 64 // R and len(columns) == 32 // R
            ffn_input = block.get("ffn_input")[1].weight
            torch.testing.assert_close(side_block.ffn_input[0].weight, ffn_input[rows][:, columns], rtol=0, atol=0)
            norm = block.get("ffn_norm")[1]
            torch.testing.assert_close(side_block.ffn_norm.weight, norm.weight[chosen["ffn_norm"]], rtol=0, atol=0)
            if i > 0:  # indices carried through: this block reads the dims the previous block's output kept
                assert torch.equal(chosen["query"][1], selections[name][i - 1]["ffn_output"][0])
        if stack.final_norm is not None:
            final = stack.final_norm[1].weight[selections[f"{name}.final"]]
            torch.testing.assert_close(side.final_norm.weight, final, rtol=0, atol=0)


def test_fisher_rows_follow_importance() -> None:
    """The kept feed-forward rows are the top rows by L1 norm of an independently computed empirical Fisher."""
    family = "bert"
    data = [make_inputs(family, batch=3, seed=s) for s in range(2)]
    base = make_model(family)
    weight = base.get_submodule(
        leantune.wrap(copy.deepcopy(base), leantune.make_config("lst", init="random")).backbone.stacks["encoder"]
        .blocks[1].get("ffn_output")[0]).weight
    weight.requires_grad_(True)
    fisher = torch.zeros_like(weight)
    base.eval()
    for batch in data:
        for j in range(3):
            loss = base(**{k: v[j:j + 1] for k, v in batch.items()}).loss
            fisher += torch.autograd.grad(loss, weight)[0] ** 2
    tuned = leantune.wrap(make_model(family), leantune.make_config(
        "lst", init="fisher", reduction_factor=R, fisher_samples=6, fisher_fraction=1.0), data=data)
    rows, columns = tuned.method.pruning["encoder"][1]["ffn_output"]
    expected = fisher[:, columns].sum(1).topk(32 // R).indices.sort().values
    assert torch.equal(rows, expected)


def test_fisher_without_data_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"data=.*init='random'"):
        leantune.wrap(make_model("t5"), leantune.make_config("lst"))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family: str, tmp_path) -> None:
    torch.manual_seed(3)
    tuned = lst(family, init="fisher")
    train_steps(tuned, family, steps=2)
    tuned.save_pretrained(tmp_path)
    restored = leantune.load(make_model(family), tmp_path)  # no data: the Fisher init is skipped on load
    assert set(restored.delta_state_dict()) == set(tuned.delta_state_dict())
    assert all(k.startswith("method_modules.") for k in restored.delta_state_dict())
    inputs = make_inputs(family, seed=9)
    tuned.eval(), restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(main_output(restored(**inputs)), main_output(tuned(**inputs)), rtol=0, atol=0)


@pytest.mark.parametrize("family, options", [("t5", {}), ("bart", {}), ("t5", {"ladder_norm": True})])
def test_generate_same_tokens_with_and_without_side_cache(family: str, options: dict) -> None:
    torch.manual_seed(0)
    tuned = lst(family, init="fisher", **options)
    train_steps(tuned, family, steps=2)
    tuned.eval()
    inputs = make_inputs(family, batch=3)
    inputs.pop("labels")
    greedy = tuned.generate(**inputs, max_new_tokens=6)
    assert torch.equal(greedy, tuned.generate(**inputs, max_new_tokens=6, use_cache=False))
    # teacher forcing on the generated prefix reproduces every greedy choice
    with torch.no_grad():
        logits = tuned(**inputs, decoder_input_ids=greedy[:, :-1]).logits
    assert torch.equal(logits.argmax(-1)[:, :1], greedy[:, 1:2])
    unfinished = ~torch.isin(greedy[:, 1:-1], torch.tensor([1, 2])).any(dim=1)
    assert torch.equal(logits.argmax(-1)[unfinished], greedy[unfinished, 1:])
    beams = tuned.generate(**inputs, max_new_tokens=6, num_beams=3)
    assert torch.equal(beams, tuned.generate(**inputs, max_new_tokens=6, num_beams=3, use_cache=False))
    assert beams.shape[0] == 3 and torch.all(beams[:, 0] == tuned.config.decoder_start_token_id)


def test_side_position_bias_starts_as_backbone_block_0() -> None:
    tuned = lst("t5")
    positions = torch.arange(9)
    for name, bidirectional in (("encoder", True), ("decoder", False)):
        side = tuned.method_modules.stacks[name].position_bias
        assert side.bidirectional is bidirectional
        attention = tuned.backbone.stacks[name].blocks[0].get("attention")[1]
        torch.testing.assert_close(side(positions, positions), attention.compute_bias(9, 9), rtol=0, atol=0)
        # a decoding step: query 8 against the 9 keys so far, the last row of the full bias
        torch.testing.assert_close(side(positions[8:], positions), attention.compute_bias(9, 9)[:, :, 8:],
                                   rtol=0, atol=0)


def test_backbone_train_mode_controls_backbone_dropout() -> None:
    inputs = make_inputs("t5")

    def two_forwards(train_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
        tuned = lst("t5", side_dropout=0.0, backbone_train_mode=train_mode).train()
        return tuned(**inputs).logits, tuned(**inputs).logits

    first, second = two_forwards(False)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    first, second = two_forwards(True)
    assert not torch.equal(first, second)


def test_merge_and_unsupported_models_raise_clearly() -> None:
    with pytest.raises(UnsupportedMethodError, match="side network"):
        lst("bert").merge()
    with pytest.raises(UnsupportedMethodError, match="decoder-only"):
        lst("gpt2")
    with pytest.raises(UnsupportedMethodError, match="hierarchical"):
        lst("swin")
    with pytest.raises(UnsupportedMethodError, match="encoder-decoder"):
        lst("bert").generate(input_ids=torch.ones(1, 3, dtype=torch.long))


@pytest.mark.parametrize("options,field", [
    ({"reduction_factor": 0}, "reduction_factor"), ({"side_layers": [1, 1]}, "side_layers"),
    ({"init": "pruned"}, "init"), ({"backbone_dtype": "int8"}, "backbone_dtype"),
    ({"gate_temperature": -1.0}, "gate_temperature"), ({"fisher_pruning": "heads"}, "fisher_pruning"),
    ({"train_head": True}, "train_head"), ({"side_dropout": 1.0}, "side_dropout"),
])
def test_invalid_options_name_the_field(options: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"LSTConfig.{field}"):
        leantune.make_config("lst", **options)


def test_out_of_range_layers_and_indivisible_widths_name_the_option() -> None:
    with pytest.raises(ConfigError, match=r"side_layers.*\[5\]"):
        lst("bert", side_layers=[0, 5])
    with pytest.raises(ConfigError, match="reduction_factor=3"):
        lst("bert", reduction_factor=3)


def test_method_facts() -> None:
    assert leantune.get_method("lst") is LadderSideTuning
    assert LadderSideTuning.default_learning_rate == 3e-3
    assert LadderSideTuning.budget_options == {"fisher_samples": 256}
    assert not LadderSideTuning.mergeable
    assert LadderSideTuning(leantune.make_config("lst")).needs_data()
    assert not LadderSideTuning(leantune.make_config("lst", init="random")).needs_data()
    method = LadderSideTuning(leantune.make_config("lst", init="random"))
    for family in FAMILIES + ("dinov2",):
        assert method.unsupported_reason(lst(family).backbone) is None, family
    gpt2 = leantune.wrap(make_model("gpt2"), leantune.make_config("lora")).backbone
    swin = leantune.wrap(make_model("swin"), leantune.make_config("lora")).backbone
    assert "decoder-only" in method.unsupported_reason(gpt2)
    assert "hierarchical (2 stages" in method.unsupported_reason(swin)


@pytest.mark.parametrize("num_labels,problem_type,labels", [
    (1, None, torch.tensor([0.5, -1.0])),                       # regression
    (3, None, torch.tensor([2, 0])),                            # single label
    (3, "multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
])
def test_side_head_loss_is_transformers_classification_loss(num_labels, problem_type, labels) -> None:
    torch.manual_seed(0)
    model = hf.BertForSequenceClassification(hf.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=num_labels, problem_type=problem_type))
    tuned = leantune.wrap(model, leantune.make_config("lst", init="random", reduction_factor=R)).eval()
    inputs = make_inputs("bert")
    output = tuned(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels)
    logits = output.logits
    expected = {
        1: lambda: torch.nn.functional.mse_loss(logits.view(-1), labels),
        3: lambda: (torch.nn.functional.cross_entropy(logits, labels) if problem_type is None
                    else torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)),
    }[num_labels]()
    torch.testing.assert_close(output.loss, expected)


def test_generate_uses_transformers_strategies_and_leaves_nothing_behind() -> None:
    torch.manual_seed(0)
    tuned = lst("t5")
    train_steps(tuned, "t5", steps=2)
    tuned.train()
    model = tuned.base_model
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    inputs = make_inputs("t5", batch=2)
    inputs.pop("labels")

    def sample() -> torch.Tensor:
        torch.manual_seed(11)
        return tuned.generate(**inputs, do_sample=True, top_k=4, max_new_tokens=5, min_new_tokens=5)

    sampled = sample()
    assert torch.equal(sampled, sample()) and sampled.shape == (2, 6)
    several = tuned.generate(**inputs, max_new_tokens=5, num_beams=3, num_return_sequences=2)
    assert several.shape[0] == 4
    # the side network, not the backbone's LM head, chose the tokens: greedy follows the side logits
    greedy = tuned.generate(**inputs, max_new_tokens=1)
    tuned.eval()
    with torch.no_grad():
        first = tuned(**inputs, decoder_input_ids=greedy[:, :1]).logits.argmax(-1)
    assert torch.equal(first[:, 0], greedy[:, 1])
    tuned.train()
    assert model.training and tuned.method_modules.training  # modes restored
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    given = {cache_argument(model): EncoderDecoderCache(DynamicCache(), DynamicCache())}
    with pytest.raises(UnsupportedMethodError, match="cache of its own"):
        tuned.generate(**inputs, max_new_tokens=2, **given)


# --- LST for vision and language (the LST paper's CLIP-T5 variant) ---------------------------------------------------
VL_TOKENS, VL_FEATURES = 5, 12


def vl_lst(family: str, seed: int = 0, **options) -> leantune.TunedModel:
    """LST on a VisionLanguageModel around a tiny backbone (BERT: an answer vocabulary of 7)."""
    from leantune.vl import VisionLanguageModel

    options.setdefault("reduction_factor", R)
    options.setdefault("init", "random")
    model = VisionLanguageModel(make_model(family, seed), VL_FEATURES, num_answers=7 if family == "bert" else None)
    data = None
    if options["init"] == "fisher":
        options.setdefault("fisher_samples", 4)
        options.setdefault("fisher_fraction", 1.0)
        data = [vl_inputs_of(family, seed=s) for s in range(2)]
    return leantune.wrap(model, leantune.make_config("lst", **options), data=data)


def vl_inputs_of(family: str, seed: int = 1, images: int = 1) -> dict:
    inputs = make_inputs(family, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    inputs["visual_features"] = torch.randn(2, images, VL_TOKENS, VL_FEATURES, generator=g)
    if family == "bert":
        inputs["labels"] = torch.randint(0, 7, (2,), generator=g)
    return inputs


@pytest.mark.parametrize("family", ["t5", "bart", "bert"])
def test_vl_backbone_sees_the_text_only_and_the_side_network_text_and_image(family: str) -> None:
    tuned = vl_lst(family).eval()
    inputs = vl_inputs_of(family, images=2)
    text_length = inputs["input_ids"].shape[1]
    seen = {}
    stack = tuned.backbone.stacks["encoder"]
    first_block, side_encoder = stack.blocks[0].module, tuned.method_modules.stacks["encoder"]
    def backbone_input(_module, args, kwargs) -> None:
        seen["backbone"] = (args[0] if args else kwargs["hidden_states"]).shape

    def side_output(_module, _args, output) -> None:
        seen["side"] = output.shape

    handles = [first_block.register_forward_pre_hook(backbone_input, with_kwargs=True),
               side_encoder.register_forward_hook(side_output)]
    try:
        with torch.no_grad():
            logits = tuned(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    assert seen["backbone"][1] == text_length
    assert seen["side"][1] == text_length + 2 * VL_TOKENS
    other = dict(inputs, visual_features=torch.randn_like(inputs["visual_features"]))
    with torch.no_grad():
        assert not torch.allclose(tuned(**other).logits, logits)


def test_vl_ladders_are_zero_at_the_visual_positions_before_the_gate() -> None:
    tuned = vl_lst("t5").eval()
    side = tuned.method_modules.stacks["encoder"]
    with torch.no_grad():
        side.gates.normal_()
    ladders = {i: torch.randn(2, 6, 32) for i in (-1, 0, 1)}
    extra = torch.randn(2, 3, 32)
    entering = {}

    def record(_module, args) -> None:
        entering["h"] = args[0]

    handle = side.blocks["0"].register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            side(ladders, None, extra=extra)
    finally:
        handle.remove()
    mu = side.gate_values()[0]
    with torch.no_grad():
        first = side.first_downsample(torch.cat([ladders[-1], extra], dim=1))
        expected_text = mu * first[:, :6] + (1 - mu) * side.downsamples["0"](ladders[0])
        torch.testing.assert_close(entering["h"][:, 6:], mu * first[:, 6:])  # only the gate acts on visual tokens
        torch.testing.assert_close(entering["h"][:, :6], expected_text)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_vl_generation_follows_the_side_logits_with_and_without_cache(family: str) -> None:
    torch.manual_seed(0)
    tuned = vl_lst(family)
    train_steps_vl(tuned, family)
    tuned.eval()
    inputs = {k: v for k, v in vl_inputs_of(family, images=2).items() if k != "labels"}
    greedy = tuned.generate(**inputs, max_new_tokens=5)
    assert torch.equal(greedy, tuned.generate(**inputs, max_new_tokens=5, use_cache=False))
    with torch.no_grad():
        logits = tuned(**inputs, decoder_input_ids=greedy[:, :-1]).logits
    assert torch.equal(logits.argmax(-1)[:, 0], greedy[:, 1])
    beams = tuned.generate(**inputs, max_new_tokens=5, num_beams=3)
    assert torch.equal(beams, tuned.generate(**inputs, max_new_tokens=5, num_beams=3, use_cache=False))


def train_steps_vl(tuned: leantune.TunedModel, family: str, steps: int = 2) -> None:
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    tuned.train()
    for step in range(steps):
        tuned(**vl_inputs_of(family, seed=step, images=2)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_vl_fisher_init_reads_the_text_only_and_the_projection_stays_float32(tmp_path) -> None:
    from leantune.vl import VisionLanguageModel

    calls = []
    original = VisionLanguageModel.forward

    def recording(self, *args, **kwargs):
        calls.append(kwargs.get("visual_features") is not None)
        return original(self, *args, **kwargs)

    VisionLanguageModel.forward = recording
    try:
        tuned = vl_lst("t5", init="fisher", backbone_dtype="bfloat16")
    finally:
        VisionLanguageModel.forward = original
    assert calls and not any(calls)
    assert tuned.base_model.text_model.shared.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in tuned.base_model.visual_projection.parameters())
    train_steps_vl(tuned, "t5")
    tuned.save_pretrained(tmp_path)
    restored = leantune.load(VisionLanguageModel(make_model("t5"), VL_FEATURES), tmp_path)
    inputs = vl_inputs_of("t5", seed=9)
    tuned.eval(), restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(**inputs).logits, tuned(**inputs).logits, rtol=0, atol=0)


def test_vl_inputs_on_a_text_model_are_refused() -> None:
    tuned = lst("t5")
    with pytest.raises(ConfigError, match="not a leantune.vl.VisionLanguageModel"):
        tuned(**vl_inputs_of("t5"))


def test_vl_paper_side_network_count_t5_base() -> None:
    """The LST paper's VL setting (CLIP-T5: T5-base, r=4, all 12 layers): 16,386,072 side parameters, 7.35% of T5-base
    (research note, section 5), plus the visual projection (T5's RMSNorm: 1,581,312 with 2048-d features)."""
    from leantune.vl import VisionLanguageModel

    config = hf.T5Config(d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64, vocab_size=32128)
    with torch.device("meta"):
        model = VisionLanguageModel(hf.T5ForConditionalGeneration(config), feature_dim=2048)
    tuned = leantune.wrap(model, leantune.make_config("lst", reduction_factor=4, init="random"))
    side = sum(p.numel() for p in tuned.method_modules.parameters())
    projection = sum(p.numel() for p in model.visual_projection.parameters())
    assert side == 16_386_072 and projection == 1_581_312
    assert tuned.trainable_parameter_count()[0] == side + projection
    assert round(100 * side / 222_882_048, 2) == 7.35


# --- ladder normalisation (issue 13) ---------------------------------------------------------------------------------
def test_ladder_norm_defaults_on_for_pre_norm_encoder_classifiers_only() -> None:
    assert all(lst(family).method.ladder_norm for family in ("vit", "dinov2", "clip-vision"))
    assert not any(lst(family).method.ladder_norm for family in ("bert", "t5", "bart"))
    assert not vl_lst("bert").method.ladder_norm
    assert lst("t5", ladder_norm=True).method.ladder_norm and not lst("vit", ladder_norm=False).method.ladder_norm


@pytest.mark.parametrize("family", ["vit", "dinov2"])  # pre-norm: raw block outputs are not normalised
def test_side_network_reads_per_token_normalised_ladders(family: str) -> None:
    normed, raw = lst(family).eval(), lst(family, ladder_norm=False).eval()
    raw.method_modules.load_state_dict(normed.method_modules.state_dict())
    method, inputs = raw.method, make_inputs(family)
    inputs.pop("labels")
    name = method.stack_names[0]
    with torch.no_grad():
        with method.recording(name) as ladders:
            raw.base_model.base_model(**inputs)
        for hidden in ladders.values():  # the raw block outputs are not normalised (else the test proves nothing)
            assert (hidden.mean(-1).abs().max() > 1e-3) or (hidden.var(-1, unbiased=False) - 1).abs().max() > 1e-3
        by_hand = method.classify(raw.method_modules, {i: torch.nn.functional.layer_norm(h, h.shape[-1:])
                                                       for i, h in ladders.items()}, inputs.get("attention_mask"))
        with normed.method.recording(name) as recorded:
            normed.base_model.base_model(**inputs)
        for hidden in recorded.values():
            torch.testing.assert_close(hidden.mean(-1), torch.zeros(hidden.shape[:-1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(main_output(normed(**inputs)), by_hand)
        assert not torch.allclose(main_output(raw(**inputs)), by_hand)


def test_ladder_norm_on_t5_survives_save_and_load(tmp_path) -> None:
    """(Its generation cache parity is in test_generate_same_tokens_with_and_without_side_cache.)"""
    torch.manual_seed(0)
    tuned = lst("t5", ladder_norm=True)
    train_steps(tuned, "t5", steps=2)
    tuned.eval()
    inputs = make_inputs("t5", batch=3)
    inputs.pop("labels")
    greedy = tuned.generate(**inputs, max_new_tokens=5)
    tuned.save_pretrained(tmp_path)
    restored = leantune.load(make_model("t5"), tmp_path).eval()
    assert restored.method.ladder_norm
    assert torch.equal(restored.generate(**inputs, max_new_tokens=5), greedy)


# --- init="auto" and the Fisher budget (issues 13 and 9) -------------------------------------------------------------
def test_auto_init_is_random_on_vision_backbones_and_fisher_on_text_models() -> None:
    for family in ("vit", "dinov2", "clip-vision"):
        tuned = leantune.wrap(model_of(family), leantune.make_config("lst", reduction_factor=R))  # no data needed
        assert tuned.method.init == "random" and not hasattr(tuned.method, "pruning"), family
    for family in ("t5", "bert"):
        data = [make_inputs(family, batch=3, seed=s) for s in range(2)]
        tuned = leantune.wrap(make_model(family), leantune.make_config("lst", reduction_factor=R), data=data)
        assert tuned.method.init == "fisher" and "encoder" in tuned.method.pruning, family


class CountingBatches(list):
    """A list of batches that counts the batches read from it."""

    read = 0

    def __iter__(self):
        for batch in super().__iter__():
            self.read += 1
            yield batch


def test_fisher_sample_count_scales_with_the_data_and_is_what_the_init_reads() -> None:
    from leantune.methods.lst.pruning import fisher_sample_count

    def count(data, **options) -> int:
        return fisher_sample_count(leantune.make_config("lst", **options), data)

    twelve = [make_inputs("t5", batch=3, seed=s) for s in range(4)]
    assert count(twelve) == 2  # ceil(0.1 * 12)
    assert count(twelve, fisher_fraction=1.0, fisher_samples=5) == 5
    assert count(iter(twelve), fisher_samples=7) == 7  # a generator cannot tell its size
    assert count(type("Sized", (), {"num_examples": 1000})()) == 100
    data = CountingBatches(twelve)
    leantune.wrap(make_model("t5"), leantune.make_config("lst", reduction_factor=R, fisher_fraction=0.25), data=data)
    # counting the examples walks the list once (4); the Fisher's 3 examples are the first batch, then the second
    # batch is opened and left (2), where fisher_samples=1024 alone would have read all 4 again
    assert data.read == 4 + 2


# --- fewer side heads ------------------------------------------------------------------------------------------------
def test_fewer_side_heads_keep_widths_and_counts_and_shrink_what_autograd_keeps() -> None:
    batch, source, target = 4, 48, 6
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(2, 96, (batch, source), generator=g),
              "labels": torch.randint(2, 96, (batch, target), generator=g)}
    sizes = {}
    for heads in (None, 1):
        tuned = leantune.wrap(medium_t5(), leantune.make_config("lst", init="random", reduction_factor=8,
                                                                side_heads=heads))
        attention = tuned.method_modules.stacks["encoder"].blocks["0"].attention
        assert attention.query.weight.shape == (256 // 8, 256 // 8)  # 4 x 64 inner dims / 8, however grouped
        bias = tuned.method_modules.stacks["encoder"].position_bias.table.weight
        backbone_bias = tuned.base_model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        torch.testing.assert_close(bias, backbone_bias.mean(-1, keepdim=True) if heads == 1 else backbone_bias)
        trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
        sizes[heads] = (trainable, saved_bytes(tuned.train(), inputs)[0])
    assert sizes[1][0] == sizes[None][0] - 2 * 32 * 3  # same weights; per stack, 32 buckets x 3 bias heads fewer
    # the encoder's self-attention maps shrink from 4 heads to 1 (and the decoder's), everything else is equal
    assert sizes[1][1] < sizes[None][1] - 2 * batch * 3 * source ** 2 * 4


@pytest.mark.parametrize("family", ["t5", "vit"])
def test_fewer_side_heads_train_save_load_and_generate(family: str, tmp_path) -> None:
    torch.manual_seed(0)
    tuned = lst(family, side_heads=2, init="fisher")  # tiny models have 4 heads
    assert tuned.method_modules.stacks[tuned.method.stack_names[0]].blocks["0"].attention.heads == 2
    train_steps(tuned, family, steps=2)
    tuned.save_pretrained(tmp_path)
    restored = leantune.load(make_model(family), tmp_path)
    inputs = make_inputs(family, seed=9)
    tuned.eval(), restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(main_output(restored(**inputs)), main_output(tuned(**inputs)), rtol=0, atol=0)
    if family == "t5":
        inputs.pop("labels")
        greedy = tuned.generate(**inputs, max_new_tokens=5)
        assert torch.equal(greedy, tuned.generate(**inputs, max_new_tokens=5, use_cache=False))
    with pytest.raises(ConfigError, match=r"LSTConfig.side_heads=3 does not divide the .* 4 attention heads"):
        lst(family, side_heads=3)
