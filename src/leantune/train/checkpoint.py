"""Resumable checkpoints: the delta weights plus optimizer, scheduler, RNG and data-order state.

Layout in a run directory::

    checkpoints/step-000120/delta.safetensors   trainable and added tensors (TunedModel.delta_state_dict)
    checkpoints/step-000120/state.pt            optimizer, scheduler, RNG states, progress, best-so-far
    checkpoints/latest                          the name of the newest complete checkpoint
    best/                                       the best checkpoint by validation metric (leantune.load-able)

Every checkpoint is written into a temporary directory that is renamed into place once complete, then
``latest`` is replaced atomically; a run killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from leantune.api import TunedModel
from leantune.errors import CheckpointError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
DELTA = "delta.safetensors"
STATE = "state.pt"


def rng_state() -> dict[str, Any]:
    """The state of every random generator training may draw from, as plain Python values (picklable)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().numpy().tobytes(),
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), position, has_gauss, cached),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().numpy().tobytes()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(state["cuda"]), dtype=torch.uint8))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor (an FSDP-sharded DTensor is gathered first)."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu").contiguous()


def write_atomic_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    _fsync_file(tmp)
    os.replace(tmp, path)


def write_atomic_text(path: Path, text: str) -> None:
    write_atomic_bytes(path, text.encode())


def save_checkpoint(run_dir: Path, tuned: TunedModel, state: dict[str, Any]) -> Path:
    """Write ``checkpoints/step-N`` (delta + ``state``), point ``latest`` at it, remove older ones."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['global_step']:06d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {n: local_tensor(t) for n, t in tuned.delta_state_dict().items()}
    save_file(tensors, str(tmp / DELTA), metadata={"format": "pt"})
    torch.save(state, tmp / STATE)
    for path in (tmp / DELTA, tmp / STATE):
        _fsync_file(path)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    write_atomic_text(root / LATEST, name + "\n")
    for old in root.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or ``None``."""
    pointer = run_dir / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = run_dir / CHECKPOINTS / pointer.read_text().strip()
    if not (path / DELTA).is_file() or not (path / STATE).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def load_checkpoint(path: Path, tuned: TunedModel) -> dict[str, Any]:
    """Restore the delta weights from ``path`` into ``tuned``; return the rest of the state."""
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
    return torch.load(path / STATE, map_location="cpu", weights_only=False)


def save_best(run_dir: Path, tuned: TunedModel) -> None:
    """Replace ``best/`` with the current delta: written beside it, then swapped in by renames."""
    best = run_dir / BEST
    tmp, old = run_dir / f".{BEST}.tmp{os.getpid()}", run_dir / f".{BEST}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tuned.save_pretrained(tmp)
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
