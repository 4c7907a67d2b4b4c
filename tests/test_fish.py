"""FISH masks: Fisher scores, the global top-k budget, masked and sparse training, the optimizer contract
(parameter groups + before_optimizer_step, no global hooks), save/merge/load, mask reuse, errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_inputs, make_model
from torch import nn

import leantune
from leantune.errors import ConfigError, UnsupportedMethodError
from leantune.fisher import fisher_scores
from leantune.methods.fish import FishMask, load_mask, save_mask, select_top_k
from leantune.registry import get_method

DATA = [make_inputs("bert", batch=4, seed=s) for s in range(3)]


def fish(family: str = "bert", data=None, **options) -> leantune.TunedModel:
    options.setdefault("keep_ratio", 0.02)
    options.setdefault("num_samples", 8)
    if data is None:
        data = [make_inputs(family, batch=4, seed=s) for s in range(3)]
    return leantune.wrap(make_model(family), leantune.make_config("fish", **options), data=data)


def train(tuned: leantune.TunedModel, family: str = "bert", steps: int = 5, weight_decay: float = 0.0,
          optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW) -> torch.optim.Optimizer:
    """The method's parameter groups, clipping at 1.0 after backward (as the paper), then the method's
    ``before_optimizer_step``; eval mode so two runs see the same forward."""
    params = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = optimizer_class(tuned.method.parameter_groups(tuned, weight_decay), lr=1e-2)
    tuned.eval()
    for step in range(steps):
        tuned(**make_inputs(family, seed=20 + step)).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        tuned.method.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def effective_weights(tuned: leantune.TunedModel) -> dict[str, torch.Tensor]:
    """Every base tensor as the model uses it (base + scattered values in sparse mode)."""
    weights = {n: p.detach().clone() for n, p in tuned.base_model.named_parameters()}
    if tuned.method_config.mode == "sparse":
        weights.update({n: w.detach() for n, w in tuned.method.effective_weights(tuned.base_model).items()})
    return weights


class SoftmaxRegression(nn.Module):
    """A toy classifier whose per-example gradients have a closed form: dL/dW = (p - y) x^T, dL/db = p - y."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        logits = self.linear(x)
        return SimpleNamespace(logits=logits, loss=nn.functional.cross_entropy(logits, labels))


@pytest.mark.parametrize("grad_type", ["square", "absolute"])
@pytest.mark.parametrize("fisher", ["empirical", "expected"])
def test_fisher_scores_equal_hand_computed_per_example_sums(fisher: str, grad_type: str) -> None:
    model = SoftmaxRegression().train()
    g = torch.Generator().manual_seed(4)
    x, labels = torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)
    batches = [{"x": x[:3], "labels": labels[:3]}, {"x": x[3:], "labels": labels[3:]}]
    params = dict(model.named_parameters())
    scores = fisher_scores(model, params, batches, num_samples=5, fisher=fisher, grad_type=grad_type)

    stat = torch.square if grad_type == "square" else torch.abs
    expected_w, expected_b = torch.zeros(3, 5), torch.zeros(3)
    with torch.no_grad():
        for n in range(5):  # num_samples=5 of the 6 examples
            p = torch.softmax(model.linear(x[n]), dim=-1)
            targets = [(1.0, labels[n])] if fisher == "empirical" else [(float(p[c]), c) for c in range(3)]
            for weight, c in targets:
                residual = p - nn.functional.one_hot(torch.as_tensor(c), 3).float()
                expected_w += weight * stat(torch.outer(residual, x[n]))
                expected_b += weight * stat(residual)
    torch.testing.assert_close(scores["linear.weight"], expected_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores["linear.bias"], expected_b, rtol=1e-5, atol=1e-6)
    assert scores["linear.weight"].dtype == torch.float32
    assert model.training and all(p.grad is None for p in model.parameters())


def test_select_top_k_is_global_and_deals_disjoint_masks_by_rank() -> None:
    scores = {"a": torch.tensor([[0.9, 0.1], [0.5, 0.0]]), "b": torch.tensor([0.8, 0.7, 0.2])}
    mask = select_top_k(scores, 3)
    assert mask.count() == 3
    assert mask.indices["a"].tolist() == [0] and mask.indices["b"].tolist() == [0, 1]
    dealt = select_top_k(scores, 2, num_workers=2)  # order 0.9(a0) 0.8(b0) 0.7(b1) 0.5(a2)
    assert dealt.indices["a"].tolist() == [0, 2] and dealt.owners["a"].tolist() == [0, 1]
    assert dealt.indices["b"].tolist() == [0, 1] and dealt.owners["b"].tolist() == [1, 0]


