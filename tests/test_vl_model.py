"""The vision-language model: visual tokens after the text, the architecture map through the wrapper, every
method (LST included) training only its parameters and the projection, generation and NLVR2 logit scoring,
save/load, FISH's dense projection."""

from __future__ import annotations

import pytest
import torch
from tiny import VOCAB, assert_only_trainable_parameters_change, make_inputs, make_model
from torch import nn

import leantune
from leantune.backbones import resolve
from leantune.errors import ConfigError, UnsupportedMethodError, UnsupportedModelError
from leantune.vl import VisionLanguageModel, choice_logits
from leantune.vl.model import weighted_sequence_loss

FEATURES = 12
TOKENS = 5
ANSWERS = 7
TASKS = ["vqa", "gqa", "nlvr"]
METHODS = [
    ("adapter", {"placement": "all"}),
    ("adapter", {"sharing": "multiple", "tasks": TASKS, "placement": "all", "zero_init_up": False}),
    ("hyperformer", {"tasks": TASKS}),
    ("compacter", {}),
    ("lora", {"sharing": "multiple", "tasks": TASKS, "train_biases": "all"}),
    ("prompt", {"num_tokens": 3, "reparameterize": True}),
    ("fish", {"keep_ratio": 0.2, "num_samples": 4}),
    ("lst", {"reduction_factor": 4, "init": "random"}),
]
IDS = [f"{m}-{o.get('sharing', 'single')}" for m, o in METHODS]


def vl_model(family: str, seed: int = 0, **options) -> VisionLanguageModel:
    text_model = make_model(family, seed=seed)
    torch.manual_seed(seed + 100)
    return VisionLanguageModel(text_model, FEATURES, num_answers=ANSWERS if family == "bert" else None, **options)


def vl_inputs(family: str, batch: int = 2, seed: int = 1, images: int | None = None) -> dict:
    """Text inputs of the tiny family plus random visual features; BERT gets answer indices as labels."""
    inputs = make_inputs(family, batch=batch, seed=seed)
    g = torch.Generator().manual_seed(seed + 50)
    shape = (batch, TOKENS, FEATURES) if images is None else (batch, images, TOKENS, FEATURES)
    inputs["visual_features"] = torch.randn(*shape, generator=g)
    if family == "bert":
        inputs["labels"] = torch.randint(0, ANSWERS, (batch,), generator=g)
    return inputs


def encoder_input(model: VisionLanguageModel, inputs: dict) -> dict:
    """What the text model's encoder receives in one forward (inputs_embeds and attention_mask)."""
    seen = {}
    encoder = model.text_model.get_encoder() if model.generative else model.text_model

    def hook(_module, _args, kwargs):
        seen.update({k: kwargs[k] for k in ("inputs_embeds", "attention_mask") if kwargs.get(k) is not None})

    handle = encoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("family", ["t5", "bart", "bert"])
def test_the_architecture_map_resolves_the_text_models_blocks(family: str) -> None:
    model = vl_model(family)
    through_wrapper = resolve(model)
    direct = resolve(model.text_model)
    assert through_wrapper.family == direct.family == family
    assert [b.module for b in through_wrapper.blocks()] == [b.module for b in direct.blocks()]
    assert all(b.path.startswith("text_model.") for b in through_wrapper.blocks())
    for block in through_wrapper.blocks():
        assert model.get_submodule(block.path) is block.module
    assert (through_wrapper.lm_head() is None) == (family == "bert")
    if family != "bert":
        assert through_wrapper.lm_head()[1] is model.text_model.lm_head


@pytest.mark.parametrize("family,norm", [("t5", nn.RMSNorm), ("bart", nn.LayerNorm), ("bert", nn.LayerNorm)])
def test_the_projection_uses_the_backbones_norm_type_and_is_always_trained(family: str, norm: type) -> None:
    model = vl_model(family)
    assert type(model.visual_projection.features[1]) is norm
    assert type(model.visual_projection.boxes[1]) is norm
    assert "visual_projection" in model.leantune_trainable_modules
    tuned = leantune.wrap(model, leantune.LoRAConfig())
    assert all(p.requires_grad for p in model.visual_projection.parameters())
    assert any(n.startswith("base_model.visual_projection.") for n in tuned.delta_state_dict())


