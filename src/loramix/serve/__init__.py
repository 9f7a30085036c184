"""loramix serve: continuous batching of per-request adapter mixtures behind HTTP APIs (OpenAI, LoRAX).

``create_app(engine, settings)`` builds the FastAPI app; :class:`LocalEngine` is the real model side,
:class:`FakeEngine` a model-free one for tests. Names load lazily so that the CLI can read
:class:`ServeSettings` without importing FastAPI or torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Engine", "FakeEngine", "LocalEngine", "ServeSettings", "create_app"]

_WHERE = {"create_app": "app", "Engine": "engine", "FakeEngine": "engine", "LocalEngine": "engine",
          "ServeSettings": "settings"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"loramix.serve.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'loramix.serve' has no attribute {name!r}")
