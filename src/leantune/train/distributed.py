"""Multi-process training under ``torchrun``: gloo on CPU, NCCL on GPU.

Only the trainable parameters are synchronised. At the start rank 0 broadcasts them (so every process starts
from the same delta even if initialisation differed); after each backward pass their gradients are averaged
with one all-reduce of a flat buffer. The frozen backbone is never communicated: every process loads it from
the same weights. Each process takes an equal slice of every global batch, so a run on N processes computes
the same update as one process on the whole batch. Optionally (``fsdp``) the model is sharded with FSDP2's
``fully_shard`` per transformer block, for backbones that do not fit on one GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> DistContext:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), else run as one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if world_size <= 1:
        return DistContext(device=torch.device(device or ("cuda" if use_cuda else "cpu")))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), device=target)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def broadcast_trainable(model: nn.Module, context: DistContext) -> None:
    """Copy rank 0's trainable parameters to every process."""
    if not context.distributed:
        return
    with torch.no_grad():
        for p in trainable_parameters(model):
            dist.broadcast(p.data, src=0)


def average_gradients(model: nn.Module, context: DistContext) -> None:
    """Average the trainable parameters' gradients over all processes with one flat all-reduce."""
    if not context.distributed:
        return
    params = trainable_parameters(model)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= context.world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def all_true(flag: bool, context: DistContext) -> bool:
    """True only if ``flag`` is true on every process."""
    if not context.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def gather_objects(value: Any, context: DistContext) -> list[Any]:
    """Every process's ``value``, in rank order (a one-element list when not distributed)."""
    if not context.distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(context: DistContext) -> None:
    if context.distributed:
        dist.barrier()


def shard_model(model: nn.Module, block_modules: list[nn.Module]) -> nn.Module:
    """FSDP2: shard each transformer block, then the rest of the model (parameters gathered per block)."""
    from torch.distributed.fsdp import fully_shard

    for block in block_modules:
        fully_shard(block)
    fully_shard(model)
    return model


def cleanup(context: DistContext) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()
