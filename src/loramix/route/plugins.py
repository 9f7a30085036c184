"""Import the optional routing strategies so they register themselves ("trained", "arrow")."""

from __future__ import annotations

import importlib

_PLUGINS = ("loramix.route.trained", "loramix.route.arrow")
_loaded = False


def load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    for mod in _PLUGINS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    _loaded = True
