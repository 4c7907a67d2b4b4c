"""Exceptions raised by leantune. Each message names what is wrong and where."""

from __future__ import annotations


class LeantuneError(Exception):
    """Base class of every error leantune raises on purpose."""


class UnsupportedModelError(LeantuneError, ValueError):
    """The model's family is not in the architecture map and no custom map was given."""


class UnsupportedMethodError(LeantuneError, ValueError):
    """The method cannot be applied to this model or cannot perform the requested operation."""


class CheckpointError(LeantuneError, ValueError):
    """A saved delta is missing, corrupt, truncated, or was made for another model or method."""