@pytest.mark.parametrize("family", ["t5", "bart", "bert"])
def test_visual_tokens_follow_the_text_with_their_mask(family: str) -> None:
    model = vl_model(family).eval()
    inputs = vl_inputs(family)
    seen = encoder_input(model, inputs)
    text = model.get_input_embeddings()(inputs["input_ids"])
    length = text.shape[1]
    torch.testing.assert_close(seen["inputs_embeds"][:, :length], text)
    torch.testing.assert_close(seen["inputs_embeds"][:, length:], model.visual_tokens(inputs["visual_features"]))
    assert seen["inputs_embeds"].shape[1] == length + TOKENS
    assert torch.equal(seen["attention_mask"][:, :length], inputs["attention_mask"])
    assert bool((seen["attention_mask"][:, length:] == 1).all())


@pytest.mark.parametrize("family", ["t5", "bart", "bert"])
def test_the_answer_depends_on_the_features_except_where_they_are_masked(family: str) -> None:
    model = vl_model(family).eval()
    inputs = vl_inputs(family)
    other = dict(inputs, visual_features=torch.randn_like(inputs["visual_features"]))
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, model(**other).logits)
        mask = torch.ones(2, TOKENS, dtype=torch.long)
        mask[:, 2:] = 0
        masked = dict(inputs, visual_mask=mask)
        changed = inputs["visual_features"].clone()
        changed[:, 2:] = torch.randn_like(changed[:, 2:])
        torch.testing.assert_close(model(**masked).logits, model(**dict(masked, visual_features=changed)).logits)


def test_two_images_give_twice_the_tokens_and_their_order_matters() -> None:
    model = vl_model("bart").eval()
    inputs = vl_inputs("bart", images=2)
    seen = encoder_input(model, inputs)
    assert seen["inputs_embeds"].shape[1] == inputs["input_ids"].shape[1] + 2 * TOKENS
    swapped = dict(inputs, visual_features=inputs["visual_features"].flip(1))
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, model(**swapped).logits)
        order = model.visual_projection.image_order.weight
        tokens = model.visual_tokens(inputs["visual_features"])
        plain = model.visual_projection.features(inputs["visual_features"]) + model.visual_projection.boxes(
            torch.zeros(2, 2, TOKENS, 5))
        torch.testing.assert_close(tokens[:, :TOKENS], plain[:, 0] + order[0])
        torch.testing.assert_close(tokens[:, TOKENS:], plain[:, 1] + order[1])
    with pytest.raises(ConfigError, match="at most 2"):
        model(**vl_inputs("bart", images=3))


def test_object_order_adds_the_last_vocabulary_rows() -> None:
    model = vl_model("t5", object_order=True).eval()
    plain = vl_model("t5").eval()
    features = torch.randn(1, TOKENS, FEATURES)
    table = model.get_input_embeddings().weight
    with torch.no_grad():
        expected = plain.visual_tokens(features) + table[VOCAB - 1 - torch.arange(TOKENS)]
        torch.testing.assert_close(model.visual_tokens(features), expected)


