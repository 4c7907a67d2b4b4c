"""The data order of a run: which task and which examples each step trains on, as pure functions of
(seed, epoch), so a resumed run repeats the order exactly.

An epoch runs every task's training examples once, in batches of that task alone (a task's last incomplete
batch is dropped). Task *t*'s examples are shuffled by (seed, epoch, t); the sequence of task batches is
shuffled by (seed, epoch): proportional round-robin, as VL-Adapter's ``MultitaskLoader``, where a task with twice
the batches comes up twice as often. One task is the one-task case: its batches in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SCHEDULE_STREAM = -1
_STREAM_STRIDE = 0x9E37_79B9_7F4A_7C15  # an odd 64-bit constant: streams of one (seed, epoch) far apart
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """The generator of one (seed, epoch, stream); stream 0 (the first task) keeps the single-task seeding."""
    value = seed * 1_000_003 + epoch + stream * _STREAM_STRIDE
    if not _SEED_MIN <= value <= _SEED_MAX:
        value %= 2**64
    return torch.Generator().manual_seed(value)


def epoch_order(num_examples: int, seed: int, epoch: int, task_index: int = 0) -> list[int]:
    """The shuffled example order of one task in one epoch, a function of (seed, epoch, task_index) only."""
    return torch.randperm(num_examples, generator=_generator(seed, epoch, task_index)).tolist()


def epoch_schedule(batches_per_task: Sequence[int], seed: int, epoch: int) -> list[tuple[int, int]]:
    """``(task index, batch number within the task)`` for every step of one epoch: each task contributes exactly
    ``batches_per_task[t]`` batches, numbered in order, at positions shuffled by (seed, epoch)."""
    slots = [task for task, count in enumerate(batches_per_task) for _ in range(count)]
    if len(batches_per_task) > 1:
        permutation = torch.randperm(len(slots), generator=_generator(seed, epoch, SCHEDULE_STREAM)).tolist()
        slots = [slots[i] for i in permutation]
    taken = [0] * len(batches_per_task)
    schedule = []
    for task in slots:
        schedule.append((task, taken[task]))
        taken[task] += 1
    return schedule
