"""Routing strategies, weights and errors with the real MiniLM encoder."""

from __future__ import annotations

import numpy as np
import pytest

from loramix.config import RouteConfig
from loramix.errors import ConfigError, RoutingError
from loramix.route import Route, Router, register_strategy, softmax_weights
from loramix.route import router as router_mod
from loramix.store import Library
from tests.route.routedata import BOTANY, CountingEncoder, add

PLANT_QUERY = "My basil seedlings are wilting and their leaves look pale. What do the plants need?"


@pytest.fixture
def router(lib: Library, counting: CountingEncoder) -> Router:
    return Router(lib, counting)


def names(route: Route) -> list[str]:
    return [a.name for a in route.adapters]


def test_semantic_ranks_the_botany_adapter_first(router: Router) -> None:
    route = router.route(PLANT_QUERY, RouteConfig(k=3))
    assert names(route)[0] == "botany" and len(route.adapters) == 3
    scores = {a.name: a.score for a in route.adapters}
    assert scores["botany"] > scores["computing"] + 0.1
    assert scores["botany"] > scores["cooking"] + 0.1
    assert route.strategy == "semantic" and route.latency_ms > 0
    code = router.route("Why does my Python program crash with a segfault?", RouteConfig(k=1))
    assert names(code) == ["computing"]


def test_weights_sum_to_one_and_sharpen_with_lower_temperature(router: Router) -> None:
    warm = router.route(PLANT_QUERY, RouteConfig(k=3, temperature=1.0))
    cold = router.route(PLANT_QUERY, RouteConfig(k=3, temperature=0.05))
    for route in (warm, cold):
        assert sum(a.weight for a in route.adapters) == pytest.approx(1.0)
        weights = [a.weight for a in route.adapters]
        assert weights == sorted(weights, reverse=True)
    assert cold.adapters[0].weight > warm.adapters[0].weight
    assert warm.adapters[0].weight < 0.6  # near-uniform at temperature 1 (scores are cosines)
    assert softmax_weights([1.0, 1.0], 0.1) == pytest.approx([0.5, 0.5])
    assert softmax_weights([2.0, 0.0], 1.0) == pytest.approx(
        [np.exp(2) / (np.exp(2) + 1), 1 / (np.exp(2) + 1)]
    )
    assert softmax_weights([], 1.0) == []


def test_route_mixture_and_dict(router: Router) -> None:
    route = router.route(PLANT_QUERY, RouteConfig(k=2))
    assert route.mixture == [(a.id, a.weight) for a in route.adapters]
    d = route.to_dict()
    assert set(d) == {"adapters", "latency_ms", "strategy", "encode_ms", "search_ms", "cached", "rerank", "rerank_ms"}
    assert d["adapters"][0] == {
        "name": "botany",
        "id": route.adapters[0].id,
        "score": route.adapters[0].score,
        "weight": route.adapters[0].weight,
    }


def test_tag_filter_excludes_for_every_strategy(router: Router) -> None:
    for strategy in ("semantic", "tags", "hybrid"):
        route = router.route(PLANT_QUERY, RouteConfig(k=3, strategy=strategy, tags=["science"]))
        assert set(names(route)) <= {"botany", "computing"}, strategy
        only = router.route(PLANT_QUERY, RouteConfig(k=3, strategy=strategy, tags=["Cooking"]))
        assert names(only) == ["cooking"], strategy
    both = router.route(PLANT_QUERY, RouteConfig(k=3, tags=["science", "computing"]))
    assert names(both) == ["computing"]  # all listed tags are required
    with pytest.raises(RoutingError, match="carries all of the tags"):
        router.route(PLANT_QUERY, RouteConfig(tags=["astronomy"]))


def test_tags_strategy_scores_matched_fraction_and_breaks_ties_densely(router: Router) -> None:
    cfg = RouteConfig(k=3, strategy="tags")
    route = router.route("A science question: how do leaves capture light?", cfg)
    # botany and computing both match 'science' (1 of 2 tags); dense similarity puts botany first
    assert names(route) == ["botany", "computing"]
    assert [a.score for a in route.adapters] == [0.5, 0.5]
    assert route.adapters[0].weight == pytest.approx(0.5)
    route = router.route("quick food ideas for cooking tonight", cfg)
    assert names(route) == ["cooking"] and route.adapters[0].score == 1.0
    assert router.route("tell me a story", cfg).adapters == []  # no tag matched: base model


