"""A method defined outside leantune (tests/plugins/toy_scale.py), found as a plugin and used through every door:
make_config, wrap, save_pretrained/load, merge, ``leantune train`` (in-process), ``leantune compare`` (which
trains it in a sub-process) and ``leantune bench memory``; no file of leantune knows about it."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from tiny import make_inputs, make_model

import leantune
from leantune import registry
from leantune.cli import build_parser, main
from leantune.commands.compare import child_environment
from leantune.commands.train import spec_from_args
from leantune.errors import ConfigError, UnknownOptionError
from leantune.methods.base import TuningMethod
from leantune.registry import ENTRY_POINT_GROUP, PLUGINS_VARIABLE, PluginError, is_builtin
from leantune.train.run import RunSpec

PLUGINS = Path(__file__).parent / "plugins"
REVIEWS = Path(__file__).parent / "fixtures" / "local" / "reviews.csv"
FAST = ["--no-progress", "--no-baselines", "--no-measure-memory", "--batch-size", "4", "--epochs", "2",
        "--max-length", "24"]


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> type[TuningMethod]:
    """``LEANTUNE_PLUGINS=toy_scale`` with tests/plugins on the import path, here and in sub-processes."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv(PLUGINS_VARIABLE, "toy_scale")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(PLUGINS), os.environ.get("PYTHONPATH")) if p))
    return leantune.get_method("toy_scale")


