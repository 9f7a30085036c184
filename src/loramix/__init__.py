"""loramix: a library of LoRA adapters for one causal LM, routed and mixed per request.

The public surface is small; everything else lives in the stage subpackages
(``store``, ``route``, ``mix``, ``train``, ``evaluate``).
"""

from typing import TYPE_CHECKING, Any

from loramix.config import GenerateConfig, MixConfig, RouteConfig, TrainConfig
from loramix.errors import (
    AdapterExists,
    AdapterNotFound,
    BaseModelError,
    ConfigError,
    InvalidAdapter,
    LibraryError,
    LoramixError,
    MergeError,
    MixError,
    RoutingError,
    TrainingError,
)
from loramix.lora import LoraWeights

if TYPE_CHECKING:
    from loramix.app import Answer, Loramix, parse_mixture

__version__ = "0.1.0"

_LAZY = {"Answer", "Loramix", "parse_mixture"}  # from loramix.app, which imports torch: loaded on first use


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from loramix import app

        return getattr(app, name)
    raise AttributeError(f"module 'loramix' has no attribute {name!r}")

__all__ = [
    "AdapterExists",
    "AdapterNotFound",
    "Answer",
    "BaseModelError",
    "ConfigError",
    "GenerateConfig",
    "InvalidAdapter",
    "LibraryError",
    "LoraWeights",
    "Loramix",
    "LoramixError",
    "MergeError",
    "MixConfig",
    "MixError",
    "RouteConfig",
    "RoutingError",
    "TrainConfig",
    "TrainingError",
    "__version__",
    "parse_mixture",
]
