"""``leantune.train``: fine-tune a wrapped model on a task, keep the best checkpoint, report its test metric.

One function, read top to bottom: set up (process group, seeds, optimizer, schedule, resume), then the step
loop (micro-batches, gradient sync, clipping, evaluation, checkpoints), then the test score of the best
checkpoint. Works for every method and every model ``leantune.wrap`` accepts: classification and regression
heads are trained on their ``loss``; encoder-decoder models learn the task in text-to-text form and are
scored from greedy ``generate``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from leantune.api import DELTA_NAME, TunedModel
from leantune.backbones import is_norm
from leantune.errors import CheckpointError, LeantuneError
from leantune.tasks.core import DataError, Example, Task
from leantune.train import checkpoint as ckpt
from leantune.train import distributed
from leantune.train.config import TrainConfig
from leantune.train.data import Encoder

LOG_NAME = "log.jsonl"
RESULTS_NAME = "results.json"


class TrainingDivergedError(LeantuneError, RuntimeError):
    """The loss or the gradient became NaN or infinite."""


@dataclass
class TrainResult:
    """What a run achieved: the metric at the best validation checkpoint, its cost, and every evaluation."""

    metric: str
    best_step: int
    best_epoch: float
    validation_metric: float
    test_metric: float
    steps: int
    train_seconds: float
    seconds_per_step: float
    wall_seconds: float
    peak_memory_bytes: int
    peak_memory_source: str
    trainable_parameters: int
    total_parameters: int
    history: list[dict[str, Any]] = field(default_factory=list)
    output_dir: str | None = None
    step_memory: dict[str, Any] | None = None

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable_parameters / self.total_parameters

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trainable_percent": self.trainable_percent}


def is_text_to_text(model: torch.nn.Module) -> bool:
    """Encoder-decoder models (T5, BART) are trained text-to-text; every other model through its head."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory so far: allocated CUDA memory on a GPU, else the process's maximum resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "max_rss"


def parameter_groups(model: TunedModel, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups: biases and norm parameters get no weight decay."""
    norm_params = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or id(p) in norm_params or p.ndim < 2 else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def linear_schedule(warmup_steps: int, total_steps: int):
    """Learning-rate factor: linear warmup from 0, then linear decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch; a function of (seed, epoch) only, so a resumed run repeats it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def _autocast(config: TrainConfig, device: torch.device):
    if config.precision == "fp32":
        return contextlib.nullcontext()
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a GPU; use fp32 (or bf16) on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if config.precision == "bf16" else torch.float16)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate(
    model: TunedModel,
    encoder: Encoder,
    examples: list[Example],
    config: TrainConfig,
    context: distributed.DistContext | None = None,
) -> float:
    """The task metric on ``examples``; under torchrun each process scores a slice and the slices are gathered."""
    context = context or distributed.DistContext(device=next(model.parameters()).device)
    indices = list(range(context.rank, len(examples), context.world_size))
    predictions: list[int | float] = []
    was_training = model.training
    model.eval()
    with torch.no_grad(), _autocast(config, context.device):
        for start in range(0, len(indices), config.eval_batch_size):
            chunk = [examples[i] for i in indices[start:start + config.eval_batch_size]]
            predictions += encoder.predictions(model, _to(encoder.inputs(chunk), context.device))
    model.train(was_training)
    by_index: dict[int, int | float] = {}
    for rank_indices, rank_predictions in distributed.gather_objects((indices, predictions), context):
        by_index.update(zip(rank_indices, rank_predictions))
    ordered = [by_index[i] for i in range(len(examples))]
    return encoder.task.score(ordered, [e.label for e in examples])


