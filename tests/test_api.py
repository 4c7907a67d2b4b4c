"""The public API contract: configs, registry, errors, save/load checks, parameter counts."""

from __future__ import annotations

import json
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_inputs, make_model
from torch import nn

import leantune
from leantune.backbones import ArchitectureMap, StackSpec, resolve, supported_families
from leantune.errors import CheckpointError, ConfigError, UnsupportedMethodError, UnsupportedModelError


def test_methods_lists_registered_baselines() -> None:
    assert {"full", "bitfit", "layernorm", "lora", "adapter", "prompt"} <= set(leantune.methods())


def test_make_config_builds_the_method_config() -> None:
    config = leantune.make_config("lora", r=4, alpha=16)
    assert isinstance(config, leantune.LoRAConfig) and config.r == 4 and config.alpha == 16


def test_every_config_field_has_help() -> None:
    for name in leantune.methods():
        config_class = leantune.make_config(name).__class__
        assert all(text.strip() for text in config_class.help().values()), name


def test_unknown_option_names_it_and_lists_valid_ones() -> None:
    with pytest.raises(TypeError, match=r"'rank'.*valid options: .*\br\b.*alpha"):
        leantune.make_config("lora", rank=4)


def test_unknown_method() -> None:
    with pytest.raises(UnsupportedMethodError, match="unknown method 'nope'.*lora"):
        leantune.make_config("nope")


@pytest.mark.parametrize(
    "method,options,field",
    [
        ("lora", {"r": 0}, "r"),
        ("lora", {"r": -2}, "r"),
        ("lora", {"dropout": 1.5}, "dropout"),
        ("adapter", {"reduction_factor": 0}, "reduction_factor"),
        ("adapter", {"activation": "swish"}, "activation"),
        ("adapter", {"placement": "middle"}, "placement"),
        ("prompt", {"num_tokens": 0}, "num_tokens"),
        ("prompt", {"init": "zeros"}, "init"),
    ],
)
def test_invalid_value_names_field_and_value(method: str, options: dict, field: str) -> None:
    value = next(iter(options.values()))
    with pytest.raises(ValueError, match=rf"{field}.*{value!r}".replace("(", r"\(").replace(")", r"\)")):
        leantune.make_config(method, **options)


def test_target_module_missing_from_model() -> None:
    with pytest.raises(ValueError, match=r"target_modules: no module named 'q_proj'"):
        leantune.wrap(make_model("bert"), leantune.LoRAConfig(target_modules=["q_proj"]))


def test_target_module_that_is_not_linear() -> None:
    with pytest.raises(ValueError, match=r"target_modules: .*LayerNorm"):
        leantune.wrap(make_model("bert"), leantune.LoRAConfig(target_modules=["attention.output.LayerNorm"]))


def test_modules_to_save_missing_from_model() -> None:
    with pytest.raises(ValueError, match=r"modules_to_save: no module named 'head9'"):
        leantune.wrap(make_model("bert"), leantune.LoRAConfig(modules_to_save=["head9"]))


def test_wrap_rejects_a_non_config() -> None:
    with pytest.raises(TypeError, match="method config"):
        leantune.wrap(make_model("bert"), {"method": "lora"})


def test_print_trainable_parameters_uses_peft_format(capsys) -> None:
    tuned = leantune.wrap(make_model("bert"), leantune.LoRAConfig(r=2, train_head=False))
    trainable, total = tuned.trainable_parameter_count()
    assert trainable == sum(p.numel() for n, p in tuned.named_parameters() if ".lora." in n)
    assert total == sum(p.numel() for p in tuned.parameters())
    tuned.print_trainable_parameters()
    percent = 100 * trainable / total
    expected = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"
    assert capsys.readouterr().out.strip() == expected


def test_wrapper_forwards_attributes_to_base_model() -> None:
    tuned = leantune.wrap(make_model("bert"), leantune.LoRAConfig())
    assert tuned.config is tuned.base_model.config
    assert tuned.method_config.r == 8


# --- architecture map -------------------------------------------------------------------------------


