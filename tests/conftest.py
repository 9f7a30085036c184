"""Shared fixtures: a tiny random llama base (fast) and helpers to make random adapters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loramix.base import BaseModel, load_base
from loramix.testing import build_tiny_base, random_lora  # noqa: F401  (re-exported for tests)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture
def tiny_base(tiny_base_dir: Path) -> BaseModel:
    """A fresh copy per test: mixers inject layers into it."""
    return load_base(tiny_base_dir)


@pytest.fixture(autouse=True)
def _one_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Unit tests run tiny models that gain nothing from threads (and threads contend badly on a busy
    CPU); integration tests on the real model keep torch's default."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config: pytest.Config) -> None:
    """Nothing in the test run may reach a model hub (loramix sets this at its own entry points)."""
    from loramix.config import offline_env

    offline_env()
