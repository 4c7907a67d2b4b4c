"""Resumable checkpoints: the delta weights plus optimizer, scheduler, RNG and data-order state.

Layout in a run directory::

    checkpoints/step-000120/delta.safetensors   trainable and added tensors (TunedModel.delta_state_dict)
    checkpoints/step-000120/state.pt            optimizer, scheduler, RNG states, progress, best-so-far
    checkpoints/step-000120/sharded/            (FSDP runs, instead of delta.safetensors and the optimizer in
                                                state.pt) every process's shards, torch.distributed.checkpoint
    checkpoints/step-000120/manifest.json       the SHA-256 of every other file of the checkpoint, written last
    checkpoints/latest                          the name of the newest complete checkpoint
    best/                                       the best checkpoint by validation metric (leantune.load-able)

Every checkpoint is written into a temporary directory that is renamed into place once complete, then
``latest`` is replaced atomically; a run killed at any moment leaves the previous checkpoint intact. The two
newest checkpoints are kept. Resuming reads and verifies a checkpoint completely (every file against the
manifest, then ``state.pt`` and the delta parsed) before anything is applied; a damaged newest checkpoint is
skipped with a one-line warning for the previous intact one, and with none intact :class:`CheckpointError`
names the damaged files. Sharded (FSDP) checkpoints are verified the same way, file by file, before
``torch.distributed.checkpoint`` reads them.
``state.pt`` holds plain data only (tensors, numbers, strings, lists, dicts) and is read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from leantune.api import TunedModel
from leantune.errors import CheckpointError
from leantune.files import sha256_file, write_atomic, write_atomic_text

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
DELTA = "delta.safetensors"
STATE = "state.pt"
SHARDED = "sharded"
MANIFEST = "manifest.json"
KEEP = 2
"""How many checkpoints a run keeps: the newest and, should it be damaged, the one before it."""

logger = logging.getLogger("leantune.checkpoint")


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


def write_manifest(directory: Path) -> None:
    """Write ``manifest.json``: the SHA-256 of every file under ``directory`` (sharded ones too), atomically."""
    files = {p.relative_to(directory).as_posix(): sha256_file(p)
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    write_atomic_text(directory / MANIFEST, json.dumps({"sha256": files}, indent=1) + "\n")


def commit_checkpoint(run_dir: Path, tmp: Path, global_step: int) -> Path:
    """Checksum the complete ``tmp``, rename it into ``checkpoints/step-N``, point ``latest`` at it, and keep only
    the :data:`KEEP` newest checkpoints."""
    write_manifest(tmp)
    root = run_dir / CHECKPOINTS
    name = f"step-{global_step:06d}"
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    write_atomic_text(root / LATEST, name + "\n")
    kept = {p.name for p in checkpoint_dirs(run_dir)[:KEEP]} | {name}
    for old in root.iterdir():
        if old.is_dir() and old.name not in kept:
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


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's ``checkpoints/step-N`` directories, newest first (complete or not)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    steps = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(steps, key=lambda p: int(p.name[5:]), reverse=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run (the one ``latest`` names, else the newest directory), or ``None``;
    unverified: :func:`read_newest_intact` is what resuming uses."""
    pointer = run_dir / CHECKPOINTS / LATEST
    if pointer.is_file() and (run_dir / CHECKPOINTS / pointer.read_text().strip()).is_dir():
        return run_dir / CHECKPOINTS / pointer.read_text().strip()
    found = checkpoint_dirs(run_dir)
    return found[0] if found else None


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint read into memory: its training state and (unsharded) delta tensors."""

    path: Path
    state: dict[str, Any]
    delta: dict[str, torch.Tensor] | None  # None for a sharded checkpoint (read by torch.distributed.checkpoint)


def verify_checkpoint(path: Path) -> list[str]:
    """What is wrong with the checkpoint at ``path`` (empty when every file matches its manifest checksum)."""
    manifest = path / MANIFEST
    try:
        recorded = json.loads(manifest.read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if not isinstance(recorded, dict) or not recorded:
        return [f"{manifest} is missing or unreadable"]
    problems = []
    if STATE not in recorded or not (DELTA in recorded or any(n.startswith(SHARDED + "/") for n in recorded)):
        problems.append(f"{manifest} lists no {STATE} or no delta")
    for name, digest in recorded.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif sha256_file(file) != digest:
            problems.append(f"{file} does not match its checksum")
    return problems


def read_checkpoint(path: Path) -> LoadedCheckpoint:
    """Verify the checkpoint at ``path`` and read it whole into memory; :class:`CheckpointError` if damaged."""
    problems = verify_checkpoint(path)
    if problems:
        raise CheckpointError("; ".join(problems))
    state = read_state(path)
    if is_sharded(path):
        return LoadedCheckpoint(path, state, None)
    try:
        delta = load_file(str(path / DELTA))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path / DELTA} cannot be read as safetensors ({err})") from None
    return LoadedCheckpoint(path, state, delta)


def read_newest_intact(run_dir: Path) -> LoadedCheckpoint | None:
    """The newest checkpoint that verifies and reads, or ``None`` without checkpoints. A damaged newer one is
    skipped with a one-line warning; with none intact, :class:`CheckpointError` names every damaged file."""
    damaged: list[str] = []
    for path in checkpoint_dirs(run_dir):
        try:
            loaded = read_checkpoint(path)
        except CheckpointError as err:
            damaged.append(f"{path.name}: {err}")
            continue
        if damaged:
            logger.warning("leantune: skipped damaged checkpoint(s) (%s); resuming from %s",
                           "; ".join(damaged), path.name)
        return loaded
    if damaged:
        raise CheckpointError(f"no intact checkpoint to resume in {run_dir / CHECKPOINTS} ({'; '.join(damaged)})")
    return None


def read_state(path: Path) -> dict[str, Any]:
    """The training state of the checkpoint at ``path`` (plain data: loaded with ``weights_only=True``)."""
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{path / STATE} cannot be read as a leantune training state ({err})") from None
    if not isinstance(state, dict) or "progress" not in state:
        raise CheckpointError(f"{path / STATE} was written by an older leantune; start the run again")
    return state


def check_delta(loaded: LoadedCheckpoint, tuned: TunedModel) -> None:
    """Refuse a delta whose tensor names or shapes differ from ``tuned``'s, before anything is copied."""
    assert loaded.delta is not None
    expected = tuned.delta_state_dict()
    if set(loaded.delta) != set(expected):
        missing = sorted(set(expected) - set(loaded.delta))[:3]
        unexpected = sorted(set(loaded.delta) - set(expected))[:3]
        raise CheckpointError(f"{loaded.path} does not match this model and method (missing {missing}, "
                              f"unexpected {unexpected}); was it made with other settings?")
    reshaped = [n for n, t in expected.items() if tuple(t.shape) != tuple(loaded.delta[n].shape)][:3]
    if reshaped:
        raise CheckpointError(f"{loaded.path} holds other shapes than this model for {reshaped}; was it made with "
                              "other settings?")


def apply_delta(loaded: LoadedCheckpoint, tuned: TunedModel) -> None:
    """Copy a checked (:func:`check_delta`) delta into ``tuned``."""
    assert loaded.delta is not None
    with torch.no_grad():
        for name, target in tuned.delta_state_dict().items():
            target.copy_(loaded.delta[name])


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
