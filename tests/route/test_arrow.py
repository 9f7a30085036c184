"""Arrow routing: prototypes from the adapters' weights, routing on the base model's hidden states."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loramix.base import BaseModel
from loramix.config import RouteConfig
from loramix.errors import RoutingError
from loramix.lora import LoraWeights
from loramix.route import Router
from loramix.route.arrow import attach_base, compute_prototypes, layer_inputs, prototypes, top_right_singular
from loramix.store import Library
from loramix.testing import HashEncoder, random_lora

PROMPT_X = "the quick brown fox jumps over the lazy dog"
PROMPT_Y = "int main(void) { return 0; }"


def aligned_lora(base: BaseModel, prompt: str, seed: int, rank: int = 4) -> LoraWeights:
    """An adapter whose A's first row is the main direction of ``prompt``'s inputs to each target layer."""
    w = random_lora(base, rank=rank, seed=seed)
    inputs, _ = layer_inputs(base.model, base.tokenizer, [prompt], list(w.layers))
    layers = {}
    for path, (a, b) in w.layers.items():
        h = torch.nn.functional.normalize(inputs[path][0], dim=-1)  # (T, n_in)
        direction = torch.linalg.svd(h, full_matrices=False).Vh[0]  # (n_in,)
        a = a.clone()
        a[0] = 2.0 * direction  # dominant row: the update's top right singular vector ~ direction
        layers[path] = (a, b)
    return LoraWeights(rank=w.rank, alpha=w.alpha, layers=layers)


def make_router(lib: Library, base: BaseModel) -> Router:
    router = Router(lib, HashEncoder())  # type: ignore[arg-type]
    attach_base(router, lambda: base)
    return router


def test_prototypes_are_top_singular_vectors(tiny_base: BaseModel) -> None:
    w = random_lora(tiny_base, rank=4, seed=3)
    protos = compute_prototypes(w)
    assert set(protos) == set(w.layers)
    for path, v in protos.items():
        dense = w.delta(path)  # (n_out, n_in)
        ref = torch.linalg.svd(dense.double()).Vh[0].float()  # (n_in,)
        assert v.shape == (dense.shape[1],)
        assert abs(float(v @ ref)) == pytest.approx(1.0, abs=1e-5)
    a = torch.randn(3, 10, dtype=torch.float64)  # (r, n_in) wider rank than n_out below
    b = torch.randn(2, 3, dtype=torch.float64)  # (n_out, r)
    ref = torch.linalg.svd(b @ a).Vh[0]
    assert abs(float(top_right_singular(a, b).double() @ ref)) == pytest.approx(1.0, abs=1e-5)


def test_aligned_prompt_routes_to_its_adapter(tmp_path: Path, tiny_base: BaseModel) -> None:
    lib = Library(tmp_path / "home")
    for i in range(3):
        lib.add_weights(random_lora(tiny_base, seed=10 + i), f"random-{i}", description=f"random {i}")
    lib.add_weights(aligned_lora(tiny_base, PROMPT_X, seed=1), "x", description="x")
    lib.add_weights(aligned_lora(tiny_base, PROMPT_Y, seed=2), "y", description="y")
    router = make_router(lib, tiny_base)
    cfg = RouteConfig(k=2, strategy="arrow")
    rx, ry = router.route_batch([PROMPT_X, PROMPT_Y], cfg)
    assert rx.adapters[0].name == "x" and ry.adapters[0].name == "y"
    assert rx.strategy == "arrow"
    assert all(0.0 <= a.score <= 1.0 for a in rx.adapters)
    assert rx.adapters[0].score > rx.adapters[1].score


def test_prototype_cache_is_reused_and_incremental(tmp_path: Path, tiny_base: BaseModel) -> None:
    lib = Library(tmp_path / "home")
    for i in range(3):
        lib.add_weights(random_lora(tiny_base, seed=i), f"a{i}", description=f"adapter {i}")
    router = make_router(lib, tiny_base)
    cfg = RouteConfig(k=2, strategy="arrow")
    first = router.route(PROMPT_X, cfg)
    cache = prototypes(router)
    assert cache.computed == 3
    assert len(list(lib.meta_path("arrow").glob("*.safetensors"))) == 3
    assert router.route(PROMPT_X, cfg).mixture == first.mixture
    assert cache.computed == 3 and cache.loaded == 0

    fresh = make_router(lib, tiny_base)  # a new process: read from disk, computed never
    assert fresh.route(PROMPT_X, cfg).mixture == first.mixture
    assert prototypes(fresh).computed == 0 and prototypes(fresh).loaded == 3

    lib.add_weights(random_lora(tiny_base, seed=9), "a3", description="adapter 3")
    fresh.route(PROMPT_X, cfg)
    assert prototypes(fresh).computed == 1


def test_arrow_without_base_is_a_clear_error(tmp_path: Path, tiny_base: BaseModel) -> None:
    lib = Library(tmp_path / "home")
    lib.add_weights(random_lora(tiny_base, seed=0), "a", description="adapter")
    router = Router(lib, HashEncoder())  # type: ignore[arg-type]
    with pytest.raises(RoutingError, match="base model"):
        router.route(PROMPT_X, RouteConfig(strategy="arrow"))


def test_engine_hands_over_its_base(tmp_path: Path, tiny_base_dir: Path, tiny_base: BaseModel) -> None:
    from loramix.app import Loramix

    eng = Loramix(home=tmp_path / "home", base=tiny_base_dir)
    eng.library.add_weights(aligned_lora(tiny_base, PROMPT_X, seed=1), "x", description="x")
    eng.library.add_weights(random_lora(tiny_base, seed=5), "r", description="r")
    eng._router = Router(eng.library, HashEncoder())  # type: ignore[arg-type]  # no MiniLM here
    attach_base(eng._router, lambda: eng.base, eng._lock)
    cfg = RouteConfig(k=2, strategy="arrow")
    first = eng.route(PROMPT_X, cfg)
    assert first.adapters[0].name == "x"
    eng.score(PROMPT_X, adapters=[("x", 0.5), ("r", 0.5)])  # the mixer injects its layers into the base
    again = eng.route(PROMPT_X, cfg)  # hooks see the same inputs: no mixture is active outside a pass
    assert [a.score for a in again.adapters] == pytest.approx([a.score for a in first.adapters], abs=1e-6)
    eng._router = None
    from loramix.route.arrow import base_getter

    get_base = base_getter(eng.router)
    assert get_base is not None and get_base() is eng.base
