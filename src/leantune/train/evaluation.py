"""Scoring a tuned model on a split, and measuring what training costs (precision, peak memory)."""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from leantune.api import TunedModel
from leantune.errors import ConfigError
from leantune.tasks.core import Example
from leantune.train import distributed
from leantune.train.config import TrainConfig
from leantune.train.data import Encoder, to_device
from leantune.train.optimizer import make_optimizer

BAR_DELAY = 2.0
"""Seconds an evaluation runs before its progress bar appears (short ones stay quiet)."""


def autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of ``config.precision`` (none for fp32)."""
    if config.precision == "fp32":
        return contextlib.nullcontext()
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError("TrainConfig.precision fp16 needs a GPU; use fp32 (or bf16) on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if config.precision == "bf16" else torch.float16)


def evaluate(
    model: TunedModel,
    encoder: Encoder,
    examples: list[Example],
    config: TrainConfig,
    context: distributed.DistContext | None = None,
    description: str | None = None,
) -> float:
    """The task metric on ``examples``; under torchrun each process scores a slice and the slices are gathered.

    With ``config.progress`` the main process shows a bar (``description``, default the task's name) once the
    evaluation has taken more than :data:`BAR_DELAY` seconds. A sharded (FSDP) model gathers parameters in every
    forward, so there every process runs the same number of batches (the shorter slices are padded and the padding
    is dropped) and generation is synchronised.
    """
    context = context or distributed.DistContext(device=next(model.parameters()).device)
    sharded = distributed.is_sharded(model)
    indices = list(range(context.rank, len(examples), context.world_size))
    real = len(indices)
    if sharded:
        indices += [indices[0] if indices else 0] * (-(-len(examples) // context.world_size) - real)
    predictions: list[int | float] = []
    was_training = model.training
    model.eval()
    starts = range(0, len(indices), config.eval_batch_size)
    bar = tqdm(starts, desc=description or encoder.task.name, unit="batch", leave=False, delay=BAR_DELAY,
               dynamic_ncols=True, disable=not (config.progress and context.is_main))
    with torch.no_grad(), autocast(config, context.device):
        for start in bar:
            chunk = [examples[i] for i in indices[start:start + config.eval_batch_size]]
            inputs = to_device(encoder.inputs(chunk), context.device)
            predictions += encoder.predictions(model, inputs, synced_gpus=sharded)
    model.train(was_training)
    by_index: dict[int, int | float] = {}
    for rank_indices, rank_predictions in distributed.gather_objects((indices[:real], predictions[:real]), context):
        by_index.update(zip(rank_indices, rank_predictions))
    ordered = [by_index[i] for i in range(len(examples))]
    return encoder.task.score(ordered, [e.label for e in examples])


def evaluate_tasks(
    model: TunedModel,
    encoders: list[Encoder],
    split: str,
    config: TrainConfig,
    context: distributed.DistContext | None = None,
) -> dict[str, float]:
    """``{task: metric}`` on ``split`` of every task (one encoder per task: ``train.data.task_encoders``)."""
    return {encoder.task.name: evaluate(model, encoder, encoder.task.splits[split], config, context,
                                        description=f"{split} {encoder.task.name}")
            for encoder in encoders}


def average(metrics: dict[str, float]) -> float:
    """The mean of the tasks' metrics (one task: its metric, exactly)."""
    return sum(metrics.values()) / len(metrics)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory so far: allocated CUDA memory on a GPU, else the process's maximum resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "max_rss"


def measure_step_memory(model: TunedModel, encoder: Encoder, batch: dict[str, Any], config: TrainConfig
                        ) -> dict[str, Any]:
    """Peak tensor memory of one training step (``encoder.loss`` on ``batch``) with a fresh AdamW
    (``leantune.memory``): exact on CPU, the allocator's peak on CUDA. The model's delta is put back afterwards."""
    from leantune.memory import measure_peak_training_memory

    saved = {n: t.detach().clone() for n, t in model.delta_state_dict().items()}
    optimizer = make_optimizer(model, config)
    was_training = model.training
    model.train()
    try:
        return measure_peak_training_memory(_training_step(model, encoder, optimizer, batch), model, optimizer)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, target in model.delta_state_dict().items():
                target.copy_(saved[name])


def _training_step(model: TunedModel, encoder: Encoder, optimizer: torch.optim.Optimizer, batch: dict[str, Any]
                   ) -> Callable[[], torch.Tensor]:
    """One step as a function (as ``leantune.memory.training_step``), with the encoder's loss."""
    def step() -> torch.Tensor:
        loss = encoder.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step
