"""``leantune.train``: fine-tune a wrapped model on one task or several, keep the best checkpoint, report its
test metric.

A recipe, read top to bottom; each step is one function below, in this order:

1. :func:`set_up`        process group, seeds, batch sizes, the model on its device (DDP or FSDP2), optimizer,
                         schedule
2. :func:`resume_run`    the run directory's latest checkpoint, when resuming
3. :func:`train_step`    one optimizer step on one task's batch: micro-batches, gradient sync, clipping, the
                         method's pre-step work
4. :func:`validate`      every task's validation metric and their average at each epoch end (or every
                         ``eval_every`` steps); the best delta by the average is kept
5. :func:`checkpoint`    a resumable checkpoint at each evaluation and every ``checkpoint_every`` steps
6. :func:`finish`        the best delta back in the model, its test metric per task and their average, the
                         results

:class:`RunState` carries what the steps share. Works for every method and every model ``leantune.wrap``
accepts: classification and regression heads are trained on their ``loss``; encoder-decoder models learn the
task in text-to-text form and are scored from greedy ``generate``. Several tasks (:class:`MultiTask`): every
batch holds one task, an epoch runs every task's batches once in an order shuffled per epoch
(:mod:`leantune.train.sampling`); a head model has one joint head with a slice per task. With ``cache_ladders``
(LST) the steps run inside :func:`cached_ladders`, and each training forward tells LST which examples it holds.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from leantune.api import DELTA_NAME, TunedModel
from leantune.errors import CheckpointError, ConfigError, LeantuneError
from leantune.files import write_atomic_text
from leantune.progress import hidden
from leantune.tasks.core import DataError, Task
from leantune.tasks.multitask import MultiTask
from leantune.train import checkpoint as ckpt
from leantune.train import distributed
from leantune.train.config import TrainConfig
from leantune.train.data import TASK_INPUT, Encoder, InputProcessor, is_text_to_text, task_encoders, to_device
from leantune.train.evaluation import autocast, average, evaluate, evaluate_tasks, measure_step_memory, peak_memory
from leantune.train.optimizer import make_optimizer
from leantune.train.sampling import epoch_order, epoch_schedule

if TYPE_CHECKING:
    from leantune.methods.lst.ladder_cache import LadderCache

__all__ = ["RunState", "TrainResult", "TrainingDivergedError", "epoch_order", "evaluate", "is_text_to_text",
           "linear_schedule", "phase", "train"]

AVERAGE = "average"
"""The metric name of a run with several tasks: the mean of the tasks' metrics."""

LOG_NAME = "log.jsonl"
RESULTS_NAME = "results.json"


class TrainingDivergedError(LeantuneError, RuntimeError):
    """The loss or the gradient became NaN or infinite."""


@dataclass
class TrainResult:
    """What a run achieved: the metric at the best validation checkpoint, its cost, and every evaluation.

    ``metric`` is the task's metric, or ``"average"`` with several tasks: ``validation_metric`` and
    ``test_metric`` are then the mean of the tasks' metrics, and ``task_metrics`` holds each task's
    ``{"metric", "validation", "test"}`` at the best checkpoint (one entry for a single task).
    ``communication``: under DDP with a method's comm hook, the bytes the hook sent per step (and what a dense
    all-reduce would have sent), over the steps this process ran.

    Time is this process's: ``wall_seconds`` from the ``wall_start`` given to :func:`train` (``leantune train``
    passes the moment the command started, so loading and data-driven initialisation count) to the end;
    ``phase_seconds`` splits it into ``load_and_init`` (before ``train`` was called), ``set_up`` (placement,
    reading the checkpoint to resume), ``train`` (the optimizer steps), ``evaluate`` (validation and test),
    ``checkpoint`` and ``measure_memory``. ``steps`` is the run's length, ``steps_run`` the steps this process
    trained (fewer after a resume), and ``seconds_per_step`` is over those, or ``None`` when there were none (a
    resumed run that had nothing left to train). ``ladder_cache_bytes``: with ``cache_ladders``, the bytes the
    cache held on disk when training ended (the folder is then deleted).
    """

    metric: str
    best_step: int
    best_epoch: float
    validation_metric: float
    test_metric: float
    steps: int
    train_seconds: float
    seconds_per_step: float | None
    wall_seconds: float
    peak_memory_bytes: int
    peak_memory_source: str
    trainable_parameters: int
    total_parameters: int
    history: list[dict[str, Any]] = field(default_factory=list)
    output_dir: str | None = None
    step_memory: dict[str, Any] | None = None
    communication: dict[str, Any] | None = None
    task_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps_run: int = 0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    ladder_cache_bytes: int | None = None

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable_parameters / self.total_parameters

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trainable_percent": self.trainable_percent}