@pytest.mark.parametrize("family", ["t5", "bart", "bert"])
@pytest.mark.parametrize("method,options", METHODS, ids=IDS)
def test_each_method_trains_only_its_parameters_and_the_projection(family: str, method: str, options: dict) -> None:
    data = [vl_inputs(family, batch=2, seed=s) for s in range(2)] if method == "fish" else None
    tuned = leantune.wrap(vl_model(family), leantune.make_config(method, **options), data=data)
    tasks = options.get("tasks", [None])
    optimizer = torch.optim.AdamW(tuned.method.parameter_groups(tuned, 0.0), lr=1e-2)
    tuned.eval()

    def train() -> None:
        for step in range(3):
            task = {"task": tasks[step % len(tasks)]} if tasks[0] else {}
            boxes = torch.rand(2, TOKENS, 4)  # with boxes every projection weight gets a gradient
            tuned(**vl_inputs(family, seed=10 + step), visual_boxes=boxes, **task).loss.backward()
            tuned.method.before_optimizer_step(optimizer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    changed = assert_only_trainable_parameters_change(tuned, train)
    projection = {n for n, _ in tuned.named_parameters() if n.startswith("base_model.visual_projection.")}
    assert projection <= changed, f"untrained projection parameters: {sorted(projection - changed)}"
    others = changed - projection - {n for n in changed if n.startswith("base_model.classifier.")}
    assert others, "the method's own parameters did not change"
    if method == "fish":
        assert all(".visual_projection." not in n for n in tuned.method.deltas())


@pytest.mark.parametrize("family", ["t5", "bart", "bert"])
def test_fish_counts_the_projection_as_dense(family: str) -> None:
    model = vl_model(family)
    dense = sum(p.numel() for p in model.visual_projection.parameters())
    dense += sum(p.numel() for p in model.classifier.parameters()) if family == "bert" else 0
    tuned = leantune.wrap(model, leantune.make_config("fish", keep_ratio=0.2, mask_type="random"))
    assert tuned.method.dense_parameters == dense
    selected = sum(d.indices.numel() for d in tuned.method.deltas().values())
    assert selected + dense == int(tuned.method.total_parameters * 0.2)


@pytest.mark.parametrize("family", ["t5", "bart", "bert"])
def test_save_and_load_restore_the_projection_and_the_method(family: str, tmp_path) -> None:
    tuned = leantune.wrap(vl_model(family), leantune.make_config("adapter", zero_init_up=False))
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    tuned.save_pretrained(tmp_path)
    loaded = leantune.load(vl_model(family, seed=0), tmp_path)
    inputs = vl_inputs(family)
    tuned.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, tuned(**inputs).logits)
    with pytest.raises(leantune.errors.CheckpointError, match="another base model"):
        leantune.load(VisionLanguageModel(make_model(family), FEATURES + 1,
                                          num_answers=ANSWERS if family == "bert" else None), tmp_path)


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("method,options", [("adapter", {"zero_init_up": False}),
                                            ("prompt", {"num_tokens": 3, "reparameterize": True}),
                                            ("hyperformer", {"tasks": TASKS}),
                                            ("lst", {"reduction_factor": 4, "init": "random"})],
                         ids=["adapter", "prompt", "hyper", "lst"])
