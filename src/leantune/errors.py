"""Exceptions raised by leantune. Each message names what is wrong and where.

Every error leantune raises on purpose derives from :class:`LeantuneError`; the CLI prints those (and argparse's)
as one line. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LeantuneError(Exception):
    """Base class of every error leantune raises on purpose."""


class ConfigError(LeantuneError, ValueError):
    """An option or setting has a bad value, type or name; the message names the option and the value."""


class UnknownOptionError(LeantuneError, TypeError):
    """An option name that the config does not have; the message lists the valid ones."""


class UnsupportedModelError(LeantuneError, ValueError):
    """The model's family is not in the architecture map and its structure could not be inferred."""


class UnsupportedMethodError(LeantuneError, ValueError):
    """The method cannot be applied to this model or cannot perform the requested operation."""


class CheckpointError(LeantuneError, ValueError):
    """A saved delta is missing, corrupt, truncated, or was made for another model or method."""