def linear_schedule(warmup_steps: int, total_steps: int):
    """Learning-rate factor: linear warmup from 0, then linear decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


@dataclass(frozen=True)
class TaskSizes:
    """One task's examples per step (all processes, this process, one micro-batch) and batches per epoch."""

    global_batch: int
    local_batch: int
    micro_batch: int
    batches_per_epoch: int


@dataclass(frozen=True)
class Sizes:
    """Every task's sizes, steps per epoch (the tasks' batches added up) and in all."""

    tasks: tuple[TaskSizes, ...]
    steps_per_epoch: int
    total_steps: int


@dataclass
class Progress:
    """Where the run is: what a checkpoint saves besides the weights, optimizer and random generators."""

    global_step: int = 0
    best_metric: float = -math.inf
    best_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    loss_sum: float = 0.0  # training loss summed since the last evaluation
    loss_count: int = 0
    task_losses: dict[str, list[float]] = field(default_factory=dict)  # per task: [loss sum, steps] since then
    best_task_metrics: dict[str, float] = field(default_factory=dict)  # every task's validation metric at the best


@dataclass
class RunState:
    """What the steps of one run share. ``model`` is the tuned model (evaluation, checkpoints); ``trained`` is
    what the forward pass runs through (the DDP wrapper under torchrun, else ``model`` itself)."""

    config: TrainConfig
    tasks: MultiTask
    context: distributed.DistContext
    run_dir: Path | None
    sizes: Sizes
    encoders: list[Encoder]  # one per task, in task order
    model: TunedModel
    trained: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    comm_state: Any = None
    progress: Progress = field(default_factory=Progress)
    last_checkpoint: Path | None = None
    best_in_memory: dict[str, torch.Tensor] | None = None
    wall_start: float = field(default_factory=time.perf_counter)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    steps_run: int = 0
    schedule: tuple[int, list[tuple[int, int]]] = field(default_factory=lambda: (-1, []))  # (epoch, its schedule)
    orders: dict[int, tuple[int, list[int]]] = field(default_factory=dict)  # task -> (epoch, its example order)
    ladder_cache: LadderCache | None = None  # TrainConfig.cache_ladders: LST's stored ladders while training
    ladder_cache_bytes: int | None = None  # the cache's size on disk when training ended

    @property
    def sharded(self) -> bool:
        return self.config.fsdp

    @property
    def metric_name(self) -> str:
        return self.tasks.tasks[0].metric if len(self.tasks) == 1 else AVERAGE


