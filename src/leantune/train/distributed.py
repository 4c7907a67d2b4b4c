"""Several processes under ``torchrun`` on torch's own engines: DDP (with the method's comm hook) or FSDP2.

Gloo on CPU, NCCL on GPU. Each process takes an equal slice of every global batch, so a run on N processes
computes the same update as one process on the whole batch.

* **DDP** (default): the tuned model is wrapped in ``DistributedDataParallel``. DDP itself leaves out the frozen
  parameters (they do not require grad), copies rank 0's parameters and buffers to every process once at
  construction, and averages the trainable gradients in buckets during backward. A method that communicates less
  than a dense all-reduce (FISH's selected entries) hands DDP its communication hook
  (``TuningMethod.ddp_comm_hook``); its byte counts end up in the run's results.
* **FSDP2** (``fsdp=True``): ``fully_shard`` per transformer block, then the whole tuned model, for backbones that
  do not fit one device. Checkpoints are sharded through ``torch.distributed.checkpoint`` (every process writes
  its shards of the delta and of the optimizer state); ``best/`` is gathered into one ``leantune.load``-able delta.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from leantune.api import TunedModel


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


def close() -> None:
    """Leave the process group, if one was joined: call it once the process is done with distributed work (a
    process that exits with the group still open can abort in its communication threads)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# --- DDP --------------------------------------------------------------------------------------------------------
def wrap_ddp(model: TunedModel, context: DistContext) -> tuple[DistributedDataParallel, Any]:
    """``(DDP module, comm-hook state or None)``: ``model`` in ``DistributedDataParallel`` with its method's hook.

    Buffers are not re-broadcast at every forward (transformers' buffers are constants). A method with per-call
    inputs may route a batch through some of its modules only (one adapter per task), so DDP then looks for
    parameters a step did not use.
    """
    ddp = DistributedDataParallel(
        model, device_ids=[context.device.index] if context.device.type == "cuda" else None,
        broadcast_buffers=False, find_unused_parameters=bool(model.method.declared_inputs()),
    )
    hook = model.method.ddp_comm_hook(model)
    if hook is None:
        return ddp, None
    state, communication_hook = hook
    ddp.register_comm_hook(state, communication_hook)
    return ddp, state


def gradient_sync(module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """For gradient accumulation: DDP's ``no_sync()`` on every micro-batch but the last (``sync=False``)."""
    if isinstance(module, DistributedDataParallel) and not sync:
        return module.no_sync()
    return contextlib.nullcontext()


def communication_summary(state: Any) -> dict[str, Any] | None:
    """The bytes a comm hook counted (``bytes_per_step``, ``dense_bytes_per_step``), summarised for the results."""
    sent = list(getattr(state, "bytes_per_step", None) or [])
    if not sent:
        return None
    dense = list(getattr(state, "dense_bytes_per_step", None) or [])
    summary: dict[str, Any] = {
        "comm_hook": type(state).__name__, "steps_counted": len(sent), "total_bytes": sum(sent),
        "bytes_per_step_min": min(sent), "bytes_per_step_max": max(sent),
    }
    if dense:
        summary["dense_bytes_per_step"] = max(dense)
        summary["fraction_of_dense"] = sum(sent) / max(1, sum(dense))
    return summary


# --- FSDP2 ------------------------------------------------------------------------------------------------------
def shard_model(model: TunedModel, block_modules: list[nn.Module]) -> TunedModel:
    """FSDP2: shard each transformer block, then the rest of the model (parameters gathered per block).

    ``generate`` is registered as a forward method, so generation gathers the root's parameters too.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in block_modules:
        fully_shard(block)
    fully_shard(model)
    register_fsdp_forward_method(model, "generate")
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def _delta_and_optimizer(model: TunedModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The sharded delta and optimizer state, keyed by parameter name (references, nothing gathered)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    delta_names = set(model.delta_state_dict())
    return {"delta": {n: t for n, t in model_state.items() if n in delta_names}, "optimizer": optimizer_state}


def save_sharded(directory: Path, model: TunedModel, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of the delta and of the optimizer state (a collective call)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_delta_and_optimizer(model, optimizer), checkpoint_id=str(directory))


def load_sharded(directory: Path, model: TunedModel, optimizer: torch.optim.Optimizer) -> None:
    """Restore what :func:`save_sharded` wrote into the sharded ``model`` and its ``optimizer`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _delta_and_optimizer(model, optimizer)
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["delta"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))


def gathered_delta(model: TunedModel, keep: bool) -> dict[str, torch.Tensor] | None:
    """The delta as plain CPU tensors, sharded ones gathered (a collective call); kept only where ``keep``."""
    gathered = {}
    for name, tensor in model.delta_state_dict().items():
        full = (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().to("cpu")
        if keep:
            gathered[name] = full.contiguous()
    return gathered if keep else None


@torch.no_grad()
def set_delta(model: TunedModel, tensors: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (or same-placement shards) into ``model``'s delta, sharded or not."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, target in model.delta_state_dict().items():
        value = tensors[name]
        if isinstance(target, DTensor) and not isinstance(value, DTensor):
            value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements,
                                      src_data_rank=None)
        target.copy_(value)


# --- collectives ------------------------------------------------------------------------------------------------
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

