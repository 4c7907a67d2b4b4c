"""The method registry: every method class registers itself with :func:`register` when its module is imported.

Methods are found in three places, in this order:

1. the modules and packages under ``leantune/methods/`` (the built-in methods);
2. Python entry points of the group ``leantune.methods`` (an installed package declares, in its
   ``pyproject.toml``, ``[project.entry-points."leantune.methods"] my_method = "my_package.my_method"``);
3. the modules named in the environment variable ``LEANTUNE_PLUGINS`` (comma-separated module names, importable
   from ``sys.path``/``PYTHONPATH``), read again at every look-up, so ``leantune compare``'s sub-processes see them.

Importing a module registers the methods it defines; an entry point may also name a method class directly.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
from typing import TYPE_CHECKING, Any

from leantune.errors import ConfigError, LeantuneError, UnsupportedMethodError

if TYPE_CHECKING:
    from leantune.config import MethodConfig
    from leantune.methods.base import TuningMethod

ENTRY_POINT_GROUP = "leantune.methods"
PLUGINS_VARIABLE = "LEANTUNE_PLUGINS"
BUILTIN_PACKAGE = "leantune.methods"

_METHODS: dict[str, type[TuningMethod]] = {}
_DISCOVERED = False


class PluginError(LeantuneError, ImportError):
    """A plugin named in ``LEANTUNE_PLUGINS`` or a ``leantune.methods`` entry point cannot be imported."""


def register(method_class: type[TuningMethod]) -> type[TuningMethod]:
    """Class decorator: make a method available by its ``name``."""
    name = getattr(method_class, "name", None)
    config_class = getattr(method_class, "config_class", None)
    if not name or config_class is None:
        raise ConfigError(f"{method_class.__qualname__} needs the class attributes 'name' and 'config_class' "
                          "to be registered")
    if config_class.method != name:
        raise ConfigError(f"{method_class.__qualname__}: its config class {config_class.__name__} says method "
                          f"{config_class.method!r}, the method's name is {name!r}; they must be equal")
    registered = _METHODS.get(name)
    if registered is not None and registered is not method_class:
        raise ConfigError(f"method {name!r} is registered twice: by {_origin(registered)} and by "
                          f"{_origin(method_class)}")
    _METHODS[name] = method_class
    return method_class


def _origin(method_class: type) -> str:
    return f"{method_class.__module__}.{method_class.__qualname__}"


def _discover() -> None:
    """Import the built-in methods and the entry-point plugins once, and the ``LEANTUNE_PLUGINS`` modules."""
    global _DISCOVERED
    if not _DISCOVERED:
        _DISCOVERED = True  # a plugin that looks up methods while being imported sees those found so far
        try:
            _import_builtin_methods()
            _load_entry_points()
        except BaseException:
            _DISCOVERED = False
            raise
    _import_plugin_modules()


def _import_builtin_methods() -> None:
    package = importlib.import_module(BUILTIN_PACKAGE)  # the subpackage, not the methods() function
    for info in pkgutil.iter_modules(package.__path__):  # modules and packages (methods/lst/, methods/fish/)
        importlib.import_module(f"{BUILTIN_PACKAGE}.{info.name}")


def _load_entry_points() -> None:
    from leantune.methods.base import TuningMethod

    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry_point.load()
        except ImportError as err:
            raise PluginError(f"the {ENTRY_POINT_GROUP!r} entry point {entry_point.name!r} ({entry_point.value}) "
                              f"cannot be imported: {err}") from err
        if isinstance(loaded, type) and issubclass(loaded, TuningMethod):
            register(loaded)


def _import_plugin_modules() -> None:
    for module_name in plugin_module_names():
        try:
            importlib.import_module(module_name)
        except ImportError as err:
            raise PluginError(f"{PLUGINS_VARIABLE} names module {module_name!r}, which cannot be imported: {err} "
                              "(is its folder on PYTHONPATH?)") from err


def plugin_module_names() -> list[str]:
    """The module names listed in ``LEANTUNE_PLUGINS`` (comma-separated; blanks ignored)."""
    return [name.strip() for name in os.environ.get(PLUGINS_VARIABLE, "").split(",") if name.strip()]


def methods() -> list[str]:
    """Names of the registered methods, sorted."""
    _discover()
    return sorted(_METHODS)


def is_builtin(name: str) -> bool:
    """True for a method that ships with leantune (defined under ``leantune.methods``), False for a plugin."""
    return get_method(name).__module__.startswith(BUILTIN_PACKAGE + ".")


def get_method(name: str) -> type[TuningMethod]:
    """The method class registered as ``name``; an unknown name raises :class:`UnsupportedMethodError`."""
    _discover()
    if name not in _METHODS:
        raise UnsupportedMethodError(
            f"unknown method {name!r}; registered methods: {', '.join(sorted(_METHODS))} (a method from another "
            f"package is found through its {ENTRY_POINT_GROUP!r} entry point or the {PLUGINS_VARIABLE} variable)"
        )
    return _METHODS[name]


def make_config(method_name: str, **options: Any) -> MethodConfig:
    """The config of ``method_name`` built from ``options``; an unknown option raises ``UnknownOptionError``."""
    return get_method(method_name).config_class.from_options(**options)
