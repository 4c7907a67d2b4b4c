"""The method registry: each file under ``leantune/methods/`` registers its method with :func:`register`."""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from leantune.errors import UnsupportedMethodError

if TYPE_CHECKING:
    from leantune.config import MethodConfig
    from leantune.methods.base import TuningMethod

_METHODS: dict[str, type[TuningMethod]] = {}
_DISCOVERED = False


def register(method_class: type[TuningMethod]) -> type[TuningMethod]:
    """Class decorator: make a method available by its ``name``."""
    if method_class.name in _METHODS and _METHODS[method_class.name] is not method_class:
        raise ValueError(f"method {method_class.name!r} is registered twice")
    _METHODS[method_class.name] = method_class
    return method_class


def _discover() -> None:
    """Import every module of ``leantune.methods`` once, so each registers itself."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    package = importlib.import_module("leantune.methods")  # the subpackage, not the methods() function
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    _DISCOVERED = True


def methods() -> list[str]:
    """Names of the registered methods, sorted."""
    _discover()
    return sorted(_METHODS)


def get_method(name: str) -> type[TuningMethod]:
    """The method class registered as ``name``."""
    _discover()
    if name not in _METHODS:
        raise UnsupportedMethodError(f"unknown method {name!r}; registered methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def make_config(method_name: str, **options: Any) -> MethodConfig:
    """The config of ``method_name`` built from ``options`` (unknown options raise ``TypeError``)."""
    return get_method(method_name).config_class.from_options(**options)
