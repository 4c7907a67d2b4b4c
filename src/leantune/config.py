"""Method configs: one dataclass per method, every field with a help text, plus the shared fields.

:func:`build_strict` builds any settings dataclass (method configs, ``TrainConfig``, run specs) from a dict:
an unknown name raises :class:`UnknownOptionError` listing the valid ones, and :func:`check_types` checks every
value against the field's annotation, so ``r=2.5`` or ``r="abc"`` is refused naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from leantune.errors import ConfigError, UnknownOptionError

T = TypeVar("T")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def build_strict(cls: type[T], values: dict[str, Any], what: str) -> T:
    """``cls(**values)``; an unknown key raises :class:`UnknownOptionError` naming it (``what`` says whose)."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UnknownOptionError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for {what}; valid options: {', '.join(names)}"
        )
    return cls(**values)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_types(instance: Any) -> None:
    """Raise :class:`ConfigError` for a field whose value does not match its annotation (ints are floats too)."""
    hints = _field_types(type(instance))
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        expected = hints.get(f.name, Any)
        if not _matches(value, expected):
            raise ConfigError(
                f"{type(instance).__name__}.{f.name} must be {_describe(expected)}, got {value!r} "
                f"({type(value).__name__})"
            )


def _matches(value: Any, expected: Any) -> bool:
    if expected is Any:
        return True
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and (
            not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items()))
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True


def _describe(expected: Any) -> str:
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if expected is type(None):
        return "None"
    if origin in (list, tuple):
        inner = f" of {_describe(args[0])}" if args else ""
        return f"a list{inner}"
    if origin is dict:
        return "a mapping"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(expected, getattr(expected, "__name__", str(expected)))


@dataclass
class MethodConfig:
    """Fields every method shares. Subclasses set ``method`` and add their own options."""

    method: ClassVar[str] = ""

    train_head: bool = option(
        True, "Train (and save) a task head the model creates fresh, such as a new `classifier` or `score`."
    )
    modules_to_save: list[str] = option(
        [], "Names (exact or dotted suffix) of further modules to train fully and save with the delta."
    )

    def __post_init__(self) -> None:
        check_types(self)
        self.validate()

    def validate(self) -> None:
        """Check option values that need no model; raise :class:`ConfigError` naming the field and the value."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def from_options(cls, **options: Any) -> MethodConfig:
        """Build the config; an unknown option raises :class:`UnknownOptionError` listing the valid ones."""
        return build_strict(cls, options, f"method {cls.method!r}")


def check_positive(config: Any, *names: str) -> None:
    """Raise :class:`ConfigError` if any named numeric field is not > 0."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{type(config).__name__}.{name} must be > 0, got {value!r}")


def check_range(config: Any, name: str, low: float, high: float, high_inclusive: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``low <= value < high`` (``<= high`` with ``high_inclusive``)."""
    value = getattr(config, name)
    inside = low <= value <= high if high_inclusive else low <= value < high
    if not inside:
        bracket = "]" if high_inclusive else ")"
        raise ConfigError(f"{type(config).__name__}.{name} must be in [{low}, {high}{bracket}, got {value!r}")


def check_choice(config: Any, name: str, choices: tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` if the named field is not one of ``choices``."""
    value = getattr(config, name)
    if value not in choices:
        raise ConfigError(f"{type(config).__name__}.{name} must be one of {', '.join(choices)}; got {value!r}")
