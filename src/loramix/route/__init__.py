"""Routing queries to adapters: a sentence encoder, a faiss key index, BM25, and routing strategies."""

from loramix.route import strategies  # noqa: F401  (registers semantic, tags, hybrid)
from loramix.route.encoder import Encoder, default_model_path, get_encoder
from loramix.route.index import KeyIndex, SyncReport
from loramix.route.lexical import BM25
from loramix.route.router import (
    Route,
    RoutedAdapter,
    Router,
    StrategyFn,
    register_strategy,
    registered_strategies,
    softmax_weights,
)

__all__ = [
    "BM25",
    "Encoder",
    "KeyIndex",
    "Route",
    "RoutedAdapter",
    "Router",
    "StrategyFn",
    "SyncReport",
    "default_model_path",
    "get_encoder",
    "register_strategy",
    "registered_strategies",
    "softmax_weights",
]
