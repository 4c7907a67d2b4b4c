"""Turning task examples into model batches, and model outputs back into predictions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from leantune.tasks.core import Example, Task


class Encoder:
    """Tokenises examples for one task and one model form.

    ``text_to_text`` (T5, BART): the input is the task's source text and the labels are the tokenised label
    word (padding set to -100); predictions come from greedy ``generate``. Otherwise (a classification or
    regression head): the text or text pair is tokenised and the labels are class indices or floats.
    """

    def __init__(self, task: Task, tokenizer: Any, text_to_text: bool, max_length: int, max_target_length: int):
        self.task = task
        self.tokenizer = tokenizer
        self.text_to_text = text_to_text
        self.max_length = max_length
        self.max_target_length = max_target_length

    def inputs(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Model inputs without labels."""
        if self.text_to_text:
            texts = [self.task.source_text(e) for e in examples]
            return dict(self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                                       return_tensors="pt"))
        texts = [e.text for e in examples]
        pairs = [e.text_pair for e in examples] if examples and examples[0].text_pair is not None else None
        return dict(self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length, padding=True,
                                   return_tensors="pt"))

    def batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Model inputs with labels, so that the model returns ``loss``."""
        batch = self.inputs(examples)
        if self.text_to_text:
            targets = self.tokenizer(text_target=[self.task.target_text(e.label) for e in examples],
                                     truncation=True, max_length=self.max_target_length, padding=True,
                                     return_tensors="pt")
            labels = targets["input_ids"]
            labels[targets["attention_mask"] == 0] = -100
            batch["labels"] = labels
        elif self.task.is_regression:
            batch["labels"] = torch.tensor([float(e.label) for e in examples])
        else:
            batch["labels"] = torch.tensor([int(e.label) for e in examples])
        return batch

    def predictions(self, model: Any, inputs: dict[str, torch.Tensor]) -> list[int | float]:
        """Predicted labels for one batch of inputs (call under ``torch.no_grad``)."""
        if self.text_to_text:
            generated = model.generate(**inputs, max_new_tokens=self.max_target_length, do_sample=False,
                                       num_beams=1)
            texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
            return [self.task.parse_target(t) for t in texts]
        logits = model(**inputs).logits
        if self.task.is_regression:
            return logits.float().reshape(-1).tolist()
        return logits.argmax(-1).tolist()
