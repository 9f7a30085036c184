"""Shared test data and helpers for the router tests (imported by conftest and the tests)."""

from __future__ import annotations

import numpy as np
import torch

from loramix.lora import LoraWeights
from loramix.route import Encoder
from loramix.store import Library

BOTANY = [
    "How do plants turn sunlight into sugar through photosynthesis?",
    "Why do the leaves of my tomato plant turn yellow?",
    "How often should I water a fern?",
    "What nutrients do flowering plants need from the soil?",
]
COMPUTING = [
    "How do I sort a list of dictionaries in Python?",
    "What causes a segmentation fault in a C program?",
    "How does a CPU cache speed up memory access?",
]
COOKING = [
    "How long should I boil an egg for a runny yolk?",
    "What is the best way to sear a steak in a cast iron pan?",
    "How do I make a simple tomato sauce for pasta?",
]


_MEMO: dict[str, np.ndarray] = {}  # text -> embedding, shared by the tests to spare the (busy) CPU


class CountingEncoder:
    """Wraps an Encoder and records every call and every text it embeds.

    Embeddings are memoised per text across tests; each call still counts, and texts not seen
    before go to the real encoder in one call.
    """

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.calls = 0
        self.texts: list[str] = []

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def dim(self) -> int:
        return self.inner.dim

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        self.calls += 1
        self.texts += list(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in _MEMO))
        if missing:
            _MEMO.update(zip(missing, self.inner.encode(missing, batch_size), strict=True))
        if not texts:
            return self.inner.encode([], batch_size)
        return np.stack([_MEMO[t] for t in texts])


def tiny_weights() -> LoraWeights:
    return LoraWeights(
        rank=2, alpha=4, layers={"model.layers.0.self_attn.q_proj": (torch.randn(2, 64), torch.randn(64, 2))}
    )


def add(
    lib: Library, name: str, description: str = "", tags: list[str] | None = None, examples=None, skills=None
):
    return lib.add_weights(
        tiny_weights(),
        name=name,
        description=description,
        domain_tags=tags or [],
        skill_tags=skills or [],
        examples=examples,
    )
