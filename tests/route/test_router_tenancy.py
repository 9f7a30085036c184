"""The router routes a tenant only to the shared, public and its own adapters, for every strategy."""

from __future__ import annotations

import pytest

from loramix.config import RouteConfig
from loramix.errors import RoutingError
from loramix.route import Route, Router
from loramix.store import Library
from tests.route.routedata import BOTANY, COMPUTING, COOKING, CountingEncoder, add, tiny_weights

PLANT_QUERY = "My basil seedlings are wilting and their leaves look pale. What do the plants need?"


@pytest.fixture
def tlib(tmp_path) -> Library:
    """botany is bob's private adapter (the best match for plant questions); cooking is shared;
    computing is alice's public one; garden is alice's private one."""
    lib = Library(tmp_path / "home")
    lib.add_weights(tiny_weights(), "botany", "Plants, gardening and plant biology", ["science", "botany"],
                    examples=BOTANY, owner="bob")
    add(lib, "cooking", "Recipes and kitchen techniques", ["cooking", "food"], COOKING)
    lib.add_weights(tiny_weights(), "computing", "Programming and computer systems", ["science", "computing"],
                    examples=COMPUTING, owner="alice", public=True)
    lib.add_weights(tiny_weights(), "garden", "Growing vegetables in a garden", ["garden"],
                    examples=BOTANY[:2], owner="alice")
    return lib


def names(route: Route) -> list[str]:
    return [a.name for a in route.adapters]


@pytest.mark.parametrize("strategy", ["semantic", "tags", "hybrid"])
def test_invisible_adapters_never_come_back_even_when_k_exceeds_the_visible_count(
        tlib: Library, counting: CountingEncoder, strategy: str) -> None:
    router = Router(tlib, counting)
    query = PLANT_QUERY + " science cooking garden botany computing"  # so the tags strategy matches all tags
    seen = {"carol": {"cooking", "computing"}, "bob": {"cooking", "computing", "botany"},
            "alice": {"cooking", "computing", "garden"}}
    for tenant, visible in seen.items():
        route = router.route(query, RouteConfig(k=10, strategy=strategy), tenant=tenant)
        assert set(names(route)) <= visible and names(route), (tenant, names(route))
        assert sum(a.weight for a in route.adapters) == pytest.approx(1.0)
    everyone = router.route(query, RouteConfig(k=10, strategy=strategy))  # operator: no filter
    assert {"botany", "garden"} <= set(names(everyone))


def test_the_best_match_is_skipped_for_tenants_that_cannot_see_it(tlib: Library, counting: CountingEncoder) -> None:
    router = Router(tlib, counting)
    assert names(router.route(PLANT_QUERY, RouteConfig(k=1)))[0] in {"botany", "garden"}
    assert names(router.route(PLANT_QUERY, RouteConfig(k=1), tenant="bob")) == ["botany"]
    assert names(router.route(PLANT_QUERY, RouteConfig(k=1), tenant="alice")) == ["garden"]
    carol = router.route(PLANT_QUERY, RouteConfig(k=4), tenant="carol")
    assert sorted(names(carol)) == ["computing", "cooking"]
    batch = router.route_batch([PLANT_QUERY, "How do I sear a steak?"], RouteConfig(k=4), tenant="carol")
    assert all(set(names(r)) <= {"cooking", "computing"} for r in batch)


def test_tag_filter_and_visibility_combine(tlib: Library, counting: CountingEncoder) -> None:
    router = Router(tlib, counting)
    assert names(router.route(PLANT_QUERY, RouteConfig(k=3, tags=["science"]), tenant="carol")) == ["computing"]
    assert set(names(router.route(PLANT_QUERY, RouteConfig(k=3, tags=["science"]), tenant="bob"))) == {
        "botany", "computing"}
    # a tag only bob's private adapter carries is the same error for carol as a tag nobody carries
    with pytest.raises(RoutingError) as hidden:
        router.route(PLANT_QUERY, RouteConfig(tags=["botany"]), tenant="carol")
    with pytest.raises(RoutingError) as missing:
        router.route(PLANT_QUERY, RouteConfig(tags=["astronomy"]), tenant="carol")
    assert str(hidden.value) == str(missing.value).replace("astronomy", "botany")


def test_a_tenant_with_nothing_visible_gets_the_empty_library_error(tmp_path, counting: CountingEncoder) -> None:
    lib = Library(tmp_path / "home")
    lib.add_weights(tiny_weights(), "botany", "Plants", examples=BOTANY, owner="bob")
    router = Router(lib, counting)
    assert names(router.route(PLANT_QUERY, RouteConfig(k=2), tenant="bob")) == ["botany"]
    with pytest.raises(RoutingError, match="the library has no adapters with routing keys"):
        router.route(PLANT_QUERY, RouteConfig(k=2), tenant="carol")


def test_an_adapter_added_since_the_last_sync_is_not_leaked(tlib: Library, counting: CountingEncoder) -> None:
    router = Router(tlib, counting, check_interval=None)  # never re-syncs by itself
    rec = tlib.add_weights(tiny_weights(), "orchids", "Orchid care", examples=BOTANY, owner="bob")
    router.compute_key(rec.id)  # indexed, and its record cached
    assert "orchids" not in names(router.route(PLANT_QUERY, RouteConfig(k=10), tenant="carol"))
    assert "orchids" in names(router.route(PLANT_QUERY, RouteConfig(k=10), tenant="bob"))
