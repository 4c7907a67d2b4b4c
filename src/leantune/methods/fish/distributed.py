"""Distributed training with FISH masks: a sparse DDP communication hook and the paper's periodic merging.

Launch with ``torchrun`` (gloo on CPU, NCCL on GPU); every rank must hold the same mask, so build it once and pass
``FishConfig(mask_path=...)`` to every rank (:meth:`Fish.ddp_comm_hook` checks this).

* :func:`sparse_allreduce_hook` with a :class:`SparseCommState`, from ``tuned.method.ddp_comm_hook(tuned)``: DDP
  all-reduces only the selected entries of each gradient bucket. In ``masked`` mode the buckets hold dense (masked)
  gradients and the hook sends their k selected entries; in ``sparse`` mode the trainable tensors already are the
  k values (plus the head), so the hook sends whole buckets, exactly as DDP's default all-reduce, and only counts
  bytes. Indices never travel per step: the mask is fixed and identical on every rank.
* :class:`PeriodicMerger` -- workers train locally (no DDP); every ``every`` steps their deltas since the last
  merge are summed or averaged over the workers. Masks are shared, or disjoint per worker (built with
  ``FishConfig(num_workers=world_size)``: the top ``world_size x k`` entries dealt out by rank in score order).
"""

# No ``from __future__ import annotations``: DDP checks the hook's annotations as real objects.
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from leantune.errors import ConfigError, UnsupportedMethodError
from leantune.methods.fish.mask import FishMask

if TYPE_CHECKING:
    from leantune.methods.fish.method import Fish

logger = logging.getLogger("leantune.fish")


@dataclass
class SparseCommState:
    """State of :func:`sparse_allreduce_hook`: which entries of which parameter to send, and the bytes sent.

    ``selections`` maps a parameter (by identity) to the flat positions to send; parameters absent from it are
    sent whole. ``bytes_per_step[i]`` is what this rank handed to all-reduce in step i (payload bytes), and
    ``dense_bytes_per_step[i]`` what DDP's default all-reduce would have handed over (the whole buckets).
    """

    selections: WeakIdKeyDictionary
    process_group: Any = None
    log_every: int = 0
    bytes_per_step: list[int] = field(default_factory=list)
    dense_bytes_per_step: list[int] = field(default_factory=list)
    _step_bytes: int = 0
    _step_dense_bytes: int = 0
    _positions: dict[int, tuple[tuple[int, ...], torch.Tensor | None]] = field(default_factory=dict)

    def bucket_positions(self, bucket: dist.GradBucket) -> torch.Tensor | None:
        """Flat positions in the bucket's buffer to send; None when the whole bucket goes."""
        params = bucket.parameters()
        ids = tuple(id(p) for p in params)
        cached = self._positions.get(bucket.index())
        if cached is not None and cached[0] == ids:
            return cached[1]
        positions = None
        if any(p in self.selections for p in params):
            buffer = bucket.buffer()
            parts = []
            for param, grad in zip(params, bucket.gradients()):
                offset = (grad.data_ptr() - buffer.data_ptr()) // buffer.element_size()
                chosen = self.selections[param] if param in self.selections else None
                if chosen is None:
                    chosen = torch.arange(grad.numel(), device=buffer.device)
                parts.append(chosen.to(buffer.device) + offset)
            positions = torch.cat(parts)
        self._positions[bucket.index()] = (ids, positions)
        return positions

    def record(self, sent: int, dense: int, last_bucket: bool) -> None:
        """Add one bucket's bytes; the last bucket of a step closes the step's counts."""
        self._step_bytes += sent
        self._step_dense_bytes += dense
        if last_bucket:
            self.bytes_per_step.append(self._step_bytes)
            self.dense_bytes_per_step.append(self._step_dense_bytes)
            step = len(self.bytes_per_step)
            if self.log_every and step % self.log_every == 0:
                logger.info("fish DDP step %d: sent %d bytes, dense all-reduce would send %d (%.3f%%)",
                            step, self._step_bytes, self._step_dense_bytes,
                            100 * self._step_bytes / max(1, self._step_dense_bytes))
            self._step_bytes = self._step_dense_bytes = 0


