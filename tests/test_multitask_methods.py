"""Task-aware methods (VL-Adapter family): routing per task, sharing, Hyperformer generation, PHM layers,
VL-Adapter's parameter counts on BART-base dimensions, identity at init, save/load and merge."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as hf
from tiny import make_inputs, make_model

import leantune
from leantune.context import UnknownTaskError
from leantune.errors import UnsupportedMethodError
from leantune.layers.phm import PHMLinear

TASKS = ["vqa", "gqa", "nlvr"]
# (method, options) pairs that route by task; each trains on a 3-task setting.
TASK_AWARE = [
    ("adapter", {"sharing": "multiple", "placement": "all"}),
    ("adapter", {"sharing": "half", "placement": "all"}),
    ("adapter", {"sharing": "half", "half_shared": "down"}),
    ("compacter", {"sharing": "multiple"}),
    ("compacter", {"sharing": "single", "shared_phm_rule": True, "factorized_phm": True}),
    ("hyperformer", {}),
    ("lora", {"sharing": "multiple", "train_biases": "all"}),
    ("prompt", {"sharing": "multiple", "reparameterize": True, "num_tokens": 4}),
]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for m, o in TASK_AWARE]


def tuned_model(family: str, method: str, options: dict) -> leantune.TunedModel:
    return leantune.wrap(make_model(family), leantune.make_config(method, tasks=TASKS, **options))


def step(tuned: leantune.TunedModel, family: str, task: str, lr: float = 1e-2, seed: int = 0) -> float:
    """One SGD step on a batch of ``task``; returns the loss before it."""
    params = [p for p in tuned.parameters() if p.requires_grad]
    tuned.train()
    loss = tuned(**make_inputs(family, seed=seed), task=task).loss
    loss.backward()
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= lr * p.grad
                p.grad = None
    return loss.item()


def eval_losses(tuned: leantune.TunedModel, family: str) -> list[float]:
    """Each task's loss on its own fixed batch, without dropout."""
    tuned.eval()
    with torch.no_grad():
        return [tuned(**make_inputs(family, seed=i), task=task).loss.item() for i, task in enumerate(TASKS)]


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("method,options", TASK_AWARE, ids=IDS)
def test_trains_only_its_parameters_and_the_loss_falls(family: str, method: str, options: dict) -> None:
    tuned = tuned_model(family, method, options)
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    start = eval_losses(tuned, family)
    for i in range(9):
        step(tuned, family, TASKS[i % 3], lr=0.05, seed=i % 3)
    end = eval_losses(tuned, family)
    assert all(e < s for e, s in zip(end, start)), f"a task's loss did not fall: {start} -> {end}"
    for name, param in tuned.named_parameters():
        if name not in trainable:
            assert torch.equal(param, before[name]), f"frozen {name} changed"
            assert param.grad is None


