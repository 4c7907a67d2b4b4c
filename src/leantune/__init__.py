"""leantune: parameter- and memory-efficient transfer learning of pretrained transformers."""

__version__ = "0.1.0"

from leantune.api import TunedModel, load, wrap  # noqa: E402
from leantune.backbones import ArchitectureMap, StackSpec, supported_families  # noqa: E402
from leantune.config import MethodConfig  # noqa: E402
from leantune.methods.adapter import AdapterConfig  # noqa: E402
from leantune.methods.bitfit import BitFitConfig  # noqa: E402
from leantune.methods.fish import FishConfig  # noqa: E402
from leantune.methods.full import FullConfig  # noqa: E402
from leantune.methods.layernorm import LayerNormConfig  # noqa: E402
from leantune.methods.lora import LoRAConfig  # noqa: E402
from leantune.methods.lst import LSTConfig  # noqa: E402
from leantune.methods.prompt import PromptConfig  # noqa: E402
from leantune.registry import get_method, make_config, methods, register  # noqa: E402
from leantune.train.config import TrainConfig  # noqa: E402
from leantune.train.loop import TrainResult, train  # noqa: E402

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
