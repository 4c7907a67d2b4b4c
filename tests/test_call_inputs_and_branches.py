"""The v2 core: per-call inputs reach inserted modules (forward and every generate step), several named branches
sit on one module and round-trip through save/load, and typed config checks."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from tiny import make_inputs, make_model
from torch import nn

import leantune
from leantune import context, registry
from leantune.backbones import Backbone, linear_in_out
from leantune.config import MethodConfig, option
from leantune.context import CallInput, MissingCallInputError
from leantune.errors import ConfigError, UnknownOptionError
from leantune.layers.adapter import BottleneckAdapter, linear_projection
from leantune.layers.lora import LoRABranch
from leantune.methods.base import AttachContext, Branch, TuningMethod, add_branch, get_branches, remove_branch

TASKS = ("vqa", "caption")


class TaskShift(Branch):
    """Adds a learned vector per task to a projection's output and records every task it was called with."""

    def __init__(self, width: int, seen: list[str]) -> None:
        super().__init__()
        self.shift = nn.ParameterDict({task: nn.Parameter(torch.zeros(width)) for task in TASKS})
        self.seen = seen

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        task = context.get("task")
        self.seen.append(task)
        return self.shift[task].expand_as(output)


@dataclass
class TaskShiftConfig(MethodConfig):
    method = "test_task_shift"
    width_hint: int = option(0, "Unused; a field so the config has an option of its own.")


class TaskShiftMethod(TuningMethod):
    name = "test_task_shift"
    config_class = TaskShiftConfig
    call_inputs: ClassVar = (CallInput("task", "the batch's task name"),)

    def attach(self, model: nn.Module, backbone: Backbone, attach_context: AttachContext) -> None:
        self.seen: list[str] = []
        for _, module in backbone.modules_for_role("attention_output"):
            add_branch(module, "task_shift", TaskShift(linear_in_out(module)[1], self.seen))


@dataclass
class TwoBranchesConfig(MethodConfig):
    method = "test_two_branches"
    r: int = option(2, "LoRA rank.")


class TwoBranchesMethod(TuningMethod):
    """A LoRA branch and an adapter on the same projections."""

    name = "test_two_branches"
    config_class = TwoBranchesConfig

    def attach(self, model: nn.Module, backbone: Backbone, attach_context: AttachContext) -> None:
        for _, module in backbone.modules_for_role("attention_output"):
            d_in, d_out = linear_in_out(module)
            add_branch(module, "lora", LoRABranch(d_in, d_out, self.config.r, 4.0, 0.0, module.weight))
            add_branch(module, "adapter", BottleneckAdapter(d_out, 4, "relu", linear_projection(module.weight)))


@pytest.fixture
def test_methods() -> Iterator[None]:
    for method in (TaskShiftMethod, TwoBranchesMethod):
        registry.register(method)
    yield
    for method in (TaskShiftMethod, TwoBranchesMethod):
        registry._METHODS.pop(method.name)


def randomised(tuned: leantune.TunedModel, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def test_branch_reads_the_task_in_forward_and_every_generate_step(test_methods) -> None:
    tuned = leantune.wrap(make_model("t5"), leantune.make_config("test_task_shift")).eval()
    randomised(tuned)
    inputs = make_inputs("t5")
    with torch.no_grad():
        vqa = tuned(**inputs, task="vqa").logits
        caption = tuned(**inputs, task="caption").logits
    assert not torch.allclose(vqa, caption), "the task did not change the output"
    assert set(tuned.method.seen) == {"vqa", "caption"}

    tuned.method.seen.clear()
    steps = 5
    generated = tuned.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               task="caption", max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    assert generated.shape[1] == steps + 1
    decoder_branches = len(tuned.backbone.stacks["decoder"].blocks)
    # the encoder once, then every decoder layer at every step, all with the call's task
    assert len(tuned.method.seen) >= steps * decoder_branches
    assert set(tuned.method.seen) == {"caption"}
    with pytest.raises(MissingCallInputError, match="'task'"):
        context.get("task")  # the call's values are gone after it


def test_missing_required_call_input_is_refused(test_methods) -> None:
    tuned = leantune.wrap(make_model("t5"), leantune.make_config("test_task_shift"))
    with pytest.raises(ConfigError, match="needs 'task'.*the batch's task name"):
        tuned(**make_inputs("t5"))


def test_nested_call_inputs_restore_the_outer_values() -> None:
    with context.call_inputs({"task": "a", "size": 2}):
        with context.call_inputs({"task": "b"}):
            assert context.get("task") == "b" and context.get("size") == 2
        assert context.get("task") == "a"
    assert context.get("task", None) is None


def test_two_named_branches_on_one_module_compose_and_round_trip(test_methods, tmp_path) -> None:
    base = make_model("bert").eval()
    tuned = leantune.wrap(copy.deepcopy(base), leantune.make_config("test_two_branches")).eval()
    randomised(tuned, seed=1)
    block = tuned.backbone.stacks["encoder"].blocks[0]
    _, projection = block.get("attention_output")
    branches = get_branches(projection)
    assert list(branches) == ["lora", "adapter"]

    x = torch.randn(2, 5, projection.in_features)
    with torch.no_grad():
        plain = nn.functional.linear(x, projection.weight, projection.bias)
        with_lora = plain + branches["lora"](x)
        torch.testing.assert_close(projection(x), with_lora + branches["adapter"](with_lora))

    names = set(tuned.delta_state_dict())
    assert any(".branches.lora.A.weight" in n for n in names) and any(".branches.adapter.up.bias" in n for n in names)
    tuned.save_pretrained(tmp_path)
    restored = leantune.load(copy.deepcopy(base), tmp_path).eval()
    inputs = make_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(restored(**inputs).logits, tuned(**inputs).logits, rtol=0, atol=0)
        assert not torch.allclose(restored(**inputs).logits, base(**inputs).logits)


def test_removing_branches_removes_the_hook_with_the_last_one() -> None:
    layer = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    expected = layer(x)
    add_branch(layer, "lora", LoRABranch(4, 4, 2, 2.0, 0.0, layer.weight))
    add_branch(layer, "adapter", BottleneckAdapter(4, 2, "relu", linear_projection(layer.weight), zero_init_up=False))
    with pytest.raises(ConfigError, match="already has a branch named 'lora'"):
        add_branch(layer, "lora", LoRABranch(4, 4, 2, 2.0, 0.0, layer.weight))
    copied = copy.deepcopy(layer)
    remove_branch(layer, "adapter")
    assert list(get_branches(layer)) == ["lora"]
    torch.testing.assert_close(layer(x), expected)  # LoRA's B is zero at init
    remove_branch(layer, "lora")
    assert not get_branches(layer) and not layer._forward_hooks and "branches" not in layer._modules
    assert not torch.allclose(copied(x), expected), "the deep copy lost its adapter"
    remove_branch(copied, "adapter"), remove_branch(copied, "lora")
    torch.testing.assert_close(copied(x), expected)


@pytest.mark.parametrize(
    "options,field",
    [({"r": 2.5}, "r"), ({"r": "abc"}, "r"), ({"dropout": "high"}, "dropout"),
     ({"target_modules": "q"}, "target_modules"), ({"train_biases": 1}, "train_biases")],
)
def test_option_types_are_checked_from_annotations(options: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"LoRAConfig\.{field} must be"):
        leantune.make_config("lora", **options)


def test_integers_are_accepted_for_float_options_and_unknown_options_are_named() -> None:
    assert leantune.make_config("lora", alpha=16).alpha == 16
    with pytest.raises(UnknownOptionError, match="'rank'"):
        leantune.make_config("lora", rank=2)