def test_generate_sees_the_visual_tokens_at_every_step(family: str, method: str, options: dict) -> None:
    tuned = leantune.wrap(vl_model(family), leantune.make_config(method, **options)).eval()
    inputs = {k: v for k, v in vl_inputs(family).items() if k != "labels"}
    extra = {"task": "gqa"} if "tasks" in options else {}
    out = tuned.generate(**inputs, **extra, max_new_tokens=4, min_new_tokens=4, do_sample=False, num_beams=1,
                         output_logits=True, return_dict_in_generate=True)
    step_logits = torch.stack(out.logits, dim=1)
    decoder_input_ids = out.sequences[:, :4]
    with torch.no_grad():
        expected = tuned(**inputs, **extra, decoder_input_ids=decoder_input_ids).logits
        other = dict(inputs, visual_features=torch.randn_like(inputs["visual_features"]))
        without = tuned(**other, **extra, decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(step_logits, expected)
    assert not torch.allclose(step_logits[:, -1], without[:, -1])


@pytest.mark.parametrize("family,choices", [("t5", [[11, 1], [12, 1]]), ("bart", [[0, 11, 2], [0, 12, 2]])])
def test_nlvr_choice_logits_equal_the_teacher_forced_logits(family: str, choices: list) -> None:
    tuned = leantune.wrap(vl_model(family), leantune.make_config("adapter", zero_init_up=False)).eval()
    inputs = {k: v for k, v in vl_inputs(family, images=2).items() if k != "labels"}
    scores = choice_logits(tuned, inputs, choices, tuned.config.decoder_start_token_id)
    assert scores.shape == (2, 2)
    position = len(choices[0]) - 2  # the first token that differs: T5 at 0, BART after <s> at 1
    for c, target in enumerate(choices):
        with torch.no_grad():
            logits = tuned(**inputs, labels=torch.tensor([target, target])).logits
        torch.testing.assert_close(scores[:, c], logits[:, position, target[position]])


def test_loss_weights_scale_each_examples_mean_token_loss() -> None:
    model = vl_model("t5").eval()
    inputs = vl_inputs("t5")
    inputs["labels"][1, 2:] = -100
    with torch.no_grad():
        single = [model(**{k: v[i:i + 1] for k, v in inputs.items()}).loss for i in range(2)]
        weighted = model(**inputs, loss_weights=torch.tensor([0.3, 0.9])).loss
        logits = model(**inputs).logits
    torch.testing.assert_close(weighted, (0.3 * single[0] + 0.9 * single[1]) / 2)
    torch.testing.assert_close(weighted_sequence_loss(logits, inputs["labels"], torch.ones(2)),
                               (single[0] + single[1]) / 2)


def test_the_encoder_only_model_classifies_with_hard_or_soft_labels() -> None:
    model = vl_model("bert").eval()
    inputs = vl_inputs("bert")
    with torch.no_grad():
        logits = model(**inputs).logits
        assert logits.shape == (2, ANSWERS)
        hard = model(**inputs).loss
        torch.testing.assert_close(hard, nn.functional.cross_entropy(logits, inputs["labels"]))
        soft_labels = torch.zeros(2, ANSWERS)
        soft_labels[0, 1], soft_labels[1, 3] = 1.0, 0.6
        soft = model(**dict(inputs, labels=soft_labels)).loss
        expected = nn.functional.binary_cross_entropy_with_logits(logits, soft_labels, reduction="sum") / 2
        torch.testing.assert_close(soft, expected)
    with pytest.raises(UnsupportedMethodError, match="classification"):
        model.generate(**inputs)


def test_backbones_it_cannot_take_are_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="decoder-only"):
        VisionLanguageModel(make_model("gpt2"), FEATURES)
    with pytest.raises(ConfigError, match="num_answers"):
        VisionLanguageModel(make_model("bert"), FEATURES)
    with pytest.raises(ConfigError, match="visual_features must be"):
        vl_model("t5")(**dict(vl_inputs("t5"), visual_features=torch.randn(2, FEATURES)))


@pytest.mark.parametrize("pooling", ["mean", "text+visual", "text+images"])
def test_padding_the_text_does_not_move_the_visual_tokens(pooling: str) -> None:
    """BERT's visual tokens take the positions right after the real text, so a padded example answers as it does
    alone without padding."""
    model = vl_model("bert", pooling=pooling).eval()
    inputs = vl_inputs("bert")
    real = int(inputs["attention_mask"][-1].sum())
    alone = {"input_ids": inputs["input_ids"][-1:, :real], "attention_mask": inputs["attention_mask"][-1:, :real],
             "visual_features": inputs["visual_features"][-1:]}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits[-1:], model(**alone).logits, atol=1e-5, rtol=1e-5)


