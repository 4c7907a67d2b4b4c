"""The Fisher estimator: vectorised per-example gradients equal the per-example loop and the plain definition."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny import make_inputs, make_model

from leantune import fisher as fisher_module
from leantune.errors import ConfigError
from leantune.fisher import fisher_scores, strip_padding


def padded_batches(family: str, count: int = 3, size: int = 4) -> list[dict[str, torch.Tensor]]:
    """Batches whose rows have different real lengths (right padding), as a tokenizer pads a batch; one real
    token is the padding id (0), whose embedding row ``nn.Embedding(padding_idx=0)`` never trains."""
    batches = []
    for seed in range(count):
        batch = make_inputs(family, batch=size, seed=seed)
        if "input_ids" in batch:
            batch["input_ids"][0, 1] = 0
        if "attention_mask" in batch:
            for row in range(size):
                batch["attention_mask"][row, 7 - row % 3:] = 0
        batches.append(batch)
    return batches


def reference_scores(model: torch.nn.Module, params: dict[str, torch.nn.Parameter], batches: list[dict],
                     limit: int) -> dict[str, torch.Tensor]:
    """The definition: one backward per padded batch-1 slice, squared gradients summed."""
    model.eval()
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    seen = 0
    for batch in batches:
        for row in range(next(iter(batch.values())).shape[0]):
            if seen == limit:
                return sums
            loss = model(**{k: v[row:row + 1] for k, v in batch.items()}).loss
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for name, grad in zip(params, grads):
                if grad is not None:
                    sums[name] += grad.square()
            seen += 1
    return sums


def assert_same_scores(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal to 1e-5 of the largest score (some scores are pure rounding noise: a key bias has zero gradient)."""
    assert set(actual) == set(expected)
    scale = max(float(v.abs().max()) for v in expected.values())
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_vectorised_equals_loop_equals_definition(family: str, caplog) -> None:
    model = make_model(family)
    params = dict(model.named_parameters())
    batches = padded_batches(family)
    expected = reference_scores(model, params, batches, limit=10)
    with caplog.at_level(logging.INFO, logger="leantune.fisher"):
        vectorised = fisher_scores(model, params, batches, num_samples=10, batch_size=4, progress=False)
        loop = fisher_scores(model, params, batches, num_samples=10, batch_size=1, progress=False)
    assert "vectorised, 4 at a time" in caplog.text and "one per backward" in caplog.text
    assert_same_scores(vectorised, expected)
    assert_same_scores(loop, expected)


@pytest.mark.parametrize("grad_type", ["square", "absolute"])
def test_expected_fisher_vectorised_equals_loop(grad_type: str) -> None:
    model = make_model("bert")
    params = {n: p for n, p in model.named_parameters() if "layer.1" in n or "classifier" in n}
    batches = padded_batches("bert")
    loop = fisher_scores(model, params, batches, 9, "expected", grad_type, batch_size=1, progress=False)
    vectorised = fisher_scores(model, params, batches, 9, "expected", grad_type, batch_size=3, progress=False)
    assert_same_scores(vectorised, loop)


def test_falls_back_to_the_loop_where_vmap_cannot_run_the_model(caplog) -> None:
    model = make_model("deberta-v2")  # its loss indexes with labels.nonzero(): no vmap batching rule
    params = {n: p for n, p in model.named_parameters() if "encoder.layer.0" in n}
    batches = padded_batches("deberta-v2", count=2)
    with caplog.at_level(logging.INFO, logger="leantune.fisher"):
        scores = fisher_scores(model, params, batches, num_samples=8, batch_size=4, progress=False)
    assert "cannot run under torch.func.vmap" in caplog.text
    assert_same_scores(scores, reference_scores(model, params, batches, limit=8))


