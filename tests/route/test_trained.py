"""The "trained" and "supervised" strategies: saved heads, exact scoring through faiss, fallbacks, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from loramix.config import RouteConfig
from loramix.errors import RoutingError
from loramix.route import Encoder, Route, Router
from loramix.route.trained import (
    RouterHead,
    default_rerank,
    default_strategy,
    load_head,
    load_supervised,
    router_dir,
    save_head,
    save_supervised,
)
from loramix.store import Library
from tests.route.routedata import add

PLANT_QUERY = "My basil seedlings are wilting and their leaves look pale. What do the plants need?"
STARS = ["How do stars form from clouds of gas?", "What is a black hole?", "Why do planets orbit the sun?"]


@pytest.fixture
def router(lib: Library, encoder: Encoder) -> Router:
    return Router(lib, encoder)


def names(route: Route) -> list[str]:
    return [a.name for a in route.adapters]


def random_head(lib: Library, ids: list[str], seed: int = 0, scale: float = 0.05) -> RouterHead:
    _, keys = lib.keys(ids)
    head = RouterHead(torch.from_numpy(np.asarray(keys)), temperature=0.07)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.proj.weight.copy_(torch.randn(head.proj.weight.shape, generator=g) * scale)  # (d, d)
        head.proj.bias.copy_(torch.randn(head.proj.bias.shape, generator=g) * scale)  # (d,)
        head.key_delta.copy_(torch.randn(head.key_delta.shape, generator=g) * scale)  # (n, d)
    return head


def test_errors_and_default_when_no_router_was_trained(router: Router, lib: Library) -> None:
    assert default_strategy(lib) == "semantic"
    with pytest.raises(RoutingError, match="run `loramix train router"):
        router.route(PLANT_QUERY, RouteConfig(strategy="trained"))
    with pytest.raises(RoutingError, match="--labels"):
        router.route(PLANT_QUERY, RouteConfig(strategy="supervised"))


@pytest.mark.parametrize(("validation", "want"), [
    (None, "semantic"), ({"beats_keys": False}, "semantic"), ({"beats_keys": "yes"}, "semantic"),
    ({"beats_keys": True}, "trained")])
def test_default_strategy_follows_the_heads_own_verdict(router: Router, lib: Library, validation: dict | None,
                                                        want: str) -> None:
    ids = [lib.get(n).id for n in ("botany", "computing")]
    config = {"objective": "kl"} | ({"validation": validation} if validation is not None else {})
    save_head(lib, random_head(lib, ids), ids, config)
    assert default_strategy(lib) == want


@pytest.mark.parametrize(("validation", "want"), [
    (None, "auto"), ({"beats_keys": True}, "auto"), ({"rerank": {"hurts": False, "gain": 0.1}}, "auto"),
    ({"rerank": {"hurts": "yes"}}, "auto"), ({"rerank": {"hurts": True, "gain": -0.2}}, "none")])
def test_default_rerank_follows_the_stored_verdict(router: Router, lib: Library, validation: dict | None,
                                                   want: str) -> None:
    assert default_rerank(lib) == "auto"  # no head at all
    ids = [lib.get(n).id for n in ("botany", "computing")]
    config = {"objective": "kl"} | ({"validation": validation} if validation is not None else {})
    save_head(lib, random_head(lib, ids), ids, config)
    assert default_rerank(lib) == want


def test_interpolated_head_scores_mix_trained_and_key_cosines(router: Router, lib: Library, encoder: Encoder) -> None:
    ids = [lib.get(n).id for n in ("botany", "computing")]
    head = random_head(lib, ids)
    save_head(lib, head, ids, {"objective": "kl", "mix": 0.25})
    q = encoder.encode([PLANT_QUERY])
    with torch.no_grad():
        qp = head.project(torch.from_numpy(q)).numpy()  # (1, d)
        learned = head.effective_keys().numpy()  # (2, d)
    all_ids = lib.ids()
    stored = dict(zip(*lib.keys(all_ids), strict=True))
    want = {a: 0.25 * float(qp[0] @ (learned[ids.index(a)] if a in ids else stored[a]))
            + 0.75 * float(q[0] @ stored[a]) for a in all_ids}
    r = router.route(PLANT_QUERY, RouteConfig(k=3, strategy="trained"))
    assert [a.id for a in r.adapters] == sorted(want, key=lambda a: -want[a])
    for a in r.adapters:
        assert a.score == pytest.approx(want[a.id], abs=1e-5)


def test_saved_head_round_trips_and_scores_exactly(router: Router, lib: Library, encoder: Encoder) -> None:
    ids = [lib.get(n).id for n in ("botany", "computing")]  # cooking is not in the head: stored key, zero delta
    head = random_head(lib, ids)
    save_head(lib, head, ids, {"objective": "kl"})
    assert sorted(p.name for p in router_dir(lib).iterdir()) == ["head.json", "head.safetensors"]
    assert default_strategy(lib) == "semantic"  # a head without a held-out verdict is not the default
    loaded = load_head(lib)
    assert loaded is not None and loaded is load_head(lib)  # cached while the file is unchanged
    assert loaded.adapter_ids == ids and loaded.config["objective"] == "kl"
    assert loaded.temperature == pytest.approx(0.07)
    q = encoder.encode([PLANT_QUERY, STARS[0]])
    with torch.no_grad():
        want_q = head.project(torch.from_numpy(q)).numpy()  # (2, d)
        want_k = head.effective_keys().numpy()  # (2, d)
    np.testing.assert_allclose(loaded.project(q), want_q, atol=1e-5)
    np.testing.assert_allclose(loaded.keys, want_k, atol=1e-5)
    route = router.route(PLANT_QUERY, RouteConfig(k=3, strategy="trained"))
    assert route.strategy == "trained" and len(route.adapters) == 3
    cook_key = lib.keys([lib.get("cooking").id])[1][0]
    brute = {"botany": want_q[0] @ want_k[0], "computing": want_q[0] @ want_k[1], "cooking": want_q[0] @ cook_key}
    for a in route.adapters:
        assert a.score == pytest.approx(float(brute[a.name]), abs=1e-5)
    assert names(route) == sorted(brute, key=lambda n: -brute[n])
    with torch.no_grad():
        head.key_delta.zero_()
    save_head(lib, head, ids, {"objective": "loop"})
    os.utime(router_dir(lib) / "head.safetensors", ns=(1, 1))  # a different mtime even on coarse clocks
    reloaded = load_head(lib)
    assert reloaded is not loaded and reloaded is not None and reloaded.config["objective"] == "loop"


def test_learned_key_beats_stored_rank_and_tags_filter(router: Router, lib: Library, encoder: Encoder) -> None:
    ids = [lib.get(n).id for n in ("botany", "computing", "cooking")]
    head = RouterHead(torch.from_numpy(np.asarray(lib.keys(ids)[1])))
    with torch.no_grad():  # move cooking's key onto the plant query: faiss ranks it last by stored key
        head.key_delta[2] = torch.from_numpy(encoder.encode([PLANT_QUERY])[0] * 3)
    save_head(lib, head, ids, {})
    assert names(router.route(PLANT_QUERY, RouteConfig(k=1, strategy="semantic"))) == ["botany"]
    assert names(router.route(PLANT_QUERY, RouteConfig(k=1, strategy="trained"))) == ["cooking"]
    science = router.route(PLANT_QUERY, RouteConfig(k=3, strategy="trained", tags=["science"]))
    assert names(science) == ["botany", "computing"]


def test_adapter_added_or_removed_after_training(router: Router, lib: Library, encoder: Encoder) -> None:
    ids = [lib.get(n).id for n in ("botany", "computing", "cooking")]
    head = random_head(lib, ids, scale=0.02)
    save_head(lib, head, ids, {})
    new = add(lib, "astronomy", "Stars, planets and galaxies", ["science"], STARS)
    route = router.route("How hot is the surface of a star like the sun?", RouteConfig(k=4, strategy="trained"))
    assert names(route)[0] == "astronomy" and len(route.adapters) == 4
    q = load_head(lib).project(encoder.encode(["How hot is the surface of a star like the sun?"]))[0]  # type: ignore[union-attr]
    assert route.adapters[0].score == pytest.approx(float(q @ lib.keys([new.id])[1][0]), abs=1e-5)
    lib.remove(lib.get("cooking").id)
    assert "cooking" not in names(router.route(PLANT_QUERY, RouteConfig(k=4, strategy="trained")))


def test_supervised_strategy_uses_the_saved_classifier(router: Router, lib: Library) -> None:
    ids = [lib.get(n).id for n in ("botany", "computing", "cooking")]
    linear = torch.nn.Linear(384, 3)
    with torch.no_grad():  # a classifier scoring by cosine with the keys
        linear.weight.copy_(torch.from_numpy(np.asarray(lib.keys(ids)[1]) * 10))
        linear.bias.zero_()
    save_supervised(lib, linear, ids, {"gumbel_tau": 1.0})
    assert load_supervised(lib) is not None and default_strategy(lib) == "semantic"  # only a head switches the default
    route = router.route(PLANT_QUERY, RouteConfig(k=3, strategy="supervised"))
    assert names(route)[0] == "botany" and sum(a.score for a in route.adapters) == pytest.approx(1.0, abs=1e-5)
    science = router.route(PLANT_QUERY, RouteConfig(k=3, strategy="supervised", tags=["science"]))
    assert names(science) == ["botany", "computing"]
    assert sum(a.score for a in science.adapters) == pytest.approx(1.0, abs=1e-5)  # renormalised over the allowed
