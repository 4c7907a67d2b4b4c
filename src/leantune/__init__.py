"""leantune: parameter- and memory-efficient transfer learning of pretrained transformers.

The public names are imported on first use (PEP 562), so ``import leantune`` and ``leantune --help`` do not
load torch, transformers and every method; ``leantune.wrap`` and ``from leantune import LoRAConfig`` work as
usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# ``leantune.methods`` and ``leantune.train`` name both a subpackage and a public function. Load the two (empty)
# subpackages now and drop the attributes the import system set for them: the names then resolve to the
# functions through ``__getattr__``, and importing a module under them later does not rebind them.
for _subpackage in ("methods", "train"):
    importlib.import_module(f"{__name__}.{_subpackage}")
    del globals()[_subpackage]
del _subpackage

# Public name -> the module that defines it.
_PUBLIC: dict[str, str] = {
    "AdapterConfig": "leantune.methods.adapter",
    "ArchitectureMap": "leantune.backbones",
    "BitFitConfig": "leantune.methods.bitfit",
    "FishConfig": "leantune.methods.fish",
    "FullConfig": "leantune.methods.full",
    "LayerNormConfig": "leantune.methods.layernorm",
    "LoRAConfig": "leantune.methods.lora",
    "LSTConfig": "leantune.methods.lst",
    "MethodConfig": "leantune.config",
    "PromptConfig": "leantune.methods.prompt",
    "StackSpec": "leantune.backbones",
    "TrainConfig": "leantune.train.config",
    "TrainResult": "leantune.train.loop",
    "TunedModel": "leantune.api",
    "get_method": "leantune.registry",
    "load": "leantune.api",
    "make_config": "leantune.registry",
    "methods": "leantune.registry",
    "register": "leantune.registry",
    "supported_families": "leantune.backbones",
    "train": "leantune.train.loop",
    "wrap": "leantune.api",
}

__all__ = [
    "AdapterConfig",
    "ArchitectureMap",
    "BitFitConfig",
    "FishConfig",
    "FullConfig",
    "LayerNormConfig",
    "LoRAConfig",
    "LSTConfig",
    "MethodConfig",
    "PromptConfig",
    "StackSpec",
    "TrainConfig",
    "TrainResult",
    "TunedModel",
    "get_method",
    "load",
    "make_config",
    "methods",
    "register",
    "supported_families",
    "train",
    "wrap",
]


def __getattr__(name: str) -> Any:
    """Import a public name on first use and keep it as a module attribute."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'leantune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # the names as type checkers and IDEs see them
    from leantune.api import TunedModel, load, wrap
    from leantune.backbones import ArchitectureMap, StackSpec, supported_families
    from leantune.config import MethodConfig
    from leantune.methods.adapter import AdapterConfig
    from leantune.methods.bitfit import BitFitConfig
    from leantune.methods.fish import FishConfig
    from leantune.methods.full import FullConfig
    from leantune.methods.layernorm import LayerNormConfig
    from leantune.methods.lora import LoRAConfig
    from leantune.methods.lst import LSTConfig
    from leantune.methods.prompt import PromptConfig
    from leantune.registry import get_method, make_config, methods, register
    from leantune.train.config import TrainConfig
    from leantune.train.loop import TrainResult, train