class Toy(nn.Module):
    """A model no built-in map knows."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "toy", "to_dict": lambda self: {}, "num_attention_heads": 2})()
        self.embeddings = nn.Embedding(10, 8)
        self.layers = nn.ModuleList(nn.ModuleDict({"attn": nn.Linear(8, 8), "fc": nn.Linear(8, 8)}) for _ in range(2))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(input_ids)
        for layer in self.layers:
            h = h + layer["attn"](h)
            h = h + layer["fc"](h)
        return h


TOY_MAP = ArchitectureMap(
    family="toy", model_types=("toy",), kind="encoder",
    stacks=(StackSpec("encoder", "layers", "embeddings", {
        "attention": ("attn",), "query": ("attn",), "value": ("attn",), "attention_output": ("attn",),
        "ffn_output": ("fc",)}),),
)


def test_unsupported_model_lists_families_and_shows_custom_map() -> None:
    with pytest.raises(UnsupportedModelError) as info:
        leantune.wrap(Toy(), leantune.LoRAConfig())
    message = str(info.value)
    assert "'toy'" in message and "architecture=" in message
    assert all(family in message for family in supported_families())


def test_custom_map_is_used() -> None:
    torch.manual_seed(0)
    toy = Toy()
    tuned = leantune.wrap(toy, leantune.make_config("adapter", reduction_factor=4, zero_init_up=False),
                          architecture=TOY_MAP)
    assert sum(1 for n, _ in tuned.named_modules() if n.endswith(".branches.adapter")) == 4
    out = tuned(torch.tensor([[1, 2, 3]]))
    assert out.shape == (1, 3, 8)


def test_map_reports_sizes() -> None:
    t5 = resolve(make_model("t5"))
    assert list(t5.stacks) == ["encoder", "decoder"]
    assert t5.num_layers == 2 and t5.stacks["encoder"].hidden_size == 32 and t5.stacks["decoder"].num_heads == 4
    assert t5.lm_head()[0] == "lm_head"
    cross = t5.stacks["decoder"].blocks[1].get("cross_attention_output")[0]
    assert cross == "decoder.block.1.layer.1.EncDecAttention.o"
    bert = resolve(make_model("bert"))
    assert bert.base_prefix == "bert" and [n for n, _ in bert.task_heads()] == ["classifier"]
    assert bert.blocks()[0].get("query")[0] == "bert.encoder.layer.0.attention.self.query"
    swin = resolve(make_model("swin"))
    assert [b.hidden_size for b in swin.blocks()] == [16, 32]
    clip = resolve(make_model("clip"))
    assert set(clip.stacks) == {"vision", "text"}


# --- save / load errors -----------------------------------------------------------------------------


@pytest.fixture()
def saved(tmp_path):
    tuned = leantune.wrap(make_model("bert"), leantune.LoRAConfig(r=2))
    tuned.save_pretrained(tmp_path)
    return tmp_path


def test_saved_config_records_method_options_version_fingerprint(saved) -> None:
    record = json.loads((saved / "leantune_config.json").read_text())
    assert record["method"] == "lora" and record["options"]["r"] == 2
    assert record["leantune_version"] == leantune.__version__
    assert set(record["base_model"]) >= {"model_type", "config_sha256", "parameters_sha256"}
    names = set(load_file(saved / "delta.safetensors"))
    assert names and all(".lora." in n or ".classifier." in n for n in names)


def test_load_rejects_another_base_model(saved) -> None:
    other = make_model("roberta")
    with pytest.raises(CheckpointError, match="saved from another base model.*model_type"):
        leantune.load(other, saved)


def _tiny_bert(**changes: int):
    import transformers as hf

    sizes = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64, num_labels=3)
    return hf.BertForSequenceClassification(hf.BertConfig(**{**sizes, **changes}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_labels": 5}, "num_labels: saved 3, this model 5"),
        ({"hidden_size": 64}, "hidden_size: saved 32, this model 64"),
        ({"num_hidden_layers": 3}, "num_hidden_layers: saved 2, this model 3"),
    ],
)
def test_load_onto_another_config_names_the_differing_entries(saved, changes, message) -> None:
    with pytest.raises(CheckpointError, match="saved from another base model") as raised:
        leantune.load(_tiny_bert(**changes), saved)
    assert message in str(raised.value) and "sha256" not in str(raised.value)


def test_load_onto_another_class_names_the_classes(saved) -> None:
    with pytest.raises(CheckpointError, match="model_class: saved BertForSequenceClassification, this model "
                                              "RobertaForSequenceClassification; model_type: saved bert"):
        leantune.load(make_model("roberta"), saved)


def test_old_records_without_config_values_still_load_and_report_hashes(saved) -> None:
    path = saved / "leantune_config.json"
    record = json.loads(path.read_text())
    del record["base_model"]["config_values"]
    path.write_text(json.dumps(record))
    leantune.load(make_model("bert"), saved)  # the same base: accepted
    with pytest.raises(CheckpointError, match="config_sha256: saved '[0-9a-f]{64}'"):
        leantune.load(_tiny_bert(num_labels=5), saved)


def test_saved_files_have_the_mode_of_a_plain_file(saved, tmp_path_factory) -> None:
    plain = tmp_path_factory.mktemp("plain") / "plain.txt"
    plain.write_text("x")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in saved.iterdir()}
    assert modes == {"delta.safetensors": stat.S_IMODE(plain.stat().st_mode),
                     "leantune_config.json": stat.S_IMODE(plain.stat().st_mode)}


def test_load_rejects_missing_files(saved, tmp_path_factory) -> None:
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(CheckpointError, match="leantune_config.json is missing"):
        leantune.load(make_model("bert"), empty)
    (saved / "delta.safetensors").unlink()
    with pytest.raises(CheckpointError, match="delta.safetensors is missing"):
        leantune.load(make_model("bert"), saved)


def test_load_rejects_truncated_delta(saved) -> None:
    path = saved / "delta.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        leantune.load(make_model("bert"), saved)


def test_load_rejects_flipped_bytes(saved) -> None:
    path = saved / "delta.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        leantune.load(make_model("bert"), saved)


def test_load_rejects_corrupt_config(saved) -> None:
    (saved / "leantune_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="leantune_config.json is not valid JSON"):
        leantune.load(make_model("bert"), saved)


def test_load_rejects_unknown_method(saved) -> None:
    path = saved / "leantune_config.json"
    record = json.loads(path.read_text())
    record["method"] = "telepathy"
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="unknown method 'telepathy'"):
        leantune.load(make_model("bert"), saved)


def test_load_rejects_delta_with_wrong_keys(saved) -> None:
    path = saved / "delta.safetensors"
    tensors = load_file(path)
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, path)
    record_path = saved / "leantune_config.json"
    record = json.loads(record_path.read_text())
    from leantune.files import sha256_file as _sha256_file

    record["delta_sha256"] = _sha256_file(path)
    record_path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="missing"):
        leantune.load(make_model("bert"), saved)


def test_save_is_atomic_and_leaves_no_temporary_files(saved) -> None:
    assert sorted(p.name for p in saved.iterdir()) == ["delta.safetensors", "leantune_config.json"]


def test_loaded_model_matches_and_only_delta_is_saved(saved) -> None:
    restored = leantune.load(make_model("bert"), saved)
    base_params = sum(p.numel() for p in make_model("bert").parameters())
    saved_params = sum(t.numel() for t in load_file(saved / "delta.safetensors").values())
    assert saved_params < base_params / 4
    out = restored(**make_inputs("bert"))
    assert out.logits.shape == (2, 3)


def test_wrap_with_a_saved_delta_skips_data_driven_init_and_refuses_data_too() -> None:
    config = leantune.make_config("lst", init="fisher")
    with pytest.raises(ConfigError):  # Fisher init without data
        leantune.wrap(make_model("bert"), config)
    reference = leantune.wrap(make_model("bert"), leantune.make_config("lst", init="random"))
    saved = reference.delta_state_dict()
    resumed = leantune.wrap(make_model("bert"), config, saved=saved)
    assert set(resumed.delta_state_dict()) == set(saved)
    with pytest.raises(ValueError, match="not both"):
        leantune.wrap(make_model("bert"), config, data=[make_inputs("bert")], saved=saved)