@pytest.mark.parametrize("mode", ["sparse", "masked"])
@pytest.mark.parametrize("mask_type", ["fisher", "random"])
def test_exactly_k_selected_and_head_always_on(mode: str, mask_type: str) -> None:
    base_total = sum(p.numel() for p in make_model("bert").parameters())
    tuned = fish(mode=mode, mask_type=mask_type, keep_ratio=0.01)
    k = int(base_total * 0.01)
    head = tuned.base_model.classifier
    head_size = sum(p.numel() for p in head.parameters())
    assert all(p.requires_grad for p in head.parameters())
    assert tuned.method.mask().count() + head_size == k
    assert not any(n.startswith("classifier.") for n in tuned.method.mask().indices)
    if mode == "sparse":
        assert tuned.trainable_parameter_count()[0] == k
        assert all(d.indices.dtype == torch.int32 for d in tuned.method.deltas().values())
    frozen = [p for n, p in tuned.base_model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in tuned.base_model.parameters())


def test_candidates_include_embeddings_norms_and_biases() -> None:
    names = set(fish(keep_ratio=0.3).method.mask().indices)
    assert any("embeddings" in n for n in names)
    assert any("LayerNorm" in n for n in names)
    assert any(n.endswith(".bias") for n in names)


def test_random_mask_differs_from_fisher_and_bitfit_selects_every_bias() -> None:
    fisher = fish(keep_ratio=0.05).method.mask().indices
    random = fish(keep_ratio=0.05, mask_type="random").method.mask().indices
    assert any(not torch.equal(fisher.get(n, torch.empty(0)), random.get(n, torch.empty(0)))
               for n in set(fisher) | set(random))
    bitfit = fish(mask_type="bitfit").method.mask()
    biases = {n: p.numel() for n, p in make_model("bert").named_parameters()
              if n.endswith(".bias") and not n.startswith("classifier.")}
    assert {n: i.numel() for n, i in bitfit.indices.items()} == biases


def test_masked_mode_leaves_unselected_entries_bitwise_unchanged() -> None:
    tuned = fish(mode="masked")
    before = {n: p.detach().clone() for n, p in tuned.base_model.named_parameters()}
    train(tuned, weight_decay=0.1)  # AdamW decays every entry of a parameter unless fish's groups stop it
    mask = tuned.method.mask().indices
    changed_selected = 0
    for name, param in tuned.base_model.named_parameters():
        if name.startswith("classifier."):
            assert not torch.equal(param, before[name])
            continue
        keep = torch.zeros(param.numel(), dtype=torch.bool)
        if name in mask:
            keep[mask[name]] = True
        flat, old = param.detach().reshape(-1), before[name].reshape(-1)
        assert torch.equal(flat[~keep], old[~keep]), name
        changed_selected += int((flat[keep] != old[keep]).sum())
    assert changed_selected > 0.9 * tuned.method.mask().count()


@pytest.mark.parametrize(("weight_decay", "optimizer_class"),
                         [(0.0, torch.optim.AdamW), (0.1, torch.optim.AdamW), (0.1, torch.optim.Adam)])
def test_sparse_and_masked_modes_reach_the_same_weights(weight_decay: float, optimizer_class, tmp_path) -> None:
    """AdamW: decoupled decay of the selected entries; Adam: L2 added to their gradients."""
    sparse = fish()
    save_mask(sparse.method.mask(), tmp_path / "mask.safetensors")
    masked = fish(mode="masked", mask_path=str(tmp_path / "mask.safetensors"))
    train(sparse, weight_decay=weight_decay, optimizer_class=optimizer_class)
    train(masked, weight_decay=weight_decay, optimizer_class=optimizer_class)
    expected, actual = effective_weights(masked), effective_weights(sparse)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=1e-6, msg=name)
    base = dict(make_model("bert").named_parameters())
    assert not torch.equal(expected["classifier.weight"], base["classifier.weight"])


