"""Typed configuration. Each option is defined once, here, and the CLI reads its help from these.

Environment:
  LORAMIX_HOME   the library folder (default ``~/.loramix``)
  LORAMIX_BASE   a local Hugging Face causal-LM folder to use as the base model
  LORAMIX_CACHE  where converted base models are cached (default ``~/.cache/loramix``)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from loramix.errors import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def home_dir(home: str | Path | None = None) -> Path:
    """The library folder: ``home`` if given, else ``$LORAMIX_HOME``, else ``~/.loramix``."""
    return Path(home or os.environ.get("LORAMIX_HOME") or Path.home() / ".loramix").expanduser()


def cache_dir() -> Path:
    return Path(os.environ.get("LORAMIX_CACHE") or Path.home() / ".cache" / "loramix").expanduser()


STRATEGIES = ("semantic", "tags", "hybrid", "trained", "arrow")


@dataclass
class RouteConfig:
    """How queries are routed to adapters."""

    k: int = 3  # adapters per query
    strategy: str = "semantic"  # one of STRATEGIES
    temperature: float = 0.1  # softmax temperature turning scores into mixture weights
    tags: list[str] = field(default_factory=list)  # only adapters carrying all these tags
    hybrid_alpha: float = 0.7  # hybrid score = alpha * dense + (1 - alpha) * lexical
    min_score: float | None = None  # drop candidates scoring below this

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, got {self.k}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown routing strategy {self.strategy!r}; expected one of {', '.join(STRATEGIES)}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.hybrid_alpha <= 1.0:
            raise ConfigError(f"hybrid_alpha must be in [0, 1], got {self.hybrid_alpha}")


@dataclass
class MixConfig:
    """The per-row mixer's capacity."""

    capacity: int = 64  # adapter slots kept loaded per layer (LRU beyond that)
    max_rank: int = 16  # slot rank; grows when a bigger adapter is loaded
    bf16: bool = False  # bf16 autocast; off by default because it is slower on many CPUs

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ConfigError(f"capacity must be at least 1, got {self.capacity}")
        if self.max_rank < 1:
            raise ConfigError(f"max_rank must be at least 1, got {self.max_rank}")


@dataclass
class GenerateConfig:
    """Generation options."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.95

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")


@dataclass
class TrainConfig:
    """Training an expert adapter."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"])
    layers_from: float = 0.5  # adapt only the top (1 - layers_from) share of layers: cheaper backward on CPU
    steps: int = 120
    batch_size: int = 8
    seq_len: int = 96
    lr: float = 1e-3
    eval_fraction: float = 0.1
    max_examples: int = 4000  # cap on training texts read from a source
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.layers_from < 1.0:
            raise ConfigError(f"layers_from must be in [0, 1), got {self.layers_from}")
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 8:
            raise ConfigError("steps and batch_size must be >= 1 and seq_len >= 8")
