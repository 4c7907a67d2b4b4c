"""Every baseline method on every family: freezing, training, identity at init, save/load, merge."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import FAMILIES, GENERATIVE_FAMILIES, TEXT_FAMILIES, main_output, make_inputs, make_model

import leantune
from leantune.errors import UnsupportedMethodError

BASELINES = ("full", "bitfit", "layernorm", "lora", "adapter", "prompt")
MERGEABLE = ("full", "bitfit", "layernorm", "lora")
IDENTITY_AT_INIT = ("full", "bitfit", "layernorm", "lora", "adapter")


def supported(method: str, family: str) -> bool:
    return method != "prompt" or family in TEXT_FAMILIES


CASES = [(m, f) for m in BASELINES for f in FAMILIES if supported(m, f)]


def wrapped(method: str, family: str, **options) -> leantune.TunedModel:
    return leantune.wrap(make_model(family), leantune.make_config(method, **options))


def train_steps(tuned: leantune.TunedModel, family: str, steps: int = 3) -> None:
    params = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    tuned.train()
    for step in range(steps):
        loss = tuned(**make_inputs(family, seed=step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("method,family", CASES)
def test_only_method_parameters_change(method: str, family: str) -> None:
    tuned = wrapped(method, family)
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable, "the method trains nothing"

    train_steps(tuned, family)

    changed = set()
    for name, param in tuned.named_parameters():
        if name in trainable:
            if not torch.equal(param, before[name]):
                changed.add(name)
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"
            assert param.grad is None, f"frozen {name} holds a .grad"
    assert changed, "no trainable parameter changed after 3 steps"


@pytest.mark.parametrize("method,family", [c for c in CASES if c[0] in IDENTITY_AT_INIT])
def test_identity_at_init(method: str, family: str) -> None:
    base = make_model(family).eval()
    tuned = leantune.wrap(copy.deepcopy(base), leantune.make_config(method)).eval()
    inputs = make_inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(main_output(tuned(**inputs)), main_output(base(**inputs)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,family", CASES)
def test_save_load_round_trip(method: str, family: str, tmp_path) -> None:
    torch.manual_seed(3)
    tuned = wrapped(method, family)
    train_steps(tuned, family, steps=2)
    tuned.save_pretrained(tmp_path)
    restored = leantune.load(make_model(family), tmp_path)

    assert (tmp_path / "leantune_config.json").is_file() and (tmp_path / "delta.safetensors").is_file()
    assert set(restored.delta_state_dict()) == set(tuned.delta_state_dict())
    inputs = make_inputs(family, seed=9)
    tuned.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(main_output(restored(**inputs)), main_output(tuned(**inputs)))


@pytest.mark.parametrize("method,family", [c for c in CASES if c[0] in MERGEABLE])
def test_merge_matches_unmerged(method: str, family: str) -> None:
    tuned = wrapped(method, family)
    train_steps(tuned, family, steps=2)
    tuned.eval()
    inputs = make_inputs(family, seed=5)
    with torch.no_grad():
        expected = main_output(tuned(**inputs))
        merged = tuned.merge()
        assert type(merged).__module__.startswith("transformers.")
        assert not any(n.endswith((".lora.A.weight", ".lora.B.weight")) for n, _ in merged.named_parameters())
        torch.testing.assert_close(main_output(merged(**inputs)), expected, rtol=0, atol=1e-5)
    with pytest.raises(UnsupportedMethodError, match="merged"):
        tuned(**inputs)


@pytest.mark.parametrize("method", ["adapter", "prompt"])
def test_merge_refused_where_inexact(method: str) -> None:
    tuned = wrapped(method, "bert")
    with pytest.raises(UnsupportedMethodError, match=f"method '{method}' cannot be merged"):
        tuned.merge()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in TEXT_FAMILIES])
def test_prompt_refused_without_token_input(family: str) -> None:
    with pytest.raises(UnsupportedMethodError, match="prompt tuning"):
        wrapped("prompt", family)


@pytest.mark.parametrize("method", ["lora", "prompt", "adapter"])
@pytest.mark.parametrize("family", GENERATIVE_FAMILIES)
def test_generate(method: str, family: str) -> None:
    tuned = wrapped(method, family).eval()
    inputs = make_inputs(family)
    tokens = tuned.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            max_new_tokens=3, do_sample=False)
    assert tokens.shape[0] == 2 and tokens.dtype == torch.long


def test_lora_generate_equals_base_at_init() -> None:
    base = make_model("t5").eval()
    tuned = leantune.wrap(copy.deepcopy(base), leantune.LoRAConfig()).eval()
    inputs = make_inputs("t5")
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=4,
                  do_sample=False)
    assert torch.equal(tuned.generate(**kwargs), base.generate(**kwargs))


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