@pytest.mark.parametrize("mode", ["sparse", "masked"])
def test_adamw_decay_reaches_exactly_the_selected_matrix_entries(mode: str) -> None:
    """One step with and without decay: the difference is -lr * wd * weight at the selected entries of matrices
    (effective weights, both modes), and exactly zero at every other entry, biases and norms included."""
    runs = {}
    for weight_decay in (0.0, 0.1):
        tuned = fish(mode=mode, keep_ratio=0.05)
        before = effective_weights(tuned)
        train(tuned, steps=1, weight_decay=weight_decay)
        runs[weight_decay] = effective_weights(tuned)
    mask = tuned.method.mask().indices
    decayed = 0
    for name, weight in before.items():
        if name.startswith("classifier."):
            continue
        expected = torch.zeros(weight.numel())
        if name in mask and weight.ndim >= 2:
            expected[mask[name]] = -1e-2 * 0.1 * weight.reshape(-1)[mask[name]]
            decayed += mask[name].numel()
        difference = (runs[0.1][name] - runs[0.0][name]).reshape(-1)
        torch.testing.assert_close(difference, expected, rtol=1e-4, atol=1e-8, msg=name)
    assert decayed > 0


def test_sparse_state_gradients_and_optimizer_state_have_length_k() -> None:
    tuned = fish()
    optimizer = train(tuned, steps=1)
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    k = tuned.trainable_parameter_count()[0]
    assert sum(p.numel() for p in trainable) == k
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == k
    state = sum(t.numel() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    assert state == 2 * k
    assert all(p.grad is None for p in tuned.base_model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("mode", ["sparse", "masked"])
def test_parameter_groups_hold_every_trainable_tensor_once_and_decay_only_matrices(mode: str) -> None:
    tuned = fish(mode=mode, keep_ratio=0.3)
    groups = tuned.method.parameter_groups(tuned, 0.05)
    grouped = [p for g in groups for p in g["params"]]
    assert sorted(map(id, grouped)) == sorted(id(p) for p in tuned.parameters() if p.requires_grad)
    fish_groups = [g for g in groups if "fish_weight_decay" in g]
    assert len(fish_groups) == 1 and fish_groups[0]["weight_decay"] == 0.0
    assert fish_groups[0]["fish_weight_decay"] == 0.05
    decayed = {id(p) for p in fish_groups[0]["params"]}
    params = dict(tuned.base_model.named_parameters())
    for name, delta in tuned.method.deltas().items():
        own = delta.values if mode == "sparse" else params[name]
        assert (id(own) in decayed) == (params[name].ndim >= 2), name
    plain = [g for g in groups if "fish_weight_decay" not in g]
    assert not decayed & {id(p) for g in plain if g["weight_decay"] for p in g["params"]}


def test_without_the_methods_groups_a_plain_optimizer_is_left_alone() -> None:
    """No global optimizer hooks: an AdamW built from tuned.parameters() decays every entry, unselected too."""
    tuned = fish(mode="masked")
    before = {n: p.detach().clone() for n, p in tuned.base_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    tuned(**make_inputs("bert")).loss.backward()
    optimizer.step()
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    mask = tuned.method.mask().indices
    name = next(n for n in mask if before[n].ndim >= 2)
    unselected = torch.ones(before[name].numel(), dtype=torch.bool)
    unselected[mask[name]] = False
    after = dict(tuned.base_model.named_parameters())[name].detach().reshape(-1)
    torch.testing.assert_close(after[unselected], before[name].reshape(-1)[unselected] * (1 - 1e-2 * 0.1))


def test_optimizer_state_dict_loads_with_weights_only(tmp_path) -> None:
    tuned = fish()
    optimizer = train(tuned, steps=2, weight_decay=0.1)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    state = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert [g.get("fish_weight_decay") for g in state["param_groups"]][-1] == 0.1
    again = torch.optim.AdamW(tuned.method.parameter_groups(tuned, 0.1), lr=1e-2)
    again.load_state_dict(state)
    assert again.param_groups[-1]["fish_weight_decay"] == 0.1


@pytest.mark.parametrize("mode", ["sparse", "masked"])
@pytest.mark.parametrize("family", ["bert", "t5"])
def test_save_merge_load_round_trip(family: str, mode: str, tmp_path) -> None:
    tuned = fish(family, mode=mode)
    train(tuned, family, steps=3)
    tuned.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "delta.safetensors"))
    index_names = [n for n in saved if n.endswith(".indices")]
    assert index_names and all(saved[n].dtype == torch.int32 for n in index_names)
    if mode == "sparse":
        assert sum(saved[n].numel() for n in index_names) == tuned.method.mask().count()
        assert all(n.endswith((".indices", ".values")) or n.startswith("base_model.classifier.") for n in saved)

    restored = leantune.load(make_model(family), tmp_path).eval()
    inputs = make_inputs(family, seed=9)
    tuned.eval()
    with torch.no_grad():
        expected = tuned(**inputs).logits
        assert torch.equal(restored(**inputs).logits, expected)
        merged = restored.merge()
        assert type(merged).__module__.startswith("transformers.")
        assert torch.equal(merged(**inputs).logits, expected)


def test_t5_empirical_fisher_uses_target_sequence_loss_and_generates() -> None:
    tuned = fish("t5", keep_ratio=0.01)
    names = set(tuned.method.mask().indices)
    assert any(n.startswith("decoder.") for n in names)
    base = make_model("t5").eval()
    inputs = make_inputs("t5")
    train(tuned, "t5", steps=2)
    with torch.no_grad():
        assert not torch.equal(tuned(**inputs).logits, base(**inputs).logits)
    tokens = tuned.generate(input_ids=inputs["input_ids"], max_new_tokens=3, do_sample=False)
    assert tokens.shape[0] == 2
    with pytest.raises(UnsupportedMethodError, match="classification head"):
        fish("t5", fisher="expected")


def test_mask_save_and_reuse(tmp_path) -> None:
    first = fish(fisher="expected")
    path = tmp_path / "mask.safetensors"
    save_mask(first.method.mask(), path)
    again = leantune.wrap(make_model("bert"), leantune.make_config("fish", mask_path=str(path)))
    for name, idx in first.method.mask().indices.items():
        assert torch.equal(again.method.mask().indices[name], idx)
    params = dict(make_model("bert").named_parameters())
    save_mask(FishMask({"bert.nope.weight": torch.tensor([0])}), tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match="bert.nope.weight"):
        load_mask(tmp_path / "bad.safetensors", params)
    save_mask(FishMask({"bert.pooler.dense.bias": torch.tensor([5, 99])}), tmp_path / "range.safetensors")
    with pytest.raises(ConfigError, match=r"bert.pooler.dense.bias.*within \[0, 32\)"):
        load_mask(tmp_path / "range.safetensors", params)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporary files left behind
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ConfigError, match=f"mask_path: {missing} does not exist"):
        leantune.wrap(make_model("bert"), leantune.make_config("fish", mask_path=str(missing)))
    (tmp_path / "junk.safetensors").write_text("not a mask")
    with pytest.raises(ConfigError, match="junk.safetensors is not a safetensors mask file"):
        leantune.wrap(make_model("bert"), leantune.make_config("fish", mask_path=str(tmp_path / "junk.safetensors")))


