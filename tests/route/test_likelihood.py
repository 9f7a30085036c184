"""Re-ranking by the adapters' likelihood of the query: the ranking rule, the seam, and the engine's real LM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loramix.app import RERANK_CHARS, Loramix
from loramix.config import RouteConfig
from loramix.errors import ConfigError, RoutingError
from loramix.evaluate.routing import truncate_query
from loramix.route import Router
from loramix.route.likelihood import rerank
from loramix.store import Library
from loramix.testing import random_lora
from tests.route.routedata import BOTANY, COMPUTING, CountingEncoder, add


def test_rerank_orders_by_prior_times_score_minus_nll() -> None:
    seen: list[tuple[list[str], list[list[str]]]] = []

    def lm(queries, cands):
        seen.append((list(queries), [list(c) for c in cands]))
        return [np.array([10.0, 2.0, 0.0])]

    ranked = [[("a", 0.9), ("b", 0.85), ("c", 0.1), ("d", 0.05)]]
    out = rerank(lm, ["q"], ranked, RouteConfig(k=2, rerank_k=3, rerank_prior=50.0))
    # log posterior / 50: a 0.9 - 10/50 = 0.70, b 0.85 - 2/50 = 0.81, c 0.10 - 0 = 0.10; d was not scored
    assert [a for a, _ in out[0]] == ["b", "a", "c", "d"]
    assert [s for _, s in out[0][:3]] == pytest.approx([0.85 - 2 / 50, 0.9 - 10 / 50, 0.1])
    assert seen == [(["q"], [["a", "b", "c"]])]  # only the first max(k, rerank_k) go to the LM
    # a strong prior keeps the keys' order; a lone candidate never reaches the LM
    assert [a for a, _ in rerank(lm, ["q"], ranked, RouteConfig(k=2, rerank_k=3, rerank_prior=1e6))[0]][:3] == [
        "a", "b", "c"]
    seen.clear()
    assert rerank(lm, ["q"], [[("a", 0.5)]], RouteConfig(k=1, rerank_k=1)) == [[("a", 0.5)]] and not seen


def test_rerank_rejects_a_seam_that_answers_wrongly() -> None:
    with pytest.raises(RoutingError, match="one finite NLL per candidate"):
        rerank(lambda q, c: [np.array([1.0])], ["q"], [[("a", 0.5), ("b", 0.4)]], RouteConfig(k=2))
    with pytest.raises(RoutingError, match="one finite NLL per candidate"):
        rerank(lambda q, c: [np.array([1.0, np.nan])], ["q"], [[("a", 0.5), ("b", 0.4)]], RouteConfig(k=2))


def test_route_config_checks_the_rerank_options() -> None:
    with pytest.raises(ConfigError, match="unknown rerank 'lm'; expected one of auto, likelihood, none"):
        RouteConfig(rerank="lm")
    with pytest.raises(ConfigError, match="rerank_k must be at least 1"):
        RouteConfig(rerank_k=0)
    with pytest.raises(ConfigError, match="rerank_prior must be > 0"):
        RouteConfig(rerank_prior=0.0)


def test_a_bare_router_has_no_language_model(lib: Library, counting: CountingEncoder) -> None:
    router = Router(lib, counting)
    assert router.likelihood is None
    route = router.route(BOTANY[0], RouteConfig(k=2))  # rerank "auto": nothing to re-rank with
    assert route.rerank == "none" and route.to_dict()["rerank"] == "none"
    with pytest.raises(RoutingError, match="rerank='likelihood' scores the query with the language model"):
        router.route(BOTANY[0], RouteConfig(k=2, rerank="likelihood"))


def test_engine_reranks_by_the_real_models_likelihood(tmp_path: Path, tiny_base_dir: Path) -> None:
    """Known answer: an adapter whose keys match the query but whose weights wreck the model loses the top
    place to one that predicts the query far better, by exactly the rule's margin."""
    lm = Loramix(tmp_path / "home", tiny_base_dir)
    query = BOTANY[0]
    from loramix.base import load_base

    base = load_base(tiny_base_dir)
    wild = lm.add_weights(random_lora(base, rank=4, seed=1, std=3.0, targets=("q_proj", "v_proj", "up_proj", "down_proj")),
                          "wild", examples=BOTANY)
    calm = lm.add_weights(random_lora(base, rank=4, seed=2, std=0.01), "calm", examples=COMPUTING)
    add(lm.library, "other", examples=["How long should I boil an egg?"])
    lm.router.sync()
    keys_only = lm.route(query, RouteConfig(k=2, rerank="none"))
    assert keys_only.adapters[0].name == "wild" and keys_only.rerank == "none"
    cos = {a.name: a.score for a in lm.route(query, RouteConfig(k=3, rerank="none")).adapters}
    text = truncate_query(query, RERANK_CHARS)
    nll = {}
    for rec in (wild, calm):
        s = lm.score_mixture(text, [(rec.id, 1.0)])
        nll[rec.name] = s["loss"] * s["tokens"]
    assert nll["wild"] > nll["calm"] + 0.5  # the wrecking adapter predicts the query worse
    prior = 0.5 * (nll["wild"] - nll["calm"]) / (cos["wild"] - cos["calm"])  # small enough for the LM to win
    routed = lm.route(query, RouteConfig(k=2, rerank_k=2, rerank_prior=prior))  # "auto": an engine re-ranks
    assert routed.rerank == "likelihood" and routed.rerank_ms > 0
    assert [a.name for a in routed.adapters] == ["calm", "wild"]
    got = {a.name: a.score for a in routed.adapters}
    assert got["calm"] == pytest.approx(cos["calm"], abs=1e-5)  # the best-predicting candidate keeps its score
    assert got["wild"] == pytest.approx(cos["wild"] - (nll["wild"] - nll["calm"]) / prior, abs=1e-4)
    strong = lm.route(query, RouteConfig(k=2, rerank_k=2, rerank_prior=4 * prior))  # the keys win again
    assert strong.adapters[0].name == "wild"
