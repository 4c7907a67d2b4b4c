"""Tiny random models of every supported family, and matching inputs. No downloads."""

from __future__ import annotations

import torch
import transformers as hf

VOCAB = 96

_BUILDERS = {
    "t5": lambda: hf.T5ForConditionalGeneration(hf.T5Config(
        vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)),
    "bart": lambda: hf.BartForConditionalGeneration(hf.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)),
    "bert": lambda: hf.BertForSequenceClassification(hf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3)),
    "roberta": lambda: hf.RobertaForSequenceClassification(hf.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3, pad_token_id=1)),
    "deberta-v2": lambda: hf.DebertaV2ForSequenceClassification(hf.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3)),
    "vit": lambda: hf.ViTForImageClassification(hf.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=28,
        patch_size=7, num_labels=3)),
    "dinov2": lambda: hf.Dinov2ForImageClassification(hf.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=28, patch_size=7,
        num_labels=3)),
    "clip": lambda: hf.CLIPModel(hf.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=32, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           image_size=28, patch_size=7),
        projection_dim=16)),
    "swin": lambda: hf.SwinForImageClassification(hf.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=3)),
    "swinv2": lambda: hf.Swinv2ForImageClassification(hf.Swinv2Config(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=3)),
    "gpt2": lambda: hf.GPT2LMHeadModel(hf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)),
    "llama": lambda: hf.LlamaForCausalLM(hf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=2, pad_token_id=1)),
}

FAMILIES = tuple(_BUILDERS)
TEXT_FAMILIES = ("t5", "bart", "bert", "roberta", "deberta-v2", "gpt2", "llama")
GENERATIVE_FAMILIES = ("t5", "bart", "gpt2", "llama")


def make_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``family``; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return _BUILDERS[family]()


def make_inputs(family: str, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs with labels (so ``outputs.loss`` exists), the last row padded where the family takes text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0
    if family in ("t5", "bart"):
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(3, VOCAB, (batch, 4), generator=g)}
    if family in ("bert", "roberta", "deberta-v2"):
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (batch,), generator=g)}
    if family in ("gpt2", "llama"):
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    size = 32 if family.startswith("swin") else 28
    pixels = torch.randn(batch, 3, size, size, generator=g)
    if family == "clip":
        ids[:, -1] = 2  # eos ends each text
        return {"input_ids": ids, "pixel_values": pixels, "return_loss": True}
    return {"pixel_values": pixels, "labels": torch.randint(0, 3, (batch,), generator=g)}


def main_output(outputs) -> torch.Tensor:
    """The tensor to compare between two models: logits, or CLIP's image-text logits."""
    if getattr(outputs, "logits", None) is not None:
        return outputs.logits
    return outputs.logits_per_image


def assert_only_trainable_parameters_change(tuned: torch.nn.Module, train) -> set[str]:
    """Run ``train()``; assert every frozen parameter is bitwise unchanged and holds no ``.grad``, and that some
    trainable parameter changed. Returns the names of the trainable parameters that changed."""
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable, "the method trains nothing"
    train()
    changed = set()
    for name, param in tuned.named_parameters():
        if name in trainable:
            if not torch.equal(param, before[name]):
                changed.add(name)
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"
            assert param.grad is None, f"frozen {name} holds a .grad"
    assert changed, "no trainable parameter changed"
    return changed


def save_tiny_vit(path, size: int = 28, layers: int = 2):
    """A tiny random ``ViTModel`` (patches of 7 pixels) and its PIL image processor, saved like a hub model."""
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(0)
    hf.ViTModel(hf.ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                             image_size=size, patch_size=7)).save_pretrained(path)
    ViTImageProcessorPil(size={"height": size, "width": size}).save_pretrained(path)
    return path
