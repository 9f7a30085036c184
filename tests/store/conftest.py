"""Fixtures for the store tests: base shapes, a PEFT LoRA saved by peft, random LoraWeights.

``tiny_base_dir`` comes from tests/conftest.py.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch

from loramix.base import load_base
from loramix.lora import LoraWeights
from loramix.store import Library

TABLES = ("adapters", "keys", "examples", "events", "tags", "pack_entries")


@pytest.fixture(scope="session")
def base_shapes(tiny_base_dir: Path) -> dict[str, tuple[int, int]]:
    return load_base(tiny_base_dir).linear_shapes()


@pytest.fixture(scope="session")
def peft_adapter_dir(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random (non-zero B) LoRA on q_proj/v_proj, saved by peft's save_pretrained."""
    from peft import LoraConfig, get_peft_model

    base = load_base(tiny_base_dir)
    torch.manual_seed(1)
    model = get_peft_model(base.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(out)
    return out


@pytest.fixture
def adapter_dir(peft_adapter_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the peft adapter folder that a test may damage."""
    dest = tmp_path / "adapter"
    shutil.copytree(peft_adapter_dir, dest)
    return dest


@pytest.fixture
def lib(tmp_path: Path, base_shapes: dict[str, tuple[int, int]]) -> Iterator[Library]:
    library = Library(tmp_path / "home", base_shapes=base_shapes)
    yield library
    library.close()


@pytest.fixture
def make_weights(base_shapes: dict[str, tuple[int, int]]) -> Callable[..., LoraWeights]:
    """make_weights(seed, rank=4, targets=("q_proj", "v_proj"), layers=None) -> random LoraWeights for the tiny base."""

    def make(seed: int = 0, rank: int = 4, targets: Sequence[str] = ("q_proj", "v_proj"),
             layers: Sequence[int] | None = None, alpha: float = 8.0) -> LoraWeights:
        g = torch.Generator().manual_seed(seed)
        out = {}
        for path, (n_in, n_out) in sorted(base_shapes.items()):
            idx = int(path.split(".")[2])
            if path.rsplit(".", 1)[-1] in targets and (layers is None or idx in layers):
                out[path] = (torch.randn(rank, n_in, generator=g) * 0.1, torch.randn(n_out, rank, generator=g) * 0.1)
        return LoraWeights(rank=rank, alpha=alpha, layers=out)

    return make


def _snapshot(lib: Library) -> tuple[list[str], dict[str, list[tuple]]]:
    """Every file under the library home and every row of every table (read on a separate connection)."""
    files = sorted(str(p.relative_to(lib.home)) for p in lib.home.rglob("*") if p.is_file())
    conn = sqlite3.connect(lib.db_path)
    try:
        rows = {t: sorted(tuple(r) for r in conn.execute(f"SELECT * FROM {t}")) for t in TABLES}
    finally:
        conn.close()
    return files, rows


def _same_weights(a: LoraWeights, b: LoraWeights) -> bool:
    return (a.rank == b.rank and a.alpha == b.alpha and set(a.layers) == set(b.layers)
            and all(torch.equal(a.layers[p][0], b.layers[p][0]) and torch.equal(a.layers[p][1], b.layers[p][1])
                    for p in a.layers))


@pytest.fixture
def snapshot() -> Callable[[Library], tuple[list[str], dict[str, list[tuple]]]]:
    return _snapshot


@pytest.fixture
def same_weights() -> Callable[[LoraWeights, LoraWeights], bool]:
    return _same_weights
