"""Incremental index sync: nothing is re-embedded that was embedded before."""

from __future__ import annotations

import numpy as np

from loramix.config import RouteConfig
from loramix.route import Router
from loramix.route.ann import AnnIndex
from loramix.store import Library
from tests.route.routedata import COOKING, CountingEncoder, add


def test_reopening_adding_and_removing_is_incremental(lib: Library, encoder) -> None:
    first = CountingEncoder(encoder)
    router = Router(lib, first)
    assert router.index.ntotal == 3 and first.calls == 1  # the three missing keys, in one call
    assert all(r.has_key for r in lib.list())

    again = CountingEncoder(encoder)
    reopened = Router(lib, again)
    assert again.calls == 0 and reopened.index.ntotal == 3
    assert not reopened.last_sync.changed  # the persisted index was reused as is

    new_examples = ["How do I carve a wooden spoon?", "Which chisel for hardwood?"]
    new = add(lib, "woodwork", "Carpentry and woodworking", ["crafts"], new_examples)
    route = reopened.route("What wood is best for carving a spoon?", RouteConfig(k=1))
    assert [a.name for a in route.adapters] == ["woodwork"]
    assert reopened.index.ntotal == 4 and AnnIndex(lib.meta_path("index")).ntotal == 4
    assert again.texts == [*new_examples, "What wood is best for carving a spoon?"]  # only the new adapter

    lib.remove("cooking")
    route = reopened.route(COOKING[0], RouteConfig(k=4))
    assert "cooking" not in [a.name for a in route.adapters] and len(route.adapters) == 3
    assert reopened.index.ntotal == 3 and AnnIndex(lib.meta_path("index")).ntotal == 3
    assert new.id in reopened.index


def test_a_changed_key_is_re_added(lib: Library, encoder) -> None:
    Router(lib, CountingEncoder(encoder))
    botany = lib.get("botany")
    query_vec = encoder.encode(["a recipe for pancakes"])[0]
    lib.set_key(botany.id, query_vec)  # set outside the router: a verifying sync must notice
    counting = CountingEncoder(encoder)
    router = Router(lib, counting)
    assert router.last_sync.updated == [botany.id] and router.index.ntotal == 3
    np.testing.assert_allclose(router.index.vectors([botany.id])[0], query_vec, atol=1e-6)
    route = router.route("a recipe for pancakes", RouteConfig(k=1))
    assert route.adapters[0].name == "botany"


def test_auto_key_off_leaves_unkeyed_adapters_out(lib: Library, counting: CountingEncoder) -> None:
    router = Router(lib, counting, auto_key=False)
    assert router.index.ntotal == 0 and counting.calls == 0
    router.compute_key("cooking")
    assert router.index.ntotal == 1 and counting.calls == 1
    assert [a.name for a in router.route("anything at all", RouteConfig(k=3)).adapters] == ["cooking"]