def trained_copy(base: torch.nn.Module, steps: int = 3) -> leantune.TunedModel:
    tuned = leantune.wrap(copy.deepcopy(base), leantune.make_config("toy_scale"))
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=5e-2)
    tuned.train()
    for step in range(steps):
        tuned(**make_inputs("bert", seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return tuned.eval()


def test_plugin_is_registered_with_its_config_and_facts(plugin) -> None:
    assert "toy_scale" in leantune.methods() and not is_builtin("toy_scale") and is_builtin("lora")
    config = leantune.make_config("toy_scale", init_scale=0.1)
    assert isinstance(config, plugin.config_class) and config.init_scale == 0.1
    assert all(config.help().values()), "every option has a help text"
    with pytest.raises(UnknownOptionError, match="'scale'"):
        leantune.make_config("toy_scale", scale=1)
    with pytest.raises(ConfigError, match="sublayers"):
        leantune.make_config("toy_scale", sublayers=["nowhere"])
    assert plugin.mergeable and plugin.default_learning_rate == 2e-2


def test_wrap_identity_at_init_and_only_scales_and_head_train(plugin) -> None:
    base = make_model("bert").eval()
    tuned = leantune.wrap(copy.deepcopy(base), leantune.make_config("toy_scale")).eval()
    inputs = make_inputs("bert")
    with torch.no_grad():
        assert torch.equal(tuned(**inputs).logits, base(**inputs).logits)
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    scales = {n for n in trainable if n.endswith(".output.dense.branches.toy_scale.scale")}
    assert len(scales) == base.config.num_hidden_layers
    assert trainable - scales == {"base_model.classifier.weight", "base_model.classifier.bias"}


def test_save_load_gives_identical_outputs_and_merge_is_exact(plugin, tmp_path: Path) -> None:
    base = make_model("bert").eval()
    tuned = trained_copy(base)
    scales = [p for n, p in tuned.named_parameters() if n.endswith("toy_scale.scale")]
    assert all(s.abs().max() > 0 for s in scales), "training moved every scale away from 0"
    tuned.save_pretrained(tmp_path)
    restored = leantune.load(make_model("bert"), tmp_path).eval()
    inputs = make_inputs("bert", seed=7)
    with torch.no_grad():
        expected = tuned(**inputs).logits
        assert torch.equal(restored(**inputs).logits, expected)
        assert not torch.allclose(base(**inputs).logits, expected)
        merged = restored.merge()
        assert type(merged).__module__.startswith("transformers.")
        assert not any(".branches" in name for name, _ in merged.named_modules())
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=0, atol=1e-6)


def test_train_on_the_command_line_uses_the_method_defaults(plugin, tmp_path: Path, tiny_bert_dir: Path,
                                                            capsys) -> None:
    run_dir = tmp_path / "run"
    assert main(["train", "--method", "toy_scale", "--model", str(tiny_bert_dir), "--data", str(REVIEWS),
                 "--output-dir", str(run_dir), *FAST]) == 0
    spec = RunSpec.read(run_dir)
    assert spec.method == "toy_scale" and spec.options == {} and "learning_rate" not in spec.train
    assert spec.train_config().learning_rate == plugin.default_learning_rate
    saved = json.loads((run_dir / "best" / "leantune_config.json").read_text())
    assert saved["method"] == "toy_scale" and saved["options"]["sublayers"] == ["feed_forward"]
    results = json.loads((run_dir / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    assert f"test accuracy {results['test_metric']:.4f}" in capsys.readouterr().out


def test_embedded_default_takes_the_budget_options(plugin) -> None:
    args = build_parser().parse_args(["train", "--method", "toy_scale"])
    spec = spec_from_args(args, args.method)
    assert spec.options == plugin.budget_options
    assert spec.train_config().learning_rate == plugin.default_learning_rate


def test_compare_trains_the_plugin_in_a_subprocess(plugin, tmp_path: Path, tiny_bert_dir: Path, capsys) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "toy_scale", "--model", str(tiny_bert_dir), "--data", str(REVIEWS),
                 "--set", "toy_scale.init_scale=0.01", "--output-dir", str(out), *FAST]) == 0
    report = json.loads((out / "compare.json").read_text())
    [row] = report["rows"]
    assert row["method"] == "toy_scale" and "error" not in row
    assert row["test_metric"] == json.loads((out / "toy_scale" / "results.json").read_text())["test_metric"]
    spec = RunSpec.read(out / "toy_scale")
    assert spec.options == {"init_scale": 0.01} and spec.train_config().learning_rate == plugin.default_learning_rate


def test_compare_passes_a_method_registered_by_import_to_its_subprocesses(plugin, monkeypatch) -> None:
    monkeypatch.delenv(PLUGINS_VARIABLE)
    monkeypatch.delenv("PYTHONPATH")
    environment = child_environment(["lora", "toy_scale"])
    assert environment[PLUGINS_VARIABLE] == "toy_scale"
    assert environment["PYTHONPATH"].split(os.pathsep) == [str(PLUGINS.resolve())]


def test_bench_memory_takes_a_registered_method_name(plugin, capsys) -> None:
    assert main(["bench", "memory", "--methods", "toy_scale", "--model", "t5-tiny", "--batch-size", "2",
                 "--source-length", "8", "--target-length", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["methods"]
    assert list(rows) == ["full", "toy_scale"]
    # t5-tiny: 2 encoder + 2 decoder blocks, one scale per channel (d_model 64) of each feed-forward output.
    assert rows["toy_scale"]["trainable_params"] == 4 * 64
    assert rows["toy_scale"]["paper_percent_of_full"] is None
    assert rows["toy_scale"]["peak_bytes"] < rows["full"]["peak_bytes"]


def test_a_plugin_that_cannot_be_imported_is_one_line(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv(PLUGINS_VARIABLE, "toy_scale_missing")
    with pytest.raises(PluginError, match="'toy_scale_missing'"):
        leantune.methods()
    assert main(["train", "--method", "lora", "--output-dir", str(tmp_path / "run")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("leantune train: error: LEANTUNE_PLUGINS names module 'toy_scale_missing'")


@pytest.mark.parametrize("value", ["toy_scale", "toy_scale:ToyScale"])
def test_entry_points_register_a_module_or_a_class(monkeypatch, value: str) -> None:
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.delenv(PLUGINS_VARIABLE, raising=False)
    found = [importlib.metadata.EntryPoint("toy_scale", value, ENTRY_POINT_GROUP)]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: found if group == ENTRY_POINT_GROUP else [])
    leantune.methods()  # the built-in methods are registered; a fresh discovery must add toy_scale to them
    monkeypatch.setattr(registry, "_DISCOVERED", False)
    monkeypatch.setattr(registry, "_METHODS", {k: v for k, v in registry._METHODS.items() if k != "toy_scale"})
    monkeypatch.setitem(sys.modules, "toy_scale", None)  # import toy_scale afresh here, and forget it afterwards
    monkeypatch.delitem(sys.modules, "toy_scale")
    assert "toy_scale" in leantune.methods() and "lora" in leantune.methods()


def test_an_entry_point_that_cannot_be_imported_is_named(monkeypatch) -> None:
    found = [importlib.metadata.EntryPoint("broken", "toy_scale_nowhere", ENTRY_POINT_GROUP)]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: found if group == ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_DISCOVERED", False)
    with pytest.raises(PluginError, match="entry point 'broken' \\(toy_scale_nowhere\\) cannot be imported"):
        leantune.methods()
    monkeypatch.undo()
    assert "lora" in leantune.methods()