def train(
    model: TunedModel,
    task: Task,
    tokenizer: Any,
    config: TrainConfig | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    **overrides: Any,
) -> TrainResult:
    """Train ``model`` (from ``leantune.wrap``) on ``task``; return the test metric at the best validation step.

    ``config`` fields can also be given as keyword ``overrides``. With ``output_dir`` the run writes
    ``log.jsonl`` (one line per evaluation), resumable ``checkpoints/``, ``best/`` (loadable with
    ``leantune.load``) and ``results.json``; ``resume=True`` continues from its latest checkpoint.
    """
    wall_start = time.perf_counter()
    config = (config or TrainConfig()).replace(**overrides)
    if not isinstance(model, TunedModel):
        raise TypeError(f"train() needs a model from leantune.wrap, got {type(model).__name__}")
    context = distributed.setup()
    run_dir = Path(output_dir) if output_dir is not None else None
    task = task.subset({"train": config.train_examples, "validation": config.validation_examples,
                        "test": config.test_examples})
    train_examples = task.splits["train"]
    global_batch = config.batch_size
    if global_batch % (context.world_size * config.grad_accumulation):
        raise ValueError(f"batch_size {global_batch} must be divisible by processes x grad_accumulation "
                         f"({context.world_size} x {config.grad_accumulation})")
    if len(train_examples) < global_batch:
        raise DataError(f"task {task.name!r} has {len(train_examples)} training examples, fewer than one batch "
                        f"({global_batch}); lower batch_size")
    local_batch = global_batch // context.world_size
    micro_batch = local_batch // config.grad_accumulation
    steps_per_epoch = len(train_examples) // global_batch
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    warmup_steps = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * total_steps)
    encoder = Encoder(task, tokenizer, is_text_to_text(model), config.max_length, config.max_target_length)

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    model.to(context.device)
    if context.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(context.device)
    distributed.broadcast_trainable(model, context)
    if config.fsdp:
        if not context.distributed:
            raise ValueError("fsdp=True needs several processes; start the run with torchrun")
        if run_dir is not None:
            raise ValueError("fsdp=True keeps the best delta in memory and cannot write a run directory yet; "
                             "pass no output_dir and save the returned model yourself")
        distributed.shard_model(model, [b.module for b in model.backbone.blocks()])
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.learning_rate,
                                  betas=config.adam_betas, eps=config.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup_steps, total_steps))
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None

    global_step, best_metric, best_step, history = 0, -math.inf, 0, []
    loss_sum, loss_count = 0.0, 0  # training loss summed since the last evaluation
    best_in_memory: dict[str, torch.Tensor] | None = None
    last_checkpoint: Path | None = None
    if run_dir is not None:
        ckpt.recover_best(run_dir)
        last_checkpoint = ckpt.latest_checkpoint(run_dir)
        if last_checkpoint is not None and not resume:
            raise CheckpointError(f"{run_dir} already holds a run ({last_checkpoint.name}); resume it "
                                  "(--resume) or choose another output directory")
        if last_checkpoint is not None:
            state = ckpt.load_checkpoint(last_checkpoint, model)
            _check_same_config(state["config"], config, last_checkpoint)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            if len(state["rng"]) != context.world_size:
                raise CheckpointError(f"{last_checkpoint} was written by {len(state['rng'])} process(es); resume it "
                                      f"with as many (now {context.world_size})")
            ckpt.set_rng_state(state["rng"][context.rank])
            global_step, best_metric, best_step = state["global_step"], state["best_metric"], state["best_step"]
            history, (loss_sum, loss_count) = state["history"], state["loss_since_evaluation"]

    def save_resumable() -> Path | None:
        if run_dir is None:
            return None
        rng_states = distributed.gather_objects(ckpt.rng_state(), context)
        path = None
        if context.is_main:
            state = {
                "global_step": global_step, "epoch": global_step // steps_per_epoch,
                "position_in_epoch": global_step % steps_per_epoch, "data_order_seed": config.seed,
                "best_metric": best_metric, "best_step": best_step, "history": history,
                "loss_since_evaluation": (loss_sum, loss_count),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_states, "config": config.to_dict(),
            }
            path = ckpt.save_checkpoint(run_dir, model, state)
        distributed.barrier(context)
        return path

    first_step = global_step
    model.train()
    trainable = distributed.trainable_parameters(model)
    progress = tqdm(total=total_steps, initial=global_step, desc=f"{model.method.name} on {task.name}",
                    unit="step", disable=not (config.progress and context.is_main), dynamic_ncols=True)
    train_seconds = 0.0
    order_epoch, order = -1, []
    while global_step < total_steps:
        step_start = time.perf_counter()
        epoch, position = divmod(global_step, steps_per_epoch)
        if epoch != order_epoch:
            order_epoch, order = epoch, epoch_order(len(train_examples), config.seed, epoch)
        batch_ids = order[position * global_batch:(position + 1) * global_batch]
        local_ids = batch_ids[context.rank * local_batch:(context.rank + 1) * local_batch]
        step_loss = 0.0
        for start in range(0, local_batch, micro_batch):
            batch = _to(encoder.batch([train_examples[i] for i in local_ids[start:start + micro_batch]]),
                        context.device)
            with _autocast(config, context.device):
                loss = model(**batch).loss / config.grad_accumulation
            if not distributed.all_true(bool(torch.isfinite(loss).item()), context):
                raise TrainingDivergedError(_diverged_message("loss", loss.item(), global_step, last_checkpoint))
            (scaler.scale(loss) if scaler is not None else loss).backward()
            step_loss += loss.item()
        if not config.fsdp:  # FSDP reduces the gradients itself
            distributed.average_gradients(model, context)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if config.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            if not math.isfinite(float(norm)) and scaler is None:
                raise TrainingDivergedError(_diverged_message("gradient norm", float(norm), global_step,
                                                              last_checkpoint))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        train_seconds += time.perf_counter() - step_start
        loss_sum, loss_count = loss_sum + step_loss, loss_count + 1
        memory, _ = peak_memory(context.device)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                             peak_mem=f"{memory / 2**20:,.0f}MiB", refresh=False)
        progress.update(1)

        at_epoch_end = global_step % steps_per_epoch == 0
        evaluate_now = (global_step % config.eval_every == 0 if config.eval_every else at_epoch_end)
        if evaluate_now or global_step == total_steps:
            metric = evaluate(model, encoder, task.splits["validation"], config, context)
            improved = metric > best_metric
            if improved:
                best_metric, best_step = metric, global_step
                if run_dir is None:
                    best_in_memory = {n: t.detach().clone() for n, t in model.delta_state_dict().items()}
                elif context.is_main:
                    ckpt.save_best(run_dir, model)
            history.append({
                "step": global_step, "epoch": round(global_step / steps_per_epoch, 4),
                "train_loss": loss_sum / max(1, loss_count), f"validation_{task.metric}": metric,
                "learning_rate": scheduler.get_last_lr()[0], "best": improved,
                "elapsed_s": round(time.perf_counter() - wall_start, 2),
            })
            loss_sum, loss_count = 0.0, 0
            if config.progress and context.is_main:
                progress.write(f"step {global_step}: validation {task.metric} {metric:.4f}"
                               + (" (best)" if improved else ""))
            if run_dir is not None and context.is_main:
                ckpt.write_atomic_text(run_dir / LOG_NAME, "".join(json.dumps(h) + "\n" for h in history))
            last_checkpoint = save_resumable() or last_checkpoint
        elif config.checkpoint_every and global_step % config.checkpoint_every == 0:
            last_checkpoint = save_resumable() or last_checkpoint
    progress.close()

    _restore_best(model, run_dir, best_in_memory)
    test_metric = evaluate(model, encoder, task.splits["test"], config, context)
    trainable_count, total_count = model.trainable_parameter_count()
    memory, memory_source = peak_memory(context.device)
    step_memory = None
    if config.measure_memory:
        first_batch = _to(encoder.batch(train_examples[:micro_batch]), context.device)
        step_memory = measure_step_memory(model, first_batch, config)
    steps_run = global_step - first_step
    result = TrainResult(
        metric=task.metric, best_step=best_step, best_epoch=round(best_step / steps_per_epoch, 4),
        validation_metric=best_metric, test_metric=test_metric, steps=total_steps,
        train_seconds=train_seconds, seconds_per_step=train_seconds / max(1, steps_run),
        wall_seconds=time.perf_counter() - wall_start, peak_memory_bytes=int(memory),
        peak_memory_source=memory_source, trainable_parameters=trainable_count, total_parameters=total_count,
        history=history, output_dir=str(run_dir) if run_dir is not None else None, step_memory=step_memory,
    )
    if run_dir is not None and context.is_main:
        ckpt.write_atomic_text(run_dir / RESULTS_NAME, json.dumps(result.to_dict(), indent=2) + "\n")
    distributed.barrier(context)
    return result


