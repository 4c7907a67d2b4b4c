"""Turning task examples into model batches, and model outputs back into predictions.

A batch holds the tokenised text (when the examples have text), the non-text inputs of the examples (images,
visual features, audio: ``Example.inputs``, turned into tensors by an optional ``input_processor``), the labels,
and the batch's task name when the tuned model's method takes one in every call (per-call input ``task``).
Several tasks on a head model share one joint head, a slice of outputs per task (:func:`task_encoders`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from leantune.errors import ConfigError
from leantune.tasks.core import DataError, Example, Task
from leantune.tasks.multitask import MultiTask

TASK_INPUT = "task"
"""The per-call input through which a method receives the name of the batch's task."""

MODEL_INPUT_PROCESSOR = "leantune_input_processor"
"""A model attribute holding the input processor its runs need (a vision-language run's ``FeatureStore``), so
``leantune train`` and ``leantune eval`` batch its tasks without being handed one."""

InputProcessor = Callable[[str, list[Any]], Any]
"""``processor(name, values)`` turns one non-text input of a batch (one value per example, e.g. image paths)
into a batch tensor, a mapping of batch tensors (a Hugging Face image processor's output), or a list of
per-example tensors of equal shape (stacked)."""


def is_text_to_text(model: torch.nn.Module) -> bool:
    """Encoder-decoder models (T5, BART) are trained text-to-text; every other model through its head."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with every tensor moved to ``device``; other values (a task name) as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Encoder:
    """Turns examples of one task into batches for one model form.

    ``text_to_text`` (T5, BART): the input is the task's source text and the labels are the tokenised label
    word (padding set to -100); predictions come from greedy ``generate``. Otherwise (a classification or
    regression head): the text or text pair is tokenised and the labels are class indices or floats.
    ``call_inputs``: the per-call inputs the tuned model takes; with ``"task"`` among them every batch carries
    its task name (``Example.task``, else the task's own name) and a batch that mixes tasks is refused.
    ``head_slice``: ``(start, stop)`` of this task's outputs in a joint head shared with other tasks; the loss
    and the predictions then read only that slice (labels stay the task's own class indices).
    """

    def __init__(
        self,
        task: Task,
        tokenizer: Any,
        text_to_text: bool,
        max_length: int,
        max_target_length: int,
        input_processor: InputProcessor | None = None,
        call_inputs: Collection[str] = (),
        head_slice: tuple[int, int] | None = None,
    ) -> None:
        self.task = task
        self.tokenizer = tokenizer
        self.text_to_text = text_to_text
        self.max_length = max_length
        self.max_target_length = max_target_length
        self.input_processor = input_processor
        self.call_inputs = frozenset(call_inputs)
        self.head_slice = head_slice

    @classmethod
    def for_model(
        cls, task: Task, tokenizer: Any, model: torch.nn.Module, max_length: int, max_target_length: int,
        input_processor: InputProcessor | None = None, head_slice: tuple[int, int] | None = None,
    ) -> Encoder:
        """The encoder for ``model`` (a ``TunedModel`` or a plain one): its form and its method's per-call inputs."""
        method = getattr(model, "method", None)
        call_inputs = {i.name for i in method.declared_inputs()} if method is not None else set()
        return cls(task, tokenizer, is_text_to_text(model), max_length, max_target_length, input_processor,
                   call_inputs, head_slice)

    def inputs(self, examples: Sequence[Example]) -> dict[str, Any]:
        """Model inputs without labels."""
        batch = self._text(examples)
        batch.update(self._non_text(examples))
        if TASK_INPUT in self.call_inputs:
            batch[TASK_INPUT] = self._task_name(examples)
        return batch

    def batch(self, examples: Sequence[Example]) -> dict[str, Any]:
        """Model inputs with labels, so that the model returns ``loss``."""
        batch = self.inputs(examples)
        if self.text_to_text:
            targets = self._tokenizer()(text_target=[self.task.target_text(e.label) for e in examples],
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

    def loss(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        """The training loss of one batch (from :meth:`batch`): the model's own, or, with a joint head, the
        task's loss on its slice of the logits (cross-entropy; mean squared error for regression)."""
        if self.head_slice is None:
            return model(**batch).loss
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = self._task_logits(model(**inputs).logits)
        if self.task.is_regression:
            return F.mse_loss(logits.squeeze(-1), batch["labels"].to(logits.dtype))
        return F.cross_entropy(logits, batch["labels"])

    def _task_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.head_slice is None:
            return logits
        start, stop = self.head_slice
        return logits[..., start:stop]

    def predictions(self, model: Any, inputs: dict[str, Any], synced_gpus: bool = False) -> list[int | float]:
        """Predicted labels for one batch of inputs (call under ``torch.no_grad``). ``synced_gpus``: generation
        runs to the longest sequence of every process (needed when the model is sharded with FSDP)."""
        if self.text_to_text:
            extra = {"synced_gpus": True} if synced_gpus else {}
            generated = model.generate(**inputs, max_new_tokens=self.max_target_length, do_sample=False,
                                       num_beams=1, **extra)
            texts = self._tokenizer().batch_decode(generated, skip_special_tokens=True)
            return [self.task.parse_target(t) for t in texts]
        logits = self._task_logits(model(**inputs).logits)
        if self.task.is_regression:
            return logits.float().reshape(-1).tolist()
        return logits.argmax(-1).tolist()

    # --- the parts of a batch ---------------------------------------------------------------------------------
    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ConfigError(f"task {self.task.name!r} has text to tokenise but no tokenizer was given; pass the "
                              "model's tokenizer to leantune.train")
        return self.tokenizer

    def _text(self, examples: Sequence[Example]) -> dict[str, Any]:
        if self.text_to_text:
            texts = [self.task.source_text(e) for e in examples]
            return dict(self._tokenizer()(texts, truncation=True, max_length=self.max_length, padding=True,
                                          return_tensors="pt"))
        with_text = sum(e.text is not None for e in examples)
        if with_text == 0:
            return {}
        if with_text < len(examples):
            raise DataError(f"task {self.task.name!r}: a batch mixes examples with and without text")
        texts = [self.task.head_text(e.text) for e in examples]
        pairs = [e.text_pair for e in examples] if examples[0].text_pair is not None else None
        return dict(self._tokenizer()(texts, pairs, truncation=True, max_length=self.max_length, padding=True,
                                      return_tensors="pt"))

    def _non_text(self, examples: Sequence[Example]) -> dict[str, Any]:
        if not examples or not examples[0].inputs:
            return {}
        names = sorted(examples[0].inputs)
        for example in examples:
            if sorted(example.inputs) != names:
                raise DataError(f"task {self.task.name!r}: the examples of one batch carry different inputs "
                                f"({names} and {sorted(example.inputs)})")
        batch: dict[str, Any] = {}
        for name in names:
            values = [e.inputs[name] for e in examples]
            processed = self.input_processor(name, values) if self.input_processor is not None else values
            batch.update(_batched(name, processed))
        return batch

    def _task_name(self, examples: Sequence[Example]) -> str:
        names = sorted({e.task or self.task.name for e in examples})
        if len(names) > 1:
            raise DataError(f"a batch mixes the tasks {', '.join(names)}, but the model takes one task per call; "
                            "put examples of one task in each batch")
        return names[0]


def task_encoders(
    tasks: MultiTask, tokenizer: Any, model: torch.nn.Module, max_length: int, max_target_length: int,
    input_processor: InputProcessor | None = None,
) -> list[Encoder]:
    """One encoder per task of a run. Several tasks on a model with a head share a joint head with a slice per
    task, so its ``num_labels`` must equal the tasks' label counts added up. A task with its own
    ``encoder_for_model`` (a vision-and-language task: drawn targets, weighted losses, its decoding) builds its
    encoder. Without ``input_processor`` the model's :data:`MODEL_INPUT_PROCESSOR` attribute is used, if any."""
    if input_processor is None:
        input_processor = getattr(model, MODEL_INPUT_PROCESSOR, None)
    slices: dict[str, tuple[int, int]] = {}
    if len(tasks) > 1 and not is_text_to_text(model):
        outputs = getattr(getattr(model, "config", None), "num_labels", None)
        if outputs != tasks.num_labels:
            counts = ", ".join(f"{t.name} {t.num_labels}" for t in tasks)
            raise ConfigError(f"several tasks on a model with a head need one joint head with a slice per task: "
                              f"{counts} outputs make num_labels={tasks.num_labels}, but the model's head has "
                              f"{outputs}; load it with num_labels={tasks.num_labels}")
        slices = tasks.head_slices()
    encoders = []
    for task in tasks:
        build = getattr(task, "encoder_for_model", None)
        if build is not None:
            encoders.append(build(tokenizer, model, max_length, max_target_length, input_processor,
                                  slices.get(task.name)))
        else:
            encoders.append(Encoder.for_model(task, tokenizer, model, max_length, max_target_length,
                                              input_processor, slices.get(task.name)))
    return encoders


def _batched(name: str, value: Any) -> dict[str, Any]:
    """One non-text input as batch tensors: a tensor or mapping as given, a list stacked or made a tensor."""
    if isinstance(value, torch.Tensor):
        return {name: value}
    if isinstance(value, Mapping):
        return dict(value)
    values = list(value)
    if all(isinstance(v, torch.Tensor) for v in values):
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise DataError(f"input {name!r}: the examples' tensors have different shapes {sorted(shapes)}; give "
                            "an input_processor that resizes or pads them")
        return {name: torch.stack(values)}
    if all(isinstance(v, (bool, int, float)) for v in values):
        return {name: torch.tensor(values)}
    kinds = sorted({type(v).__name__ for v in values})
    raise DataError(f"input {name!r} holds {', '.join(kinds)} values, not tensors; give an input_processor that "
                    "turns them into tensors (an image processor, a feature extractor)")