def test_hybrid_uses_the_lexical_match(lib: Library, counting: CountingEncoder) -> None:
    # Two adapters with the same examples get the same key, so dense scoring can't tell them apart;
    # only one description names the rare word of the query.
    examples = ["How do I brew beer at home?", "What yeast should I use for a pale ale?"]
    add(lib, "brew-a", "Home brewing of beer", ["drinks"], examples)
    add(lib, "brew-b", "Home brewing and zymurgy, the chemistry of fermentation", ["drinks"], examples)
    router = Router(lib, counting)
    query = "a zymurgy question about brewing"
    dense = router.route(query, RouteConfig(k=2, tags=["drinks"]))
    assert dense.adapters[0].score == pytest.approx(dense.adapters[1].score, abs=1e-5)
    for _ in range(2):  # the BM25 index is built once and reused
        hybrid = router.route(query, RouteConfig(k=2, strategy="hybrid", hybrid_alpha=0.5))
        assert names(hybrid) == ["brew-b", "brew-a"]
        assert hybrid.adapters[0].score > hybrid.adapters[1].score + 0.2
    pure_dense = router.route(query, RouteConfig(k=2, strategy="hybrid", hybrid_alpha=1.0))
    assert pure_dense.adapters[0].score == pytest.approx(pure_dense.adapters[1].score, abs=1e-5)


def test_min_score_drops_weak_candidates(router: Router) -> None:
    route = router.route(PLANT_QUERY, RouteConfig(k=3))
    cut = (route.adapters[0].score + route.adapters[1].score) / 2
    kept = router.route(PLANT_QUERY, RouteConfig(k=3, min_score=cut))
    assert names(kept) == ["botany"] and kept.adapters[0].weight == pytest.approx(1.0)
    assert router.route(PLANT_QUERY, RouteConfig(k=3, min_score=1.5)).adapters == []


def test_route_batch_matches_route(router: Router, counting: CountingEncoder) -> None:
    queries = [PLANT_QUERY, "How do I fix a memory leak in my C code?", "a quick dinner with eggs", "science"]
    for strategy in ("semantic", "tags", "hybrid"):
        cfg = RouteConfig(k=2, strategy=strategy)
        calls = counting.calls
        batch = router.route_batch(queries, cfg)
        assert counting.calls == calls + 1  # one encoder call for the whole batch
        for q, got in zip(queries, batch, strict=True):
            one = router.route(q, cfg)
            assert names(got) == names(one)
            assert [a.weight for a in got.adapters] == pytest.approx(
                [a.weight for a in one.adapters], abs=1e-4
            )
    assert router.route_batch([], RouteConfig()) == []


def test_compute_key_is_the_renormalised_mean_of_examples(router: Router, lib: Library, encoder) -> None:
    key = router.compute_key("botany")
    expected = encoder.encode(BOTANY).mean(axis=0)
    np.testing.assert_allclose(key, expected / np.linalg.norm(expected), atol=1e-5)
    ids, stored = lib.keys([lib.get("botany").id])
    np.testing.assert_allclose(stored[0], key, atol=1e-6)

    no_examples = add(lib, "geology", "Rocks, minerals and plate tectonics")
    key = router.compute_key(no_examples.id)
    np.testing.assert_allclose(key, encoder.encode(["Rocks, minerals and plate tectonics"])[0], atol=1e-5)
    bare = add(lib, "astro_notes", tags=["astronomy", "stars"])
    key = router.compute_key("astro_notes")
    np.testing.assert_allclose(key, encoder.encode(["astro notes astronomy stars"])[0], atol=1e-5)
    assert bare.id in router.index and router.index.ntotal == 5


def test_empty_library_is_a_routing_error(tmp_path, counting: CountingEncoder) -> None:
    router = Router(Library(tmp_path / "empty"), counting)
    with pytest.raises(
        RoutingError, match="no adapters with routing keys; add one with `loramix adapters add`"
    ):
        router.route("anything", RouteConfig())
    assert counting.calls == 0


def test_unknown_strategy_is_a_config_error(router: Router) -> None:
    with pytest.raises(ConfigError, match="unknown routing strategy"):
        RouteConfig(strategy="nope")
    cfg = RouteConfig()
    cfg.strategy = "bogus"
    with pytest.raises(ConfigError, match="'bogus' is not available; registered: .*semantic"):
        router.route(PLANT_QUERY, cfg)


def test_register_strategy_plugs_in(router: Router) -> None:
    def last_first(r: Router, queries, qvecs, cfg, allowed):
        ranked = r.dense_search(qvecs, r.index.ntotal, allowed)
        return [list(reversed(c)) for c in ranked]

    register_strategy("test-last-first", last_first)
    try:
        with pytest.raises(ConfigError, match="already registered"):
            register_strategy("test-last-first", last_first)
        cfg = RouteConfig()
        cfg.strategy = "test-last-first"
        route = router.route(PLANT_QUERY, cfg)
        assert names(route)[-1] == "botany" and route.strategy == "test-last-first"
    finally:
        router_mod._STRATEGIES.pop("test-last-first", None)
