"""Tenancy in the store: owners, visibility, missing-equivalence, the v1 -> v2 migration, the audit log."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loramix.errors import AccessDenied, AdapterExists, AdapterNotFound, InvalidAdapter, LibraryError
from loramix.store import Library


@pytest.fixture
def tlib(lib, make_weights):
    """shared (operator), alice's private, alice's public, bob's private."""
    lib.add_weights(make_weights(0), "shared", domain_tags=["x"])
    lib.add_weights(make_weights(1), "alice-secret", owner="alice", domain_tags=["x"])
    lib.add_weights(make_weights(2), "alice-pub", owner="alice", public=True)
    lib.add_weights(make_weights(3), "bob-secret", owner="bob", domain_tags=["x"])
    return lib


def names(recs):
    return [r.name for r in recs]


def test_records_carry_owner_and_visibility(tlib):
    assert (tlib.get("shared").owner, tlib.get("shared").public) == (None, False)
    assert (tlib.get("alice-secret").owner, tlib.get("alice-secret").public) == ("alice", False)
    assert (tlib.get("alice-pub").owner, tlib.get("alice-pub").public) == ("alice", True)
    d = tlib.get("alice-pub").to_dict()
    assert d["owner"] == "alice" and d["public"] is True


def test_list_shows_each_tenant_only_what_it_may_see(tlib):
    assert names(tlib.list()) == ["shared", "alice-secret", "alice-pub", "bob-secret"]  # operator: no filter
    assert names(tlib.list(tenant="alice")) == ["shared", "alice-secret", "alice-pub"]
    assert names(tlib.list(tenant="bob")) == ["shared", "alice-pub", "bob-secret"]
    assert names(tlib.list(tenant="carol")) == ["shared", "alice-pub"]
    assert names(tlib.list(tags=["x"], tenant="carol")) == ["shared"]  # tags and visibility combine
    assert names(tlib.list(tags=["x"], tenant="bob")) == ["shared", "bob-secret"]
    assert names(tlib.list(tenant="bob", limit=1, offset=1)) == ["alice-pub"]


def test_another_tenants_private_adapter_is_exactly_a_missing_one(tlib):
    secret = tlib.get("bob-secret")
    for ref in ("bob-secret", secret.id):
        with pytest.raises(AdapterNotFound) as hidden:
            tlib.get(ref, tenant="alice")
        missing_ref = "bob-secreu" if ref == "bob-secret" else "0123456789abcdef"
        with pytest.raises(AdapterNotFound) as missing:
            tlib.get(missing_ref, tenant="alice")
        assert str(hidden.value) == str(missing.value).replace(repr(missing_ref), repr(ref))
    # the "similar names" hint lists only visible names: asking for "secret" must not reveal bob's
    with pytest.raises(AdapterNotFound) as e:
        tlib.get("secret", tenant="carol")
    assert "bob" not in str(e.value) and "alice-secret" not in str(e.value)
    with pytest.raises(AdapterNotFound, match="similar names: alice-secret, bob-secret"):
        tlib.get("secret")  # the operator sees both
    assert tlib.get("bob-secret", tenant="bob").id == secret.id
    assert tlib.get("alice-pub", tenant="bob").owner == "alice"


def test_a_tenant_that_sees_nothing_gets_the_empty_library_message(lib, make_weights):
    lib.add_weights(make_weights(0), "only-bob", owner="bob")
    with pytest.raises(AdapterNotFound, match="the library is empty"):
        lib.get("only-bob", tenant="alice")
    with pytest.raises(AdapterNotFound, match="the library is empty"):
        lib.get("nothing", tenant="alice")


def test_remove_only_own_adapters(tlib):
    with pytest.raises(AdapterNotFound):
        tlib.remove("bob-secret", tenant="alice")
    with pytest.raises(AccessDenied, match="not yours to delete: it belongs to another tenant"):
        tlib.remove("alice-pub", tenant="bob")
    with pytest.raises(AccessDenied, match="belongs to the shared library"):
        tlib.remove("shared", tenant="bob")
    assert len(tlib) == 4  # nothing was lost
    tlib.remove("alice-secret", tenant="alice")
    tlib.remove("bob-secret")  # the operator removes anything
    assert names(tlib.list()) == ["shared", "alice-pub"]


def test_names_are_global_and_a_clash_reads_the_same_for_hidden_names(tlib, make_weights):
    with pytest.raises(AdapterExists) as hidden:
        tlib.add_weights(make_weights(5), "bob-secret", owner="alice")  # bob's private name
    with pytest.raises(AdapterExists) as visible:
        tlib.add_weights(make_weights(5), "alice-pub", owner="alice")
    assert str(hidden.value) == str(visible.value).replace("'alice-pub'", "'bob-secret'")
    assert tlib.get("bob-secret").id not in str(hidden.value) and "unique across the whole library" in str(hidden.value)
    assert len(tlib) == 4


def test_bad_owner_and_public_values(lib, make_weights):
    for owner in ("", "has space", 5, "a/b"):
        with pytest.raises(LibraryError, match="invalid owner"):
            lib.add_weights(make_weights(0), "x", owner=owner)
    with pytest.raises(InvalidAdapter, match="public is 'yes'; expected True or False"):
        lib.add_weights(make_weights(0), "x", owner="alice", public="yes")
    with pytest.raises(LibraryError, match="invalid tenant"):
        lib.list(tenant="")
    assert len(lib) == 0


def test_add_from_peft_dir_with_owner(lib, adapter_dir):
    rec = lib.add(adapter_dir, "mine", owner="carol", public=True)
    assert (rec.owner, rec.public) == ("carol", True)