def sparse_allreduce_hook(state: SparseCommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average only the selected entries of the bucket over the ranks.

    Unselected entries of masked gradients are exactly zero on every rank, so the bucket is correct after the
    selected entries are written back.
    """
    buffer = bucket.buffer()
    positions = state.bucket_positions(bucket)
    world_size = dist.get_world_size(state.process_group)
    payload = buffer if positions is None else buffer.index_select(0, positions)
    payload.div_(world_size)
    state.record(payload.numel() * payload.element_size(), buffer.numel() * buffer.element_size(), bucket.is_last())
    future = dist.all_reduce(payload, group=state.process_group, async_op=True).get_future()

    def write_back(done: torch.futures.Future) -> torch.Tensor:
        reduced = done.value()[0]
        return reduced if positions is None else buffer.index_copy_(0, positions, reduced)

    return future.then(write_back)


def check_same_mask(mask: FishMask, process_group: Any = None) -> None:
    """Raise ``ConfigError`` unless every rank selected the same entries (count and two checksums compared)."""
    count, first, second = 0, 0, 0
    for number, (name, idx) in enumerate(sorted(mask.indices.items()), start=1):
        count += idx.numel()
        first += int(idx.sum()) * number
        second += int((idx * idx % 1_000_003).sum()) + len(name)
    stats = torch.tensor([count, first, second], dtype=torch.int64)
    if dist.get_backend(process_group) == "nccl":
        stats = stats.cuda()
    high, low = stats.clone(), stats.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=process_group)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=process_group)
    if not torch.equal(high, low):
        raise ConfigError("fish: the ranks hold different masks (Fisher scores from different data?); build the "
                          "mask once, save it with save_mask(), and pass FishConfig(mask_path=...) on every rank")


def fish_method(tuned: Any) -> "Fish":
    """The :class:`Fish` method of a tuned model; ``UnsupportedMethodError`` for any other method."""
    from leantune.methods.fish.method import Fish  # method.py imports this module

    method = getattr(tuned, "method", None)
    if not isinstance(method, Fish):
        raise UnsupportedMethodError(f"expected a model wrapped with method 'fish', got {type(method).__name__}")
    return method


def register_sparse_comm_hook(
    ddp_model: nn.parallel.DistributedDataParallel, tuned: Any, process_group: Any = None, log_every: int = 0
) -> SparseCommState:
    """Install the fish hook on ``ddp_model`` (which wraps ``tuned``) and return its state.

    The same as ``ddp_model.register_comm_hook(*tuned.method.ddp_comm_hook(tuned))`` with a process group and
    ``log_every`` (> 0: log the bytes sent every that many steps).
    """
    state, hook = fish_method(tuned).ddp_comm_hook(tuned, process_group, log_every)
    ddp_model.register_comm_hook(state, hook)
    return state


class PeriodicMerger:
    """The paper's distributed mode: local training, and every ``every`` steps the workers' sparse deltas since the
    last merge are summed (``reduce="sum"``) or averaged (``"mean"``) into a merged state every worker continues
    from. Each worker keeps its own optimizer state. Sparse mode only: what travels is the k values plus the head.

    With ``disjoint=True`` the mask must have been built with ``FishConfig(num_workers=world_size)``; each worker
    then trains only the entries it owns (gradients and weight decay of the others are zero), so summing gives
    every worker's update exactly. The decay restriction is a rule on the model's :class:`Fish` method, applied by
    ``before_optimizer_step``.
    """

    def __init__(
        self, tuned: Any, every: int, reduce: str = "mean", disjoint: bool = False, process_group: Any = None
    ) -> None:
        method = fish_method(tuned)
        if method.config.mode != "sparse":
            raise ConfigError(f"PeriodicMerger needs FishConfig.mode='sparse', got {method.config.mode!r}")
        if not isinstance(every, int) or every < 1:
            raise ConfigError(f"PeriodicMerger.every must be a positive integer, got {every!r}")
        if reduce not in ("sum", "mean"):
            raise ConfigError(f"PeriodicMerger.reduce must be 'sum' or 'mean', got {reduce!r}")
        self.every, self.reduce, self.process_group = every, reduce, process_group
        self.world_size = dist.get_world_size(process_group)
        self.tensors = [p for p in tuned.parameters() if p.requires_grad]
        self.anchors = [p.detach().clone() for p in self.tensors]
        self.steps = self.merges = self.bytes_sent = 0
        self.hooks = []
        if disjoint:
            self._own_entries_only(method, dist.get_rank(process_group))

    def _own_entries_only(self, method: "Fish", rank: int) -> None:
        if method.config.num_workers != self.world_size:
            raise ConfigError(f"PeriodicMerger(disjoint=True) on {self.world_size} workers needs a mask built with "
                              f"FishConfig.num_workers={self.world_size}, got {method.config.num_workers}")
        for name, delta in method.deltas().items():
            if delta.owner is None:
                raise ConfigError(f"PeriodicMerger(disjoint=True): the mask of {name!r} has no owners; build it "
                                  f"with FishConfig(num_workers={self.world_size})")
            owned = (delta.owner == rank).to(delta.values.dtype)
            self.hooks.append(delta.values.register_hook(lambda grad, owned=owned: grad * owned))
            method.decay_only_at(delta.values, torch.nonzero(owned).flatten())

    def step(self) -> bool:
        """Count one optimizer step; merge when ``every`` steps have passed. True when it merged."""
        self.steps += 1
        if self.steps % self.every:
            return False
        self.merge()
        return True

    @torch.no_grad()
    def merge(self) -> None:
        """All-reduce the deltas since the last merge and move every worker to the merged state."""
        deltas = torch.cat([(p - a).reshape(-1) for p, a in zip(self.tensors, self.anchors)])
        dist.all_reduce(deltas, group=self.process_group)
        if self.reduce == "mean":
            deltas.div_(self.world_size)
        self.bytes_sent += deltas.numel() * deltas.element_size()
        offset = 0
        for param, anchor in zip(self.tensors, self.anchors):
            anchor.add_(deltas[offset : offset + anchor.numel()].view_as(anchor))
            param.copy_(anchor)
            offset += anchor.numel()
        self.merges += 1
        logger.info("fish merge %d after step %d: sent %d bytes", self.merges, self.steps, self.bytes_sent)