def hidden_and_pooled(model: VisionLanguageModel, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The text model's last hidden states and what the answer head received, in one forward."""
    seen = {}
    hooks = [model.text_model.register_forward_hook(lambda _m, _a, out: seen.update(hidden=out.last_hidden_state)),
             model.classifier.register_forward_hook(lambda _m, args, _o: seen.update(pooled=args[0]))]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    return seen["hidden"], seen["pooled"]


def test_text_and_visual_pooling_reads_both_means_side_by_side() -> None:
    model = vl_model("bert", pooling="text+visual").eval()
    inputs = vl_inputs("bert")
    hidden, pooled = hidden_and_pooled(model, inputs)
    mask = inputs["attention_mask"]
    length = mask.shape[1]
    for row in range(2):
        text = hidden[row, :length][mask[row].bool()].mean(dim=0)
        torch.testing.assert_close(pooled[row], torch.cat([text, hidden[row, length:].mean(dim=0)]))
    assert model.classifier.layers[0].in_features == 2 * model.config.hidden_size


@pytest.mark.parametrize("images", [None, 2])
def test_text_and_images_pooling_gives_each_image_its_own_slot(images: int | None) -> None:
    """``text+images``: the text mean, then each image's mean over its tokens in the image's slot, zeros in the
    slots of absent images (a one-image input fills the first)."""
    model = vl_model("bert", pooling="text+images", num_images=3).eval()
    inputs = vl_inputs("bert", images=images)
    hidden, pooled = hidden_and_pooled(model, inputs)
    mask = inputs["attention_mask"]
    length, width, count = mask.shape[1], model.config.hidden_size, images or 1
    assert model.classifier.layers[0].in_features == 4 * width
    for row in range(2):
        text = hidden[row, :length][mask[row].bool()].mean(dim=0)
        per_image = hidden[row, length:].reshape(count, TOKENS, width).mean(dim=1)
        absent = torch.zeros(3 - count, width)
        torch.testing.assert_close(pooled[row], torch.cat([text, per_image.flatten(), absent.flatten()]))


def test_a_standardized_feature_store_centres_and_scales_by_the_training_images(tmp_path) -> None:
    import json

    from safetensors.torch import save_file

    from leantune.vl.features import FeatureStore

    g = torch.Generator().manual_seed(0)
    features = {f"img{i}": (torch.randn(3, FEATURES, generator=g) * 4 + 7).half() for i in range(6)}
    save_file(features, str(tmp_path / "features-00000.safetensors"))
    index = {"images": {k: "features-00000.safetensors" for k in features}, "feature_dim": FEATURES, "tokens": 3}
    (tmp_path / "index.json").write_text(json.dumps(index))
    store = FeatureStore(tmp_path)
    raw = store("visual_features", ["img5"])
    store.standardize(f"img{i}" for i in range(4))
    train = torch.cat([features[f"img{i}"].float() for i in range(4)])
    standardized = torch.cat([store.get(f"img{i}") for i in range(4)])
    torch.testing.assert_close(standardized.mean(dim=0), torch.zeros(FEATURES), atol=1e-4, rtol=0)
    torch.testing.assert_close(standardized.std(dim=0), train.std(dim=0) / (train.std(dim=0) + 1e-3))
    expected = (raw[0] - train.mean(dim=0)) / (train.std(dim=0) + 1e-3)
    torch.testing.assert_close(store("visual_features", [("img5", "img4")])[0, 0], expected)


@pytest.mark.parametrize("method", ["lora", "fish"])
def test_new_module_learning_rate_moves_the_projection_and_answer_head_into_their_own_groups(method: str) -> None:
    """``TrainConfig.new_module_learning_rate``: the projection and the answer head (and only they) train at that
    rate; every trainable parameter is in exactly one group, each group keeps its weight decay and FISH's key."""
    from leantune.train.config import TrainConfig
    from leantune.train.optimizer import make_optimizer

    model = vl_model("bert")
    options = {"keep_ratio": 0.2, "num_samples": 4} if method == "fish" else {}
    data = [vl_inputs("bert", seed=s) for s in range(2)] if method == "fish" else None
    tuned = leantune.wrap(model, leantune.make_config(method, **options), data=data)
    new = {id(p) for name in ("visual_projection", "classifier") for p in getattr(model, name).parameters()}
    assert {id(p) for p in tuned.new_module_parameters()} == new
    plain = make_optimizer(tuned, TrainConfig(learning_rate=1e-4, weight_decay=0.1))
    split = make_optimizer(tuned, TrainConfig(learning_rate=1e-4, weight_decay=0.1, new_module_learning_rate=5e-3))
    assert all(g["lr"] == 1e-4 for g in plain.param_groups)
    placed = [id(p) for g in split.param_groups for p in g["params"]]
    assert sorted(placed) == sorted(id(p) for p in tuned.parameters() if p.requires_grad)
    for group in split.param_groups:
        assert {id(p) in new for p in group["params"]} == {group["lr"] == 5e-3}
    def kinds(groups: list[dict]) -> set:
        return {(g["weight_decay"], tuple(sorted(k for k in g if k.startswith("fish")))) for g in groups}

    assert kinds(split.param_groups) == kinds(plain.param_groups)


def test_new_module_learning_rate_must_be_positive() -> None:
    from leantune.train.config import TrainConfig

    with pytest.raises(ConfigError, match="new_module_learning_rate must be > 0"):
        TrainConfig(new_module_learning_rate=0.0)