def test_bad_options_and_missing_data() -> None:
    with pytest.raises(ConfigError, match="keep_ratio.*1.5"):
        leantune.make_config("fish", keep_ratio=1.5)
    with pytest.raises(ConfigError, match="mode.*'dense'"):
        leantune.make_config("fish", mode="dense")
    with pytest.raises(ConfigError, match="num_workers=2.*bitfit"):
        leantune.make_config("fish", mask_type="bitfit", num_workers=2)
    with pytest.raises(ConfigError, match="num_samples.*integer"):
        leantune.make_config("fish", num_samples=2.5)
    with pytest.raises(ConfigError, match="needs data"):
        leantune.wrap(make_model("bert"), leantune.make_config("fish"))
    with pytest.raises(ConfigError, match="keep_ratio=0.001.*task head"):
        fish(keep_ratio=0.001)
    with pytest.raises(ConfigError, match="include labels"):
        fish(data=[{k: v for k, v in DATA[0].items() if k != "labels"}])
    with pytest.raises(ConfigError, match="cannot select"):
        fish(keep_ratio=0.9, num_workers=2, mask_type="random")


@pytest.mark.parametrize(("options", "needs_data"), [
    ({}, True), ({"mask_path": "m.safetensors"}, False), ({"mask_type": "random"}, False),
    ({"mask_type": "bitfit"}, False),
])
def test_method_facts(options: dict, needs_data: bool) -> None:
    method = get_method("fish")(leantune.make_config("fish", **options))
    assert method.needs_data() is needs_data
    assert method.mergeable and method.default_learning_rate == 1e-3
    assert leantune.make_config("fish", **method.budget_options).num_samples == 256
