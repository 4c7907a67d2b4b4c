"""Worker of tests/test_fish_ddp.py, launched with ``torchrun --nproc_per_node 2`` (gloo, CPU).

Each rank trains the tiny BERT classifier on its half of every global batch:
1. masked mode under DDP with the method's communication hook (``tuned.method.ddp_comm_hook``, as the trainer);
2. sparse mode under DDP (the hook sends the k values and the head whole);
3. masks that differ between the ranks, which the hook's check refuses;
4. sparse mode without DDP, merging disjoint per-worker deltas every ``MERGE_EVERY`` steps by sum.
Rank 0 writes the trained tensors and the bytes sent; every rank writes its merge states.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(__file__))
from fish_ddp_common import (  # noqa: E402
    GLOBAL_BATCH,
    KEEP_RATIO,
    MERGE_EVERY,
    STEPS,
    global_batch,
    optimizer_for,
    optimizer_step,
    wrapped,
)
from tiny import make_model  # noqa: E402

import leantune  # noqa: E402
from leantune.errors import ConfigError  # noqa: E402
from leantune.methods.fish import PeriodicMerger  # noqa: E402


def local_half(step: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    share = GLOBAL_BATCH // world_size
    return {k: v[rank * share : (rank + 1) * share] for k, v in global_batch(step).items()}


def train_ddp(mode: str, mask_path: str, rank: int, world_size: int) -> dict:
    tuned = wrapped(mode, mask_path)
    ddp = DistributedDataParallel(tuned)
    state, hook = tuned.method.ddp_comm_hook(tuned)
    ddp.register_comm_hook(state, hook)
    optimizer = optimizer_for(tuned)
    for step in range(STEPS):
        ddp(**local_half(step, rank, world_size)).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in tuned.parameters() if p.requires_grad], 1.0)
        optimizer_step(tuned, optimizer)
    return {"weights": {n: t.detach().clone() for n, t in tuned.delta_state_dict().items()},
            "bytes_per_step": state.bytes_per_step, "dense_bytes_per_step": state.dense_bytes_per_step}


def train_merged(mask_path: str, rank: int, world_size: int) -> dict:
    tuned = wrapped("sparse", mask_path, num_workers=world_size)
    merger = PeriodicMerger(tuned, every=MERGE_EVERY, reduce="sum", disjoint=True)
    optimizer = optimizer_for(tuned)
    start = [p.detach().clone() for p in merger.tensors]
    merged = []
    for step in range(MERGE_EVERY):
        tuned(**local_half(step, rank, world_size)).loss.backward()
        optimizer_step(tuned, optimizer)
        before = [p.detach().clone() for p in merger.tensors]
        merged.append(merger.step())
    owners = {n: d.owner for n, d in tuned.method.deltas().items()}
    return {"start": start, "before": before, "after": [p.detach().clone() for p in merger.tensors],
            "merged": merged, "names": [n for n, p in tuned.named_parameters() if p.requires_grad],
            "owners": owners, "bytes_sent": merger.bytes_sent}


def different_masks_refused(rank: int) -> str:
    """Random masks seeded by rank differ between the ranks: the method's comm hook must refuse them."""
    config = leantune.make_config("fish", mode="masked", mask_type="random", seed=rank, keep_ratio=KEEP_RATIO)
    tuned = leantune.wrap(make_model("bert"), config)
    try:
        tuned.method.ddp_comm_hook(tuned)
    except ConfigError as err:
        return str(err)
    return ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mask", required=True)
    parser.add_argument("--disjoint-mask", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = {mode: train_ddp(mode, args.mask, rank, world_size) for mode in ("masked", "sparse")}
    results["refused"] = different_masks_refused(rank)
    merge = train_merged(args.disjoint_mask, rank, world_size)
    torch.save(merge, os.path.join(args.out, f"merge_rank{rank}.pt"))
    if rank == 0:
        torch.save(results, os.path.join(args.out, "ddp.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
