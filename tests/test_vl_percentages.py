"""VL-Adapter's Table 1 "% updated parameters" on VL-BART, counted from BART-base's config on the meta device (no
download): 100 <extra_id> + 100 <vis_extra_id> tokens added, CLIP RN101 features (2048-d, 36 tokens), and the
denominator counts every parameter, added modules included (VL-Adapter's trainer_base)."""

from __future__ import annotations

import pytest
import torch
import transformers as hf

import leantune
from leantune.vl import VisionLanguageModel

TASKS = ["vqa", "gqa", "nlvr", "caption"]
ADAPTER = {"reduction_factor": 8, "placement": "all", "train_norms": True, "activation": "gelu_new",
           "zero_init_up": False}
LORA = {"r": 128, "alpha": 32, "train_biases": "all"}
PROMPT = {"num_tokens": 40, "reparameterize": True, "reparameterize_hidden": 800, "init": "random"}
MULTIPLE = {"sharing": "multiple", "tasks": TASKS}
TABLE = [
    ("single adapter", "adapter", ADAPTER, 4.18),
    ("multiple adapters", "adapter", {**ADAPTER, **MULTIPLE}, 12.22),
    ("half-shared adapters", "adapter", {**ADAPTER, "sharing": "half", "tasks": TASKS}, 8.36),
    ("hyperformer", "hyperformer", {"tasks": TASKS}, 5.79),
    ("single compacter", "compacter", {}, 2.70),
    ("multiple compacters", "compacter", MULTIPLE, 7.05),
    ("single lora", "lora", LORA, 5.93),
    ("multiple lora", "lora", {**LORA, **MULTIPLE}, 17.71),  # the paper prints 17.72
    ("single prompt", "prompt", PROMPT, 2.00),
    ("multiple prompts", "prompt", {**PROMPT, **MULTIPLE}, 4.53),
]


def vl_bart_base() -> VisionLanguageModel:
    """VL-BART on the meta device: BART-base with 200 added tokens and the visual projection of 2048-d features."""
    config = hf.BartConfig(vocab_size=50265 + 200, d_model=768, encoder_layers=6, decoder_layers=6,
                           encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                           decoder_ffn_dim=3072)
    with torch.device("meta"):
        return VisionLanguageModel(hf.BartForConditionalGeneration(config), feature_dim=2048)


def test_the_base_and_the_projection_have_the_notes_sizes() -> None:
    model = vl_bart_base()
    projection = sum(p.numel() for p in model.visual_projection.parameters())
    assert projection == 1_582_848
    assert sum(p.numel() for p in model.parameters()) - projection == 139_574_016


@pytest.mark.parametrize("row,method,options,percent", TABLE, ids=[row for row, *_ in TABLE])
def test_paper_percentage(row: str, method: str, options: dict, percent: float) -> None:
    tuned = leantune.wrap(vl_bart_base(), leantune.make_config(method, **options))
    trainable, total = tuned.trainable_parameter_count()
    assert round(100 * trainable / total, 2) == pytest.approx(percent, abs=1e-9), f"{row}: {trainable}/{total}"