def test_tied_parameters_under_two_names_share_one_score() -> None:
    model = make_model("t5")
    shared = model.shared.weight
    assert model.encoder.embed_tokens.weight is shared
    params = {"shared.weight": shared, "encoder.embed_tokens.weight": shared,
              "encoder.block.0.layer.0.SelfAttention.q.weight": model.encoder.block[0].layer[0].SelfAttention.q.weight}
    batches = padded_batches("t5", count=1)
    scores = fisher_scores(model, params, batches, num_samples=4, batch_size=4, progress=False)
    assert scores["shared.weight"] is scores["encoder.embed_tokens.weight"]
    expected = reference_scores(model, {k: v for k, v in params.items() if k != "encoder.embed_tokens.weight"},
                                batches, limit=4)
    assert_same_scores({k: v for k, v in scores.items() if k != "encoder.embed_tokens.weight"}, expected)


def test_restores_mode_and_flags_and_leaves_no_gradients() -> None:
    model = make_model("bert").train()
    params = dict(model.named_parameters())
    for name, param in params.items():
        param.requires_grad_("classifier" in name)
    fisher_scores(model, params, padded_batches("bert", count=1), num_samples=4, batch_size=2, progress=False)
    assert model.training
    assert all(p.requires_grad == ("classifier" in n) for n, p in params.items())
    assert all(p.grad is None for p in model.parameters())


def test_strip_padding_cuts_trailing_padding_only() -> None:
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    right = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0, 0]]), "labels": torch.tensor([2])}
    stripped = strip_padding(right)
    assert stripped["input_ids"].tolist() == [[5, 6, 7]] and stripped["attention_mask"].tolist() == [[1, 1, 1]]
    assert stripped["labels"].tolist() == [2]
    left = {"input_ids": ids, "attention_mask": torch.tensor([[0, 0, 1, 1, 1]])}
    assert strip_padding(left) is left
    causal = {"input_ids": ids, "attention_mask": right["attention_mask"],
              "labels": torch.tensor([[5, 6, 7, -100, -100]])}
    assert strip_padding(causal)["labels"].tolist() == [[5, 6, 7]]
    labelled_padding = {**causal, "labels": ids}  # a loss on the padding: the example must stay as it is
    assert strip_padding(labelled_padding) is labelled_padding
    assert strip_padding(causal, labels_aligned=False)["labels"].shape == (1, 5)  # decoder targets: not cut


def test_default_batch_size_is_capped_by_the_gradient_memory_budget(monkeypatch) -> None:
    model = make_model("bert")
    params = dict(model.named_parameters())
    accumulator = fisher_module._Accumulator(model, params, "empirical", torch.square)
    per_example = 4 * sum(p.numel() for p in params.values())
    monkeypatch.setitem(fisher_module.DEFAULT_BATCH_SIZE, "cpu", 4)
    monkeypatch.setattr(fisher_module, "GRADIENT_MEMORY_BUDGET", 3 * per_example)
    assert accumulator.batch_size(None) == 3
    monkeypatch.setattr(fisher_module, "GRADIENT_MEMORY_BUDGET", per_example // 2)
    assert accumulator.batch_size(None) == 1
    assert accumulator.batch_size(7) == 7
    monkeypatch.setitem(fisher_module.DEFAULT_BATCH_SIZE, "cpu", 1)  # the CPU default: the per-example loop
    monkeypatch.setattr(fisher_module, "GRADIENT_MEMORY_BUDGET", 1 << 30)
    assert accumulator.batch_size(None) == 1


def test_bad_batch_size_and_empty_data_are_refused() -> None:
    model = make_model("bert")
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        fisher_scores(model, dict(model.named_parameters()), [], 4, batch_size=0)
    with pytest.raises(ConfigError, match="hold no examples"):
        fisher_scores(model, dict(model.named_parameters()), [], 4, progress=False)


def test_a_hidden_training_phase_hides_the_fisher_progress_bar(monkeypatch, capsys) -> None:
    from leantune.train.loop import phase

    monkeypatch.setattr(fisher_module, "PROGRESS_DELAY_S", 0.0)
    model = make_model("bert")
    params = {n: p for n, p in model.named_parameters() if n.endswith("bias")}
    with phase("initialising", show=False):
        fisher_scores(model, params, padded_batches("bert"), 4)
    assert "Fisher scores" not in capsys.readouterr().err
    with phase("initialising", show=True):
        fisher_scores(model, params, padded_batches("bert"), 4)
    err = capsys.readouterr().err
    assert "Fisher scores" in err and "initialising: done in" in err
