"""Fixtures for the router tests: the real MiniLM encoder and small libraries."""

from __future__ import annotations

from pathlib import Path

import pytest

from loramix.route import Encoder, get_encoder
from loramix.store import Library
from tests.route.routedata import BOTANY, COMPUTING, COOKING, CountingEncoder, add


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    enc = get_encoder()
    enc.encode(["warm up"])
    return enc


@pytest.fixture
def counting(encoder: Encoder) -> CountingEncoder:
    return CountingEncoder(encoder)


@pytest.fixture
def lib(tmp_path: Path) -> Library:
    """Three adapters without routing keys: botany, computing, cooking."""
    library = Library(tmp_path / "home")
    add(library, "botany", "Plants, gardening and plant biology", ["science", "botany"], BOTANY)
    add(library, "computing", "Programming and computer systems", ["science", "computing"], COMPUTING)
    add(library, "cooking", "Recipes and kitchen techniques", ["cooking", "food"], COOKING)
    return library