@pytest.mark.parametrize("method,options", TASK_AWARE, ids=IDS)
def test_a_step_on_one_task_leaves_the_other_tasks_own_weights_unchanged(method: str, options: dict) -> None:
    tuned = tuned_model("bart", method, options)
    if method == "hyperformer":  # generated weights: the other tasks' embeddings stay, the shared generators move
        before = tuned.method_modules.task_embeddings.weight.detach().clone()
        generators = tuned.method_modules.stacks["encoder"].generators["feed_forward"]["up_weight"].weight
        generators_before = generators.detach().clone()
        step(tuned, "bart", "gqa")
        step(tuned, "bart", "gqa", seed=1)  # the second step: the up generators start at zero
        after = tuned.method_modules.task_embeddings.weight
        assert not torch.equal(after[1], before[1]) and torch.equal(after[0], before[0])
        assert torch.equal(after[2], before[2]) and not torch.equal(generators, generators_before)
        return
    before = {n: p.detach().clone() for n, p in tuned.named_parameters() if p.requires_grad}
    if options.get("sharing") == "single":
        assert not any(".per_task." in n for n in before), "one set of weights for every task"
        return
    # a half-shared projection is saved once, under the first task's name
    kept = options.get("half_shared", "up") if options.get("sharing") == "half" else None
    shared = {n for n in before if kept is not None and f".per_task.{TASKS[0]}.{kept}." in n}
    own = {task: {n for n in before if f".per_task.{task}." in n} - shared for task in TASKS}
    step(tuned, "bart", "gqa")
    step(tuned, "bart", "gqa", seed=1)  # the second step: zero-initialised up-projections have moved
    moved = {n for n, p in tuned.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert own["gqa"] & moved, "the task's own weights did not move"
    assert not (own["vqa"] | own["nlvr"]) & moved, "another task's own weights moved"
    if shared:
        assert shared & moved, "the shared projection did not move"


def test_half_sharing_shares_one_projection_object_and_saves_it_once() -> None:
    tuned = tuned_model("bart", "adapter", {"sharing": "half"})
    module = tuned.backbone.stacks["encoder"].blocks[0].get("ffn_output")[1]
    per_task = module.branches["adapter"]
    assert per_task.shared_modules() == {"up"}
    ups = {id(per_task.per_task[t].up) for t in TASKS}
    downs = {id(per_task.per_task[t].down) for t in TASKS}
    assert len(ups) == 1 and len(downs) == 3
    names = [n for n in tuned.delta_state_dict() if "encoder.layers.0.fc2.branches" in n]
    assert sorted(n.split("branches.adapter.")[1] for n in names) == sorted(
        [f"per_task.{t}.down.{p}" for t in TASKS for p in ("weight", "bias")] + ["per_task.vqa.up.weight",
                                                                                 "per_task.vqa.up.bias"])


@pytest.mark.parametrize("method,options", TASK_AWARE, ids=IDS)
def test_unknown_and_missing_tasks_are_refused(method: str, options: dict) -> None:
    tuned = tuned_model("t5", method, options).eval()
    with pytest.raises(UnknownTaskError, match="'caption'.*vqa, gqa, nlvr"):
        tuned(**make_inputs("t5"), task="caption")
    if options.get("sharing") != "single":
        with pytest.raises(leantune.errors.ConfigError, match="needs 'task'"):
            tuned(**make_inputs("t5"))
    with torch.no_grad():
        by_index = tuned(**make_inputs("t5"), task=1).logits
        by_name = tuned(**make_inputs("t5"), task="gqa").logits
    torch.testing.assert_close(by_index, by_name, rtol=0, atol=0)


@pytest.mark.parametrize("method,options", [c for c in TASK_AWARE if c[0] != "prompt"], ids=IDS[:-1])
def test_identity_at_init(method: str, options: dict) -> None:
    base = make_model("bart").eval()
    tuned = leantune.wrap(copy.deepcopy(base), leantune.make_config(method, tasks=TASKS, **options)).eval()
    inputs = make_inputs("bart")
    with torch.no_grad():
        for task in TASKS:
            torch.testing.assert_close(tuned(**inputs, task=task).logits, base(**inputs).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,options", TASK_AWARE, ids=IDS)
def test_save_load_restores_every_task(method: str, options: dict, tmp_path) -> None:
    tuned = tuned_model("t5", method, options)
    for i, task in enumerate(TASKS):
        step(tuned, "t5", task, lr=0.1, seed=i)
    tuned.save_pretrained(tmp_path)
    restored = leantune.load(make_model("t5"), tmp_path).eval()
    tuned.eval()
    inputs = make_inputs("t5", seed=5)
    with torch.no_grad():
        outputs = {task: tuned(**inputs, task=task).logits for task in TASKS}
        for task in TASKS:
            torch.testing.assert_close(restored(**inputs, task=task).logits, outputs[task], rtol=0, atol=0)
    if options.get("sharing") != "single":
        assert not torch.allclose(outputs["vqa"], outputs["gqa"]), "tasks share their weights"


def test_multiple_lora_merges_the_task_it_is_given() -> None:
    tuned = tuned_model("bart", "lora", {"sharing": "multiple"})
    for i, task in enumerate(TASKS):
        step(tuned, "bart", task, lr=0.5, seed=i)
    tuned.eval()
    inputs = make_inputs("bart", seed=3)
    with torch.no_grad():
        expected = tuned(**inputs, task="gqa").logits
    with pytest.raises(UnsupportedMethodError, match="merge\\(task=<name>\\)"):
        copy.deepcopy(tuned).merge()
    merged = tuned.merge(task="gqa").eval()
    assert type(merged) is hf.BartForConditionalGeneration
    assert not any(".branches." in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=0, atol=1e-5)


def test_hyperformer_generates_per_task_and_layer_and_matches_a_hand_computation() -> None:
    tuned = tuned_model("bart", "hyperformer", {"zero_init_up": False})
    shared = tuned.method_modules
    encoder = shared.stacks["encoder"]
    task_embedding = shared.task_embeddings.weight
    weights = {(t, layer): encoder.adapter_weights(task_embedding[t], layer, "feed_forward")
               for t in range(3) for layer in range(2)}
    assert not torch.allclose(weights[0, 0]["down_weight"], weights[1, 0]["down_weight"])
    assert not torch.allclose(weights[0, 0]["down_weight"], weights[0, 1]["down_weight"])

    task, layer = 2, 1
    mlp = encoder.task_mlp
    z = torch.cat([task_embedding[task], encoder.layer_embeddings.weight[layer]])
    z = torch.relu(z @ mlp[0].weight.T + mlp[0].bias) @ mlp[2].weight.T + mlp[2].bias
    z = (z - z.mean()) / torch.sqrt(z.var(unbiased=False) + mlp[3].eps) * mlp[3].weight + mlp[3].bias
    generators = encoder.generators["feed_forward"]
    down_w = (generators["down_weight"].weight @ z + generators["down_weight"].bias).view(encoder.bottleneck, -1)
    up_b = generators["up_bias"].weight @ z + generators["up_bias"].bias
    got = weights[task, layer]
    torch.testing.assert_close(got["down_weight"], down_w)
    torch.testing.assert_close(got["up_bias"], up_b)

    # the adapter the model runs at that position uses exactly those weights
    module = tuned.backbone.stacks["encoder"].blocks[layer].get("ffn_output")[1]
    h = torch.randn(2, 3, module.out_features)
    expected = torch.nn.functional.linear(
        torch.nn.functional.gelu(torch.nn.functional.linear(h, got["down_weight"], got["down_bias"]),
                                 approximate="tanh"), got["up_weight"], got["up_bias"])
    with leantune.context.call_inputs({"task": "nlvr"}):
        torch.testing.assert_close(module.branches["hyperformer"](h), expected)


@pytest.mark.parametrize("rank", [None, 2])
def test_phm_layer_equals_its_explicit_kronecker_sum(rank: int | None) -> None:
    torch.manual_seed(0)
    layer = PHMLinear(8, 6, n=2, rank=rank)
    with torch.no_grad():
        layer.bias.normal_()
    factors = layer.factors()
    weight = sum(torch.kron(layer.rule[i], factors[i]) for i in range(2))
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(layer(x), x @ weight + layer.bias)


def bart_base() -> torch.nn.Module:
    """BART-base dimensions with VL-Adapter's 200 added tokens, on the meta device (no memory, no download)."""
    config = hf.BartConfig(vocab_size=50265 + 200, d_model=768, encoder_layers=6, decoder_layers=6,
                           encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                           decoder_ffn_dim=3072)
    with torch.device("meta"):
        return hf.BartForConditionalGeneration(config)


def added_parameters(tuned: leantune.TunedModel) -> int:
    return sum(p.numel() for n, p in tuned.named_parameters() if ".branches." in n or n.startswith("method_modules"))


@pytest.mark.parametrize("method,options,per_position", [
    ("adapter", {"reduction_factor": 8, "placement": "all"}, 148_320),
    ("compacter", {}, 74_608),
])
def test_vl_adapter_sizes_on_bart_base(method: str, options: dict, per_position: int) -> None:
    tuned = leantune.wrap(bart_base(), leantune.make_config(method, **options))
    assert added_parameters(tuned) == 30 * per_position


def test_hyperformer_controller_sizes_on_bart_base() -> None:
    tuned = leantune.wrap(bart_base(), leantune.make_config("hyperformer", tasks=["vqa", "gqa", "nlvr", "caption"]))
    stacks = tuned.method_modules.stacks
    assert sum(p.numel() for p in stacks["encoder"].parameters()) == 2_805_080
    assert sum(p.numel() for p in stacks["decoder"].parameters()) == 4_139_960
    assert tuned.method_modules.task_embeddings.weight.numel() == 2_048