def _make_v1_library(path):
    """A registry as loramix 0.1 (schema 1) wrote it: no owner/public columns, no audit table."""
    path.mkdir(parents=True)
    conn = sqlite3.connect(path / "registry.sqlite")
    conn.execute("""CREATE TABLE adapters (
        id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, description TEXT NOT NULL DEFAULT '',
        domain_tags TEXT NOT NULL DEFAULT '[]', skill_tags TEXT NOT NULL DEFAULT '[]',
        rank INTEGER NOT NULL, alpha REAL NOT NULL, target_modules TEXT NOT NULL DEFAULT '[]',
        n_params INTEGER NOT NULL, created REAL NOT NULL, use_count INTEGER NOT NULL DEFAULT 0,
        blob TEXT NOT NULL, meta TEXT NOT NULL DEFAULT '{}')""")
    conn.execute("INSERT INTO adapters VALUES ('00000000000000aa', 'old', 'from v1', '[]', '[]', 4, 8.0, '[]', 10, "
                 "0.0, 3, ?, '{}')", ("0" * 64,))
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()


def test_migration_from_schema_1_keeps_rows_and_is_idempotent(tmp_path, make_weights):
    home = tmp_path / "v1"
    _make_v1_library(home)
    with Library(home) as lib:
        old = lib.get("old")
        assert (old.owner, old.public, old.use_count, old.description) == (None, False, 3, "from v1")
        assert names(lib.list(tenant="anyone")) == ["old"]  # pre-tenancy adapters are the shared library
        lib.add_weights(make_weights(0), "new", owner="alice")
        lib.audit("add", tenant="alice", adapter="new")
    from loramix.store import tenancy

    conn = sqlite3.connect(home / "registry.sqlite")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    tenancy.migrate(conn)  # running it again changes nothing
    conn.commit()
    cols = [r[1] for r in conn.execute("PRAGMA table_info(adapters)")]
    assert cols.count("owner") == 1 and cols.count("public") == 1
    conn.close()
    with Library(home) as again:
        assert names(again.list(tenant="bob")) == ["old"] and again.get("new").owner == "alice"
        assert again.audit_log()[0]["adapter"] == "new"


def test_audit_rows(lib):
    lib.audit("add", tenant="alice", adapter="a1", detail={"bytes": 10})
    lib.audit("generate", tenant="bob", adapter="a1,a2", outcome="error", detail={"error": "boom"})
    lib.audit("delete", tenant=None, adapter="a1")
    rows = lib.audit_log()
    assert [(r["tenant"], r["action"], r["adapter"], r["outcome"]) for r in rows] == [
        (None, "delete", "a1", "ok"), ("bob", "generate", "a1,a2", "error"), ("alice", "add", "a1", "ok")]
    assert rows[2]["detail"] == {"bytes": 10} and rows[0]["ts"] >= rows[2]["ts"] > 0
    assert [r["action"] for r in lib.audit_log(tenant="bob")] == ["generate"]
    assert [r["action"] for r in lib.audit_log(limit=1)] == ["delete"]
    with pytest.raises(LibraryError, match="audit outcome is 'meh'"):
        lib.audit("add", outcome="meh")
    with pytest.raises(LibraryError, match="audit action is ''"):
        lib.audit("")
    with pytest.raises(LibraryError, match="not JSON-serialisable"):
        lib.audit("add", detail={"x": object()})
    assert len(lib.audit_log(limit=None)) == 3  # the refused rows were not written


OWNERS = [None, "alice", "bob"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=st.lists(st.tuples(st.sampled_from(OWNERS), st.booleans()), min_size=0, max_size=6),
       tenant=st.sampled_from([None, "alice", "bob", "carol"]))
def test_visibility_matches_its_definition(tmp_path_factory, base_shapes, spec, tenant) -> None:
    """For any mix of owners and flags: list, get and remove agree with `visible_to` and with each other."""
    import torch

    from loramix.lora import LoraWeights
    from loramix.store.tenancy import visible_to

    path, (n_in, n_out) = next(iter(sorted(base_shapes.items())))
    w = LoraWeights(rank=1, alpha=1.0, layers={path: (torch.ones(1, n_in), torch.ones(n_out, 1))})
    with Library(tmp_path_factory.mktemp("prop"), base_shapes=base_shapes) as lib:
        recs = [lib.add_weights(w, f"a{i}", owner=o, public=p and o is not None) for i, (o, p) in enumerate(spec)]
        want = [r.name for r in recs if visible_to(r.owner, r.public, tenant)]
        assert names(lib.list(tenant=tenant)) == want
        for r in recs:
            if r.name in want:
                assert lib.get(r.name, tenant=tenant).id == lib.get(r.id, tenant=tenant).id == r.id
            else:
                with pytest.raises(AdapterNotFound) as e:
                    lib.get(r.name, tenant=tenant)
                assert r.id not in str(e.value) and (r.owner or "") not in str(e.value).replace(str(lib.home), "")
        for r in recs:
            mine = tenant is None or r.owner == tenant
            if r.name not in want:
                with pytest.raises(AdapterNotFound):
                    lib.remove(r.name, tenant=tenant)
            elif not mine:
                with pytest.raises(AccessDenied):
                    lib.remove(r.name, tenant=tenant)
            else:
                lib.remove(r.name, tenant=tenant)
        assert sorted(names(lib.list())) == sorted(r.name for r in recs if not (
            r.name in want and (tenant is None or r.owner == tenant)))
