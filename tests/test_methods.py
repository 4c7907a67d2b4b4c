"""Every built-in method on every family, from the registry and the methods' facts: freezing, training, identity
at init, save/load, merge where ``mergeable``, refusal where ``unsupported_reason`` says so, generation."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from tiny import (
    FAMILIES,
    GENERATIVE_FAMILIES,
    assert_only_trainable_parameters_change,
    main_output,
    make_inputs,
    make_model,
)

import leantune
from leantune.backbones import Backbone, resolve
from leantune.errors import UnsupportedMethodError
from leantune.methods.base import TuningMethod
from leantune.registry import get_method, is_builtin

# What the facts do not say, per method: options that make a case fast or fit tiny models (FISH's default 0.5%
# of ~25k parameters is less than a task head), the per-call inputs to pass where the method's config requires
# some.
TEST_OPTIONS: dict[str, dict[str, Any]] = {"lst": {"init": "random"}, "fish": {"keep_ratio": 0.2}}
CALL_INPUTS: dict[str, dict[str, Any]] = {
    "lavish": {"audio_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))},
}
METHODS = [m for m in leantune.methods() if is_builtin(m)]
IDENTITY_AT_INIT = {m for m in METHODS if get_method(m).identity_at_init}


def method_instance(method: str, **options: Any) -> TuningMethod:
    return get_method(method)(leantune.make_config(method, **{**TEST_OPTIONS.get(method, {}), **options}))


@functools.cache
def backbone(family: str) -> Backbone:
    return resolve(make_model(family))


def unsupported_reason(method: str, family: str) -> str | None:
    return method_instance(method).unsupported_reason(backbone(family))


CASES = [(m, f) for m in METHODS for f in FAMILIES if unsupported_reason(m, f) is None]
REFUSED = [(m, f) for m in METHODS for f in FAMILIES if unsupported_reason(m, f) is not None]


def data_batches(family: str) -> list[dict[str, torch.Tensor]]:
    """Task batches for methods that initialise from data (``needs_data``)."""
    return [make_inputs(family, seed=seed) for seed in (11, 12)]


def wrapped(method: str, family: str, base: torch.nn.Module | None = None, **options: Any) -> leantune.TunedModel:
    """``method`` (its test options, then ``options``) on ``base`` or a fresh tiny ``family`` model."""
    options = {**TEST_OPTIONS.get(method, {}), **options}
    data = data_batches(family) if method_instance(method, **options).needs_data() else None
    return leantune.wrap(make_model(family) if base is None else base, leantune.make_config(method, **options),
                         data=data)


def inputs_for(tuned: leantune.TunedModel, family: str, seed: int = 1) -> dict[str, Any]:
    """``make_inputs`` plus the per-call inputs the method requires with this config."""
    method = tuned.method.name
    required = [i.name for i in tuned.method.declared_inputs() if i.required]
    missing = [name for name in required if name not in CALL_INPUTS.get(method, {})]
    if missing:
        pytest.fail(f"method {method!r} requires per-call inputs {missing}: give test values in CALL_INPUTS")
    return {**make_inputs(family, seed=seed), **CALL_INPUTS.get(method, {})}


def train_steps(tuned: leantune.TunedModel, family: str, steps: int = 3) -> None:
    params = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    tuned.train()
    for step in range(steps):
        loss = tuned(**inputs_for(tuned, family, seed=step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_the_matrix_covers_the_built_in_methods() -> None:
    assert {"full", "bitfit", "layernorm", "lora", "adapter", "prompt", "lst", "fish"} <= set(METHODS)
    assert all(any(m == method for m, _ in CASES) for method in METHODS), "a method supports no family"


@pytest.mark.parametrize("method,family", REFUSED)
def test_unsupported_pairs_are_refused_by_wrap(method: str, family: str) -> None:
    with pytest.raises(UnsupportedMethodError, match=f"method '{method}' cannot be applied") as refused:
        wrapped(method, family)
    assert unsupported_reason(method, family) in str(refused.value)


@pytest.mark.parametrize("method,family", CASES)
def test_only_method_parameters_change(method: str, family: str) -> None:
    tuned = wrapped(method, family)
    assert_only_trainable_parameters_change(tuned, lambda: train_steps(tuned, family))


@pytest.mark.parametrize("method,family", [c for c in CASES if c[0] in IDENTITY_AT_INIT])
def test_identity_at_init(method: str, family: str) -> None:
    base = make_model(family).eval()
    tuned = wrapped(method, family, base=copy.deepcopy(base)).eval()
    inputs = inputs_for(tuned, family)
    with torch.no_grad():
        expected = main_output(base(**make_inputs(family)))
        torch.testing.assert_close(main_output(tuned(**inputs)), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,family", CASES)
def test_save_load_round_trip(method: str, family: str, tmp_path) -> None:
    torch.manual_seed(3)
    tuned = wrapped(method, family)
    train_steps(tuned, family, steps=2)
    tuned.save_pretrained(tmp_path)
    restored = leantune.load(make_model(family), tmp_path)

    assert (tmp_path / "leantune_config.json").is_file() and (tmp_path / "delta.safetensors").is_file()
    assert set(restored.delta_state_dict()) == set(tuned.delta_state_dict())
    inputs = inputs_for(tuned, family, seed=9)
    tuned.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(main_output(restored(**inputs)), main_output(tuned(**inputs)))


@pytest.mark.parametrize("method,family", [c for c in CASES if get_method(c[0]).mergeable])
def test_merge_matches_unmerged(method: str, family: str) -> None:
    tuned = wrapped(method, family)
    train_steps(tuned, family, steps=2)
    tuned.eval()
    inputs = inputs_for(tuned, family, seed=5)
    with torch.no_grad():
        expected = main_output(tuned(**inputs))
        merged = tuned.merge()
        assert type(merged).__module__.startswith("transformers.")
        assert not any(".branches" in name for name, _ in merged.named_modules())
        torch.testing.assert_close(main_output(merged(**make_inputs(family, seed=5))), expected, rtol=0, atol=1e-5)
    with pytest.raises(UnsupportedMethodError, match="merged"):
        tuned(**inputs)


@pytest.mark.parametrize("method", [m for m in METHODS if not get_method(m).mergeable])
def test_merge_refused_where_inexact(method: str) -> None:
    family = next(f for m, f in CASES if m == method)
    tuned = wrapped(method, family)
    with pytest.raises(UnsupportedMethodError, match=f"method '{method}' cannot be merged"):
        tuned.merge()


@pytest.mark.parametrize("method,family", [c for c in CASES if c[1] in GENERATIVE_FAMILIES])
def test_generate(method: str, family: str) -> None:
    tuned = wrapped(method, family).eval()
    inputs = inputs_for(tuned, family)
    tokens = tuned.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            max_new_tokens=3, do_sample=False, **CALL_INPUTS.get(method, {}))
    assert tokens.shape[0] == 2 and tokens.dtype == torch.long


@pytest.mark.parametrize("method", sorted(IDENTITY_AT_INIT & set(METHODS)))
def test_generate_equals_base_at_init(method: str) -> None:
    if unsupported_reason(method, "t5") is not None:
        pytest.skip(unsupported_reason(method, "t5"))
    base = make_model("t5").eval()
    tuned = wrapped(method, "t5", base=copy.deepcopy(base)).eval()
    inputs = make_inputs("t5")
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=4,
                  do_sample=False)
    assert torch.equal(tuned.generate(**kwargs, **CALL_INPUTS.get(method, {})), base.generate(**kwargs))


def test_prompt_extends_mask_and_labels() -> None:
    tuned = wrapped("prompt", "gpt2", num_tokens=5)
    seen = {}
    tuned.base_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    inputs = make_inputs("gpt2")
    tuned(**inputs)
    assert seen["inputs_embeds"].shape[1] == inputs["input_ids"].shape[1] + 5
    assert seen["attention_mask"].shape == seen["inputs_embeds"].shape[:2]
    assert (seen["labels"][:, :5] == -100).all()
    assert torch.equal(seen["labels"][:, 5:], inputs["labels"])


def test_prompt_vocab_init_copies_embedding_rows() -> None:
    tuned = wrapped("prompt", "t5", num_tokens=4)
    table = tuned.base_model.get_input_embeddings().weight
    prompt = tuned.method_modules.embedding
    for row in prompt:
        assert (table == row).all(dim=1).any()


def test_prompt_reparameterization_trains_mlp() -> None:
    tuned = wrapped("prompt", "bert", reparameterize=True, reparameterize_hidden=8)
    names = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert "method_modules.mlp.0.weight" in names and "method_modules.embedding" in names


def test_task_head_trainable_and_saved_by_default(tmp_path) -> None:
    tuned = wrapped("lora", "bert")
    assert all(p.requires_grad for p in tuned.base_model.classifier.parameters())
    assert "base_model.classifier.weight" in tuned.delta_state_dict()
    no_head = wrapped("lora", "bert", train_head=False)
    assert not any(p.requires_grad for p in no_head.base_model.classifier.parameters())


def test_modules_to_save() -> None:
    tuned = wrapped("lora", "bert", modules_to_save=["pooler"])
    assert all(p.requires_grad for p in tuned.base_model.bert.pooler.parameters())
    assert "base_model.bert.pooler.dense.weight" in tuned.delta_state_dict()


def test_bitfit_adds_zero_biases_where_missing() -> None:
    tuned = wrapped("bitfit", "t5")
    q = tuned.base_model.encoder.block[0].layer[0].SelfAttention.q
    assert q.bias is not None and q.bias.requires_grad and torch.all(q.bias == 0)
    with pytest.raises(UnsupportedMethodError, match="no bias"):
        wrapped("bitfit", "t5", add_missing_biases=False)


def test_layernorm_trains_only_norms() -> None:
    tuned = wrapped("layernorm", "bert", train_head=False)
    trainable = [n for n, p in tuned.named_parameters() if p.requires_grad]
    assert trainable and all("LayerNorm" in n for n in trainable)
    no_bias = wrapped("layernorm", "bert", train_head=False, include_bias=False)
    assert all(n.endswith("weight") for n, p in no_bias.named_parameters() if p.requires_grad)


def test_adapter_placement_and_width() -> None:
    houlsby = wrapped("adapter", "bert", reduction_factor=4)
    pfeiffer = wrapped("adapter", "bert", reduction_factor=4, placement="pfeiffer")
    count = lambda t: sum(1 for n, _ in t.named_modules() if n.endswith(".branches.adapter"))  # noqa: E731
    assert count(houlsby) == 2 * 2 and count(pfeiffer) == 2
    down = houlsby.base_model.bert.encoder.layer[0].output.dense.branches.adapter.down
    assert down.out_features == 32 // 4
    trained_norms = wrapped("adapter", "bert", train_norms=True)
    assert trained_norms.base_model.bert.encoder.layer[0].output.LayerNorm.weight.requires_grad


def test_adapter_nonzero_init_changes_output() -> None:
    base = make_model("bert").eval()
    tuned = leantune.wrap(copy.deepcopy(base), leantune.make_config("adapter", zero_init_up=False)).eval()
    inputs = make_inputs("bert")
    with torch.no_grad():
        assert not torch.allclose(tuned(**inputs).logits, base(**inputs).logits)


def test_lora_train_biases() -> None:
    tuned = wrapped("lora", "bert", train_biases=True)
    assert tuned.base_model.bert.encoder.layer[0].output.dense.bias.requires_grad
