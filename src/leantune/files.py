"""Writing files so that a kill at any moment leaves either the old file or the new one, never a half-written one."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Write through ``write(tmp_path)`` into a temporary file beside ``path``, fsync it, rename it over ``path``.

    The file ends up readable by everyone (0644 less the umask), like any file ``open`` creates.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic_bytes(path: str | os.PathLike, data: bytes) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_atomic_text(path: str | os.PathLike, text: str) -> None:
    write_atomic_bytes(path, text.encode())


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
