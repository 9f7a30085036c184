"""The routing cache: hits on repeated (normalised) queries, misses on other options, invalidated by
any library change, including another process's; encode and search times reported apart."""

from __future__ import annotations

import pytest

from loramix.config import RouteConfig
from loramix.route import Router
from loramix.store import Library, NewAdapter
from loramix.testing import HashEncoder

from .helpers import nano, synthetic_basis


@pytest.fixture
def setup(tmp_path):
    lib = Library(tmp_path / "lib")
    basis = synthetic_basis()
    lib.put_basis(basis)
    lib.add_many([NewAdapter(f"a{i}", nano(basis, i), domain_tags=["even" if i % 2 == 0 else "odd"],
                             examples=[f"text about topic {i}"]) for i in range(30)])
    router = Router(lib, HashEncoder())
    yield lib, router, basis
    lib.close()


def test_repeat_hits_and_options_miss(setup):
    lib, router, _ = setup
    first = router.route("text about topic 4")
    assert not first.cached and first.encode_ms > 0 and first.search_ms > 0
    again = router.route("  text   about topic 4 ")  # same after normalisation
    assert again.cached and again.mixture == first.mixture and again.encode_ms == 0
    assert not router.route("text about topic 4", RouteConfig(k=2)).cached
    assert not router.route("text about topic 4", RouteConfig(tags=["odd"])).cached
    assert router.route("text about topic 4", RouteConfig(tags=["odd"])).cached
    assert all(router.record(a.id).domain_tags == ["odd"]
               for a in router.route("text about topic 4", RouteConfig(tags=["odd"])).adapters)
    s = router.cache.stats()
    assert s["hits"] == 3 and s["misses"] == 3
    again.adapters[0].weight = 99.0  # callers can't corrupt the cache
    assert router.route("text about topic 4").adapters[0].weight != 99.0


def test_any_library_change_invalidates(setup, tmp_path):
    lib, router, basis = setup
    q = "text about topic 31"
    before = router.route(q)
    assert router.route(q).cached
    lib.add_many([NewAdapter("a31", nano(basis, 31), examples=[q])])  # exactly the query's text
    after = router.route(q)
    assert not after.cached and after.adapters[0].name == "a31"
    assert router.route(q).cached
    other = Library(tmp_path / "lib")  # another handle (as another process would): a removal
    other.remove("a31")
    other.close()
    third = router.route(q)
    assert not third.cached and "a31" not in [a.name for a in third.adapters]
    assert [a.id for a in third.adapters] == [a.id for a in before.adapters]
    lib.update("a3", domain_tags=["new"])
    assert not router.route(q).cached
    gen = lib.generation
    lib.record_use(["a3"])  # usage counts do not change routing: the cache stays valid
    assert lib.generation == gen and router.route(q).cached


def test_uncacheable_strategy_bypasses(setup):
    _, router, _ = setup
    cfg = RouteConfig(strategy="tags")
    router.route("odd even", cfg)
    assert router.route("odd even", cfg).cached  # tags strategy depends only on the library: cached
    router.cache.size = 0
    assert not router.route("odd even", cfg).cached  # a cache of size 0 is off
