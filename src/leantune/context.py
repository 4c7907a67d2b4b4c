"""Per-call inputs: values a method takes out of one ``forward`` or ``generate`` call of a tuned model.

A method declares the extra inputs it reads (:class:`CallInput`: the batch's task, the other modality's tokens,
stream sizes). ``TunedModel`` removes them from the call's keyword arguments and makes them readable, with
:func:`get`, by every module the method inserted, for the duration of that call: every step of ``generate``
included. The values live in a :class:`contextvars.ContextVar`, so nested calls and threads do not mix them.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from leantune.errors import LeantuneError

_NONE: Mapping[str, Any] = types.MappingProxyType({})
_CALL_INPUTS: ContextVar[Mapping[str, Any]] = ContextVar("leantune_call_inputs", default=_NONE)
_MISSING = object()


class MissingCallInputError(LeantuneError, ValueError):
    """An inserted module needs a per-call input that the forward or generate call did not pass."""


class UnknownTaskError(LeantuneError, ValueError):
    """A batch names a task the tuned model was not built for (or one batch mixes tasks)."""


@dataclass(frozen=True)
class CallInput:
    """One extra keyword a method takes from each forward/generate call."""

    name: str
    help: str
    required: bool = True
    choices: tuple[str, ...] | None = None  # task names: a value must be one of them (or an index into them)


@contextmanager
def call_inputs(values: Mapping[str, Any]) -> Iterator[None]:
    """Make ``values`` readable with :func:`get` until the block ends (inner blocks add to outer ones)."""
    token = _CALL_INPUTS.set({**_CALL_INPUTS.get(), **values})
    try:
        yield
    finally:
        _CALL_INPUTS.reset(token)


def get(name: str, default: Any = _MISSING) -> Any:
    """The value of per-call input ``name`` in the current call; ``default`` (or an error naming it) if absent."""
    values = _CALL_INPUTS.get()
    if name in values:
        return values[name]
    if default is not _MISSING:
        return default
    raise MissingCallInputError(
        f"this model needs {name!r} in every call: pass {name}=... to the tuned model's forward or generate"
    )


def current() -> Mapping[str, Any]:
    """Every per-call input of the current call."""
    return dict(_CALL_INPUTS.get())


def task_name(value: Any, tasks: Sequence[str]) -> str:
    """``value`` (a task name, an index into ``tasks``, or a one-element tensor of an index) as a task name."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(tasks):
        return tasks[value]
    if isinstance(value, str) and value in tasks:
        return value
    raise UnknownTaskError(f"unknown task {value!r} in this batch; this model knows the tasks {', '.join(tasks)}")


def current_task(tasks: Sequence[str]) -> str:
    """The call's task (per-call input ``task``: a name, or an index into ``tasks``), checked against ``tasks``.

    A model built for one task needs no ``task`` in its calls.
    """
    value = get("task", None)
    if value is None and len(tasks) == 1:
        return tasks[0]
    if value is None:
        get("task")  # raises, naming the missing input
    return task_name(value, tasks)