def train(
    model: TunedModel,
    task: Task | MultiTask,
    tokenizer: Any,
    config: TrainConfig | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    *,
    input_processor: InputProcessor | None = None,
    wall_start: float | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train ``model`` (from ``leantune.wrap``) on ``task``; return the test metric at the best validation step.

    ``task`` is a :class:`Task` or several (:class:`leantune.tasks.MultiTask`, each with its own batch size);
    with several, the best step is the one with the best average validation metric. ``config`` fields can also
    be given as keyword ``overrides``. With ``output_dir`` the run writes ``log.jsonl`` (one line per
    evaluation), resumable ``checkpoints/``, ``best/`` (loadable with
    ``leantune.load``) and ``results.json``; ``resume=True`` continues from its latest checkpoint.
    ``tokenizer`` may be ``None`` for a model that takes no text; ``input_processor`` turns the examples'
    non-text inputs (``Example.inputs``) into tensors (see :class:`leantune.train.data.Encoder`).
    ``wall_start`` (a ``time.perf_counter()`` value) is when the run began, e.g. before the model was loaded and
    initialised from data, so that the reported wall time counts that too (default: now).
    """
    called = time.perf_counter()
    config = (config or TrainConfig()).replace(**overrides)
    run = set_up(model, task, tokenizer, config, output_dir, input_processor)
    if run.run_dir is not None:
        resume_run(run, resume)
    run.wall_start = called if wall_start is None else wall_start
    run.phase_seconds.update(load_and_init=called - run.wall_start, set_up=time.perf_counter() - called)
    bar = tqdm(total=run.sizes.total_steps, initial=run.progress.global_step, unit="step",
               desc=f"{model.method.name} on {'+'.join(run.tasks.names)}", dynamic_ncols=True,
               disable=not (config.progress and run.context.is_main))
    with cached_ladders(run):
        while run.progress.global_step < run.sizes.total_steps:
            step_loss = train_step(run)
            memory, _ = peak_memory(run.context.device)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}",
                            peak_mem=f"{memory / 2**20:,.0f}MiB", refresh=False)
            bar.update(1)
            step = run.progress.global_step
            at_epoch_end = step % run.sizes.steps_per_epoch == 0
            if (step % config.eval_every == 0 if config.eval_every else at_epoch_end) or step == run.sizes.total_steps:
                with timed(run, "evaluate"):
                    metrics, improved = validate(run)
                if config.progress and run.context.is_main:
                    bar.write(f"step {step}: {validation_line(run, metrics)}" + (" (best)" if improved else ""))
                with timed(run, "checkpoint"):
                    checkpoint(run)
            elif config.checkpoint_every and step % config.checkpoint_every == 0:
                with timed(run, "checkpoint"):
                    checkpoint(run)
    bar.close()
    return finish(run)


@contextlib.contextmanager
def timed(run: RunState, name: str) -> Iterator[None]:
    """Add the seconds the block takes to ``run.phase_seconds[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        run.phase_seconds[name] = run.phase_seconds.get(name, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def phase(description: str, show: bool = True) -> Iterator[None]:
    """One line on stderr before a phase that may take a while (``description ...``) and one after it with its
    time (``description: done in 4.2 s``), so no phase runs silently; nothing when ``show`` is false, not even the
    progress bars of what runs inside (LST's Fisher initialisation, say: :mod:`leantune.progress`)."""
    start = time.perf_counter()
    if show:
        print(f"{description} ...", file=sys.stderr, flush=True)
    with hidden(not show):
        yield
    if show:
        print(f"{description}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


# --- 1. set-up ----------------------------------------------------------------------------------------------------
def set_up(
    model: TunedModel, task: Task | MultiTask, tokenizer: Any, config: TrainConfig, output_dir: str | Path | None,
    input_processor: InputProcessor | None = None,
) -> RunState:
    """Join the process group, seed, size the batches, place the model (DDP or FSDP2), build optimizer and schedule."""
    if not isinstance(model, TunedModel):
        raise TypeError(f"train() needs a model from leantune.wrap, got {type(model).__name__}")
    tasks = MultiTask.of(task).subset({"train": config.train_examples, "validation": config.validation_examples,
                                       "test": config.test_examples})
    _check_method_serves(model, tasks)
    context = distributed.setup()
    if config.precision == "fp16" and context.device.type != "cuda":
        raise ConfigError("TrainConfig.precision fp16 needs a GPU; use fp32 (or bf16) on CPU")
    if config.cache_ladders:
        from leantune.methods.lst import ladder_cache  # LST's own machinery, imported only when asked for

        reason = ladder_cache.refusal(model, context.world_size)
        if reason is not None:
            raise ConfigError(reason)
    sizes = _sizes(config, context, tasks)
    encoders = task_encoders(tasks, tokenizer, model, config.max_length, config.max_target_length, input_processor)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    model.to(context.device)
    if context.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(context.device)
    trained, comm_state = _place(model, config, context)
    optimizer = make_optimizer(model, config)
    warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * sizes.total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, sizes.total_steps))
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    model.train()
    return RunState(config, tasks, context, Path(output_dir) if output_dir is not None else None, sizes, encoders,
                    model, trained, optimizer, scheduler, scaler, comm_state)


def _check_method_serves(model: TunedModel, tasks: MultiTask) -> None:
    """Refuse a task-aware method built for other tasks than the batches will name, before training starts."""
    declared = {i.name: i for i in model.method.declared_inputs()}
    choices = declared[TASK_INPUT].choices if TASK_INPUT in declared else None
    if choices is None:
        return
    unknown = sorted(tasks.batch_task_names() - set(choices))
    if unknown:
        raise ConfigError(f"the model's {model.method.name} method serves the tasks {list(choices)}, but this run "
                          f"trains {unknown}; wrap the model with tasks= listing every task of the run")


def _sizes(config: TrainConfig, context: distributed.DistContext, tasks: MultiTask) -> Sizes:
    processes = context.world_size * config.grad_accumulation
    per_task = []
    for task in tasks:
        global_batch = tasks.batch_size(task.name, config.batch_size)
        setting = f"task {task.name!r}: batch_size" if task.name in tasks.batch_sizes else "TrainConfig.batch_size"
        if global_batch % processes:
            raise ConfigError(f"{setting} {global_batch} must be divisible by processes x grad_accumulation "
                              f"({context.world_size} x {config.grad_accumulation})")
        examples = len(task.splits["train"])
        if examples < global_batch:
            raise DataError(f"task {task.name!r} has {examples} training examples, fewer than one batch "
                            f"({global_batch}); lower batch_size")
        local_batch = global_batch // context.world_size
        per_task.append(TaskSizes(global_batch, local_batch, local_batch // config.grad_accumulation,
                                  examples // global_batch))
    steps_per_epoch = sum(t.batches_per_epoch for t in per_task)
    return Sizes(tuple(per_task), steps_per_epoch, config.max_steps or config.epochs * steps_per_epoch)


def _place(model: TunedModel, config: TrainConfig, context: distributed.DistContext) -> tuple[nn.Module, Any]:
    """``(module the forward runs through, comm-hook state)``: FSDP2 shards, DDP wraps, one process runs as is."""
    if config.fsdp:
        if not context.distributed:
            raise ConfigError("TrainConfig.fsdp needs several processes; start the run with torchrun")
        distributed.shard_model(model, [b.module for b in model.backbone.blocks()])
        return model, None
    if context.distributed:
        return distributed.wrap_ddp(model, context)
    return model, None


@contextlib.contextmanager
def cached_ladders(run: RunState) -> Iterator[None]:
    """With ``cache_ladders``: LST's ladder cache (:mod:`leantune.methods.lst.ladder_cache`) while the run trains,
    in ``<output_dir>/ladder_cache/`` (or a temporary folder without an output directory). A stopped run keeps it
    for ``--resume``; once training has ended its size is noted and the folder deleted."""
    if not run.config.cache_ladders:
        yield
        return
    from leantune.methods.lst import ladder_cache

    with contextlib.ExitStack() as cleanup:
        root = run.run_dir or Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="leantune-ladders-")))
        cache = ladder_cache.open_for_run(run.model, run.tasks, root / ladder_cache.FOLDER,
                                          resumed=run.last_checkpoint is not None)
        run.ladder_cache, completed = cache, False
        try:
            yield
            completed = True
        finally:
            run.ladder_cache = None
            run.ladder_cache_bytes = cache.disk_bytes()
            ladder_cache.close_for_run(run.model, cache)
            if completed:
                shutil.rmtree(cache.folder)


# --- 2. resume ----------------------------------------------------------------------------------------------------
def resume_run(run: RunState, resume: bool) -> None:
    """Continue from the run directory's newest intact checkpoint (``resume``), or refuse to overwrite a run.

    The checkpoint is verified and read whole, and checked against this run, before anything is applied."""
    assert run.run_dir is not None
    if run.context.is_main:
        ckpt.recover_best(run.run_dir)
    distributed.barrier(run.context)
    existing = ckpt.latest_checkpoint(run.run_dir)
    if existing is not None and not resume:
        raise CheckpointError(f"{run.run_dir} already holds a run ({existing.name}); resume it (--resume) or choose "
                              "another output directory")
    loaded = ckpt.read_newest_intact(run.run_dir) if existing is not None else None
    if loaded is None:
        return
    state, last = loaded.state, loaded.path
    _check_same_config(state["config"], run.config, last)
    _check_same_tasks(state.get("tasks"), _task_layout(run), last)
    if len(state["rng"]) != run.context.world_size:
        raise CheckpointError(f"{last} was written by {len(state['rng'])} process(es); resume it with as many "
                              f"(now {run.context.world_size})")
    if loaded.delta is None:
        distributed.load_sharded(last / ckpt.SHARDED, run.model, run.optimizer)
    else:
        ckpt.check_delta(loaded, run.model)
        run.optimizer.load_state_dict(state["optimizer"])
        ckpt.apply_delta(loaded, run.model)
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    ckpt.set_rng_state(state["rng"][run.context.rank])
    run.progress = Progress(**state["progress"])
    run.last_checkpoint = last


def _check_same_config(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    current, defaults = config.to_dict(), TrainConfig().to_dict()  # a setting added since the checkpoint: default
    differing = [k for k in current
                 if k != "progress" and _normalise(saved.get(k, defaults[k])) != _normalise(current[k])]
    if differing:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}" for k in differing)
        raise CheckpointError(f"cannot resume from {path}: the training settings differ ({details})")


def _task_layout(run: RunState) -> list[list[Any]]:
    """``[name, batch size, training examples]`` per task: what fixes the data order besides the seed."""
    return [[task.name, sizes.global_batch, len(task.splits["train"])]
            for task, sizes in zip(run.tasks, run.sizes.tasks)]


def _check_same_tasks(saved: list[list[Any]] | None, current: list[list[Any]], path: Path) -> None:
    if saved is None or [list(entry) for entry in saved] == current:
        return

    def described(layout: list[list[Any]]) -> str:
        return "; ".join(f"{name} (batch {batch}, {examples} training examples)" for name, batch, examples in layout)

    raise CheckpointError(f"cannot resume from {path}: it trained the tasks {described(saved)}, this run has "
                          f"{described(current)}")


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# --- 3. one optimizer step ----------------------------------------------------------------------------------------
def train_step(run: RunState) -> float:
    """Forward and backward over this process's micro-batches of the next global batch, then one optimizer step.

    Gradients are synchronised once, on the last micro-batch (DDP's ``no_sync`` before it); the method's
    ``before_optimizer_step`` runs after unscaling and clipping, right before ``optimizer.step()``.
    """
    start = time.perf_counter()
    config, context, progress = run.config, run.context, run.progress
    task_index, local_ids = _local_batch(run)
    encoder, examples = run.encoders[task_index], run.tasks.tasks[task_index].splits["train"]
    micro = run.sizes.tasks[task_index].micro_batch
    micro_batches = [local_ids[i:i + micro] for i in range(0, len(local_ids), micro)]
    step_loss = 0.0
    for number, ids in enumerate(micro_batches, start=1):
        batch = to_device(encoder.batch([examples[i] for i in ids]), context.device)
        serving = run.ladder_cache.serving(task_index, ids) if run.ladder_cache else contextlib.nullcontext()
        with distributed.gradient_sync(run.trained, sync=number == len(micro_batches)), serving:
            with autocast(config, context.device):
                loss = encoder.loss(run.trained, batch) / config.grad_accumulation
            if not distributed.all_true(bool(torch.isfinite(loss).item()), context):
                raise TrainingDivergedError(_diverged_message("loss", loss.item(), run))
            (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
        step_loss += loss.item()
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    if config.max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(distributed.trainable_parameters(run.model), config.max_grad_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(norm) and run.scaler is None:
            raise TrainingDivergedError(_diverged_message("gradient norm", norm, run))
    run.model.method.before_optimizer_step(run.optimizer)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    progress.global_step += 1
    progress.loss_sum, progress.loss_count = progress.loss_sum + step_loss, progress.loss_count + 1
    task_sum, task_count = progress.task_losses.get(encoder.task.name, (0.0, 0))
    progress.task_losses[encoder.task.name] = [task_sum + step_loss, task_count + 1]
    run.steps_run += 1
    run.train_seconds += time.perf_counter() - start
    return step_loss


def _local_batch(run: RunState) -> tuple[int, list[int]]:
    """``(task index, indices of this process's slice of the next global batch)``: the epoch's schedule and the
    task's example order are functions of (seed, epoch) (:mod:`leantune.train.sampling`)."""
    epoch, position = divmod(run.progress.global_step, run.sizes.steps_per_epoch)
    seed = run.config.seed
    if run.schedule[0] != epoch:
        run.schedule = (epoch, epoch_schedule([t.batches_per_epoch for t in run.sizes.tasks], seed, epoch))
    task_index, number = run.schedule[1][position]
    if run.orders.get(task_index, (-1,))[0] != epoch:
        examples = len(run.tasks.tasks[task_index].splits["train"])
        run.orders[task_index] = (epoch, epoch_order(examples, seed, epoch, task_index))
    sizes = run.sizes.tasks[task_index]
    batch_ids = run.orders[task_index][1][number * sizes.global_batch:(number + 1) * sizes.global_batch]
    return task_index, batch_ids[run.context.rank * sizes.local_batch:(run.context.rank + 1) * sizes.local_batch]


def _diverged_message(what: str, value: float, run: RunState) -> str:
    last = run.last_checkpoint
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    return (f"{what} became {value} at step {run.progress.global_step + 1}; training stopped ({kept}). "
            "Lower the learning rate, or train in fp32.")


# --- 4. evaluate --------------------------------------------------------------------------------------------------
def validate(run: RunState) -> tuple[dict[str, float], bool]:
    """``({task: validation metric}, improved)``: improved when the tasks' average beats the best so far; an
    improvement becomes the best delta (``best/`` or kept in memory)."""
    progress = run.progress
    metrics = evaluate_tasks(run.model, run.encoders, "validation", run.config, run.context)
    metric = average(metrics)
    improved = metric > progress.best_metric
    if improved:
        progress.best_metric, progress.best_step, progress.best_task_metrics = metric, progress.global_step, metrics
        _keep_best(run)
    progress.history.append(_history_entry(run, metrics, improved))
    progress.loss_sum, progress.loss_count, progress.task_losses = 0.0, 0, {}
    if run.run_dir is not None and run.context.is_main:
        write_atomic_text(run.run_dir / LOG_NAME, "".join(json.dumps(h) + "\n" for h in progress.history))
    return metrics, improved


def _history_entry(run: RunState, metrics: dict[str, float], improved: bool) -> dict[str, Any]:
    """One line of ``log.jsonl``. Several tasks add each task's validation metric
    (``validation_<task>_<metric>``) and training loss (``train_loss_<task>``) beside the average."""
    progress = run.progress
    entry: dict[str, Any] = {
        "step": progress.global_step, "epoch": round(progress.global_step / run.sizes.steps_per_epoch, 4),
        "train_loss": progress.loss_sum / max(1, progress.loss_count),
        f"validation_{run.metric_name}": average(metrics),
    }
    if len(run.tasks) > 1:
        for task in run.tasks:
            loss_sum, steps = progress.task_losses.get(task.name, (0.0, 0))
            entry[f"train_loss_{task.name}"] = loss_sum / steps if steps else None
            entry[f"validation_{task.name}_{task.metric}"] = metrics[task.name]
    entry.update({"learning_rate": run.scheduler.get_last_lr()[0], "best": improved,
                  "elapsed_s": round(time.perf_counter() - run.wall_start, 2)})
    return entry


def validation_line(run: RunState, metrics: dict[str, float]) -> str:
    """The progress line of one evaluation: the metric, or the average and every task's metric."""
    if len(run.tasks) == 1:
        return f"validation {run.metric_name} {average(metrics):.4f}"
    tasks = ", ".join(f"{task.name} {task.metric} {metrics[task.name]:.4f}" for task in run.tasks)
    return f"validation average {average(metrics):.4f} ({tasks})"


def _keep_best(run: RunState) -> None:
    if run.run_dir is None:
        run.best_in_memory = {n: t.detach().clone() for n, t in run.model.delta_state_dict().items()}
    elif run.sharded:
        tensors = distributed.gathered_delta(run.model, keep=run.context.is_main)
        if run.context.is_main:
            ckpt.save_best(run.run_dir, run.model, tensors)
    elif run.context.is_main:
        ckpt.save_best(run.run_dir, run.model)


# --- 5. checkpoint ------------------------------------------------------------------------------------------------
def checkpoint(run: RunState) -> None:
    """A resumable checkpoint of the run (with a run directory): rank 0 writes it, or, under FSDP, every process
    writes its shards through ``torch.distributed.checkpoint`` and rank 0 the rest."""
    if run.run_dir is None:
        return
    context, step = run.context, run.progress.global_step
    state = {
        "global_step": step, "progress": asdict(run.progress), "epoch": step // run.sizes.steps_per_epoch,
        "position_in_epoch": step % run.sizes.steps_per_epoch, "data_order_seed": run.config.seed,
        "tasks": _task_layout(run),
        "scheduler": run.scheduler.state_dict(), "config": run.config.to_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "rng": distributed.gather_objects(ckpt.rng_state(), context),
    }
    if run.sharded:
        tmp = run.run_dir / ckpt.CHECKPOINTS / f".tmp-step-{step:06d}"
        if context.is_main:
            ckpt.begin_checkpoint(run.run_dir, step)
        distributed.barrier(context)
        distributed.save_sharded(tmp / ckpt.SHARDED, run.model, run.optimizer)
        distributed.barrier(context)
        if context.is_main:
            ckpt.write_state(tmp, state)
            ckpt.commit_checkpoint(run.run_dir, tmp, step)
    elif context.is_main:
        ckpt.save_checkpoint(run.run_dir, run.model, {**state, "optimizer": run.optimizer.state_dict()})
    distributed.barrier(context)
    run.last_checkpoint = run.run_dir / ckpt.CHECKPOINTS / f"step-{step:06d}"


# --- 6. finish ----------------------------------------------------------------------------------------------------
def finish(run: RunState) -> TrainResult:
    """Put the best delta back, score it on the test split, and write ``results.json``."""
    _restore_best(run)
    context, progress, sizes = run.context, run.progress, run.sizes
    with timed(run, "evaluate"):
        test_metrics = evaluate_tasks(run.model, run.encoders, "test", run.config, context)
    trainable, total = run.model.trainable_parameter_count()
    memory, memory_source = peak_memory(context.device)
    step_memory = None
    if run.config.measure_memory and not run.sharded:
        encoder = run.encoders[0]
        first_batch = encoder.batch(run.tasks.tasks[0].splits["train"][:sizes.tasks[0].micro_batch])
        with timed(run, "measure_memory"), phase("measuring the memory of one training step",
                                                 run.config.progress and context.is_main):
            step_memory = measure_step_memory(run.model, encoder, to_device(first_batch, context.device),
                                              run.config)
    run.phase_seconds["train"] = run.train_seconds
    result = TrainResult(
        metric=run.metric_name, best_step=progress.best_step,
        best_epoch=round(progress.best_step / sizes.steps_per_epoch, 4), validation_metric=progress.best_metric,
        test_metric=average(test_metrics), steps=sizes.total_steps, train_seconds=run.train_seconds,
        seconds_per_step=run.train_seconds / run.steps_run if run.steps_run else None,
        wall_seconds=time.perf_counter() - run.wall_start, peak_memory_bytes=int(memory),
        peak_memory_source=memory_source, trainable_parameters=trainable, total_parameters=total,
        history=progress.history, output_dir=str(run.run_dir) if run.run_dir is not None else None,
        step_memory=step_memory, communication=distributed.communication_summary(run.comm_state),
        task_metrics={task.name: {"metric": task.metric, "validation": progress.best_task_metrics.get(task.name),
                                  "test": test_metrics[task.name]} for task in run.tasks},
        steps_run=run.steps_run, phase_seconds={name: round(value, 3) for name, value in run.phase_seconds.items()},
        ladder_cache_bytes=run.ladder_cache_bytes,
    )
    if run.run_dir is not None and context.is_main:
        write_atomic_text(run.run_dir / RESULTS_NAME, json.dumps(result.to_dict(), indent=2) + "\n")
    distributed.barrier(context)
    return result


def _restore_best(run: RunState) -> None:
    """Put the best checkpoint's delta back into the model (every process reads ``best/``, or its memory copy)."""
    best_file = run.run_dir / ckpt.BEST / DELTA_NAME if run.run_dir is not None else None
    if best_file is not None and best_file.is_file():
        distributed.set_delta(run.model, load_file(str(best_file)))
    elif run.best_in_memory is not None:
        distributed.set_delta(run.model, run.best_in_memory)