def measure_step_memory(model: TunedModel, batch: dict[str, torch.Tensor], config: TrainConfig) -> dict[str, Any]:
    """Peak tensor memory of one training step on ``batch`` with a fresh AdamW (``leantune.memory``): exact
    on CPU, the allocator's peak on CUDA. The model's delta is put back afterwards."""
    from leantune.memory import measure_peak_training_memory, training_step

    saved = {n: t.detach().clone() for n, t in model.delta_state_dict().items()}
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.learning_rate)
    was_training = model.training
    model.train()
    try:
        return measure_peak_training_memory(training_step(model, optimizer, batch), model, optimizer)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, target in model.delta_state_dict().items():
                target.copy_(saved[name])


def _restore_best(model: TunedModel, run_dir: Path | None, best_in_memory: dict[str, torch.Tensor] | None) -> None:
    """Put the best checkpoint's delta back into ``model``."""
    if run_dir is not None:
        tensors = load_file(str(run_dir / ckpt.BEST / DELTA_NAME))
    elif best_in_memory is not None:
        tensors = best_in_memory
    else:
        return
    with torch.no_grad():
        for name, target in model.delta_state_dict().items():
            target.copy_(tensors[name])


def _check_same_config(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    current = config.to_dict()
    differing = [k for k in current if k != "progress" and _normalise(saved.get(k)) != _normalise(current[k])]
    if differing:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}" for k in differing)
        raise CheckpointError(f"cannot resume from {path}: the training settings differ ({details})")


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _diverged_message(what: str, value: float, step: int, last_checkpoint: Path | None) -> str:
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
    return (f"{what} became {value} at step {step + 1}; training stopped ({kept}). "
            "Lower the learning rate, or train in fp32.")
