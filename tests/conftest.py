"""Shared fixtures: a tiny random llama base (fast) and helpers to make random adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loramix.base import BaseModel, load_base
from loramix.testing import build_tiny_base, random_lora  # noqa: F401  (re-exported for tests)

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture
def tiny_base(tiny_base_dir: Path) -> BaseModel:
    """A fresh copy per test: mixers inject layers into it."""
    return load_base(tiny_base_dir)
