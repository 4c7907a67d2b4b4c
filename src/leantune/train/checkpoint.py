"""Resumable checkpoints: the delta weights plus optimizer, scheduler, RNG and data-order state.

Layout in a run directory::

    checkpoints/step-000120/delta.safetensors   trainable and added tensors (TunedModel.delta_state_dict)
    checkpoints/step-000120/state.pt            optimizer, scheduler, RNG states, progress, best-so-far
    checkpoints/step-000120/sharded/            (FSDP runs, instead of delta.safetensors and the optimizer in
                                                state.pt) every process's shards, torch.distributed.checkpoint
    checkpoints/latest                          the name of the newest complete checkpoint
    best/                                       the best checkpoint by validation metric (leantune.load-able)

Every checkpoint is written into a temporary directory that is renamed into place once complete, then
``latest`` is replaced atomically; a run killed at any moment leaves the previous checkpoint intact.
``state.pt`` holds plain data only (tensors, numbers, strings, lists, dicts) and is read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from leantune.api import TunedModel
from leantune.errors import CheckpointError
from leantune.files import write_atomic, write_atomic_text

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
DELTA = "delta.safetensors"
STATE = "state.pt"
SHARDED = "sharded"


# --- random generators ----------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The state of every random generator training may draw from, as tensors and plain Python values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [str(kind), keys.tolist(), int(position), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- writing ----------------------------------------------------------------------------------------------------
def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor (an FSDP-sharded DTensor is gathered first: a collective call)."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu").contiguous()


def begin_checkpoint(run_dir: Path, global_step: int) -> Path:
    """An empty temporary directory for the checkpoint of ``global_step`` (the same path on every process)."""
    tmp = run_dir / CHECKPOINTS / f".tmp-step-{global_step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_delta(directory: Path, tuned: TunedModel) -> None:
    tensors = {n: local_tensor(t) for n, t in tuned.delta_state_dict().items()}
    write_atomic(directory / DELTA, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def write_state(directory: Path, state: dict[str, Any]) -> None:
    write_atomic(directory / STATE, lambda tmp: torch.save(state, tmp))


def commit_checkpoint(run_dir: Path, tmp: Path, global_step: int) -> Path:
    """Rename the complete ``tmp`` into ``checkpoints/step-N``, point ``latest`` at it, remove older ones."""
    root = run_dir / CHECKPOINTS
    name = f"step-{global_step:06d}"
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    write_atomic_text(root / LATEST, name + "\n")
    for old in root.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(run_dir: Path, tuned: TunedModel, state: dict[str, Any]) -> Path:
    """Write ``checkpoints/step-N`` (delta + ``state``) from one process."""
    tmp = begin_checkpoint(run_dir, state["global_step"])
    write_delta(tmp, tuned)
    write_state(tmp, state)
    return commit_checkpoint(run_dir, tmp, state["global_step"])


# --- reading ----------------------------------------------------------------------------------------------------
def is_sharded(path: Path) -> bool:
    """Whether the checkpoint at ``path`` was written by an FSDP run (torch.distributed.checkpoint shards)."""
    return (path / SHARDED / ".metadata").is_file()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or ``None``."""
    pointer = run_dir / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = run_dir / CHECKPOINTS / pointer.read_text().strip()
    if not (path / STATE).is_file() or not ((path / DELTA).is_file() or is_sharded(path)):
        raise CheckpointError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def read_state(path: Path) -> dict[str, Any]:
    """The training state of the checkpoint at ``path`` (plain data: loaded with ``weights_only=True``)."""
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
        raise CheckpointError(f"{path / STATE} cannot be read as a leantune training state ({err})") from None
    if not isinstance(state, dict) or "progress" not in state:
        raise CheckpointError(f"{path / STATE} was written by an older leantune; start the run again")
    return state


def load_delta(path: Path, tuned: TunedModel) -> None:
    """Restore the delta weights of the (unsharded) checkpoint at ``path`` into ``tuned``."""
    tensors = load_file(str(path / DELTA))
    expected = tuned.delta_state_dict()
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))[:3]
        unexpected = sorted(set(tensors) - set(expected))[:3]
        raise CheckpointError(f"{path} does not match this model and method (missing {missing}, "
                              f"unexpected {unexpected}); was it made with other settings?")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])


# --- the best checkpoint ----------------------------------------------------------------------------------------
def save_best(run_dir: Path, tuned: TunedModel, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Replace ``best/`` with ``tuned``'s delta (or ``tensors``, its gathered values): written beside it, then
    swapped in by renames."""
    best = run_dir / BEST
    tmp, old = run_dir / f".{BEST}.tmp{os.getpid()}", run_dir / f".{BEST}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tuned.save_pretrained(tmp, state_dict=tensors)
    if best.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(best, old)
    os.rename(tmp, best)
    shutil.rmtree(old, ignore_errors=True)


def recover_best(run_dir: Path) -> None:
    """If a run died between the two renames of :func:`save_best`, put the previous best back."""
    best, old = run_dir / BEST, run_dir / f".{BEST}.old"
    if not best.exists() and old.exists():
        os.rename(old, best)
    for leftover in run_dir.glob(f".{BEST}.tmp*"):
        shutil.rmtree(leftover, ignore_errors=True)
