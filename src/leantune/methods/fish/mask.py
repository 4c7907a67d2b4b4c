"""Which entries FISH trains: global top-k of scores, the random and bias baselines, and mask files.

A mask is a sorted flat int64 index vector per tensor name; masks built for disjoint periodic-merge workers also
carry an int8 owner (worker rank) per selected entry. Mask files are safetensors, written atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from leantune.errors import ConfigError, LeantuneError, UnsupportedMethodError
from leantune.files import write_atomic

MASK_FORMAT = "leantune-fish-mask"
OWNER_SUFFIX = "::owner"


@dataclass
class FishMask:
    """Selected entries: sorted flat int64 indices per tensor name; ``owners`` (int8) for disjoint worker masks."""

    indices: dict[str, torch.Tensor]
    owners: dict[str, torch.Tensor] | None = None

    def count(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())


def select_top_k(scores: dict[str, torch.Tensor], k: int, num_workers: int = 1) -> FishMask:
    """One global top-``k x num_workers`` over every score; with several workers, entries are dealt out by rank
    in score order (ranks 0, W, 2W, ... to worker 0), as the paper's disjoint masks."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    total_k = k * num_workers
    if total_k > flat.numel():
        raise ConfigError(f"FishConfig: cannot select {total_k} entries ({k} x {num_workers} workers) from "
                          f"{flat.numel()} candidate parameters; lower keep_ratio or num_workers")
    top = torch.topk(flat, total_k, sorted=True).indices
    owner_flat = torch.full((flat.numel(),), -1, dtype=torch.int8, device=flat.device)
    owner_flat[top] = (torch.arange(total_k, device=flat.device) % num_workers).to(torch.int8)
    indices, owners, offset = {}, {}, 0
    for name in names:
        size = scores[name].numel()
        owned = owner_flat[offset : offset + size]
        chosen = torch.nonzero(owned >= 0).flatten()
        if chosen.numel():
            indices[name] = chosen
            owners[name] = owned[chosen]
        offset += size
    return FishMask(indices, owners if num_workers > 1 else None)


def random_scores(params: dict[str, nn.Parameter], seed: int) -> dict[str, torch.Tensor]:
    """Uniform random scores (the ``random`` baseline: top-k of them is a uniformly random subset)."""
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.numel(), generator=generator) for n, p in params.items()}


def bias_mask(params: dict[str, nn.Parameter]) -> FishMask:
    """Every entry of every bias (BitFit); ignores the budget."""
    indices = {n: torch.arange(p.numel()) for n, p in params.items() if n.rsplit(".", 1)[-1] == "bias"}
    if not indices:
        raise UnsupportedMethodError("FishConfig.mask_type='bitfit': the model has no bias parameters")
    return FishMask(indices)


def save_mask(mask: FishMask, path: str | os.PathLike) -> None:
    """Write ``mask`` to a safetensors file (atomically, fsynced) for reuse with ``FishConfig(mask_path=...)``."""
    tensors = {n: i.to("cpu", torch.int64).contiguous() for n, i in mask.indices.items()}
    if mask.owners is not None:
        tensors.update({n + OWNER_SUFFIX: o.to("cpu").contiguous() for n, o in mask.owners.items()})
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": MASK_FORMAT}))


def load_mask(path: str | os.PathLike, params: dict[str, nn.Parameter]) -> FishMask:
    """Read a mask written by :func:`save_mask` and check it against ``params`` (names, index ranges)."""
    if not Path(path).is_file():
        raise ConfigError(f"FishConfig.mask_path: {path} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"FishConfig.mask_path: {path} is not a safetensors mask file ({err})") from None
    indices = {n: t for n, t in tensors.items() if not n.endswith(OWNER_SUFFIX)}
    owners = {n[: -len(OWNER_SUFFIX)]: t for n, t in tensors.items() if n.endswith(OWNER_SUFFIX)}
    for name, idx in indices.items():
        if name not in params:
            raise ConfigError(f"FishConfig.mask_path: {path} selects entries of {name!r}, which is not a "
                              f"trainable candidate of this model")
        check_indices(idx, params[name].numel(), f"FishConfig.mask_path: {path}: tensor {name!r}", ConfigError)
    device = next(iter(params.values())).device
    return FishMask({n: t.to(device) for n, t in indices.items()},
                    {n: t.to(device) for n, t in owners.items()} if owners else None)


def check_indices(idx: torch.Tensor, size: int, where: str, error: type[LeantuneError]) -> None:
    """Raise ``error`` unless ``idx`` is a sorted, unique, 1-D int32/int64 index vector into ``size`` entries."""
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise error(f"{where}: indices must be a 1-D int32/int64 tensor, got {idx.dtype} {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size or not bool((idx[1:] > idx[:-1]).all())):
        raise error(f"{where}: indices must be sorted, unique and within [0, {size})")
