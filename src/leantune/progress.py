"""Whether leantune's own progress bars show: yes by default, no inside :func:`hidden` (the CLI's
``--no-progress`` hides the bars of everything a run does, the Fisher initialisation of a method included)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_SHOWN: ContextVar[bool] = ContextVar("leantune_progress_shown", default=True)


def bars_shown() -> bool:
    """False inside :func:`hidden`."""
    return _SHOWN.get()


@contextmanager
def hidden(hide: bool = True) -> Iterator[None]:
    """Hide leantune's progress bars for the duration (no change when ``hide`` is false)."""
    token = _SHOWN.set(False) if hide else None
    try:
        yield
    finally:
        if token is not None:
            _SHOWN.reset(token)
