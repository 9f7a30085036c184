"""The SQLite registry: records, names, tags, keys, examples, events, schema, scale, threads."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time

import numpy as np
import pytest

from loramix.errors import AdapterExists, AdapterNotFound, InvalidAdapter, LibraryError
from loramix.store import AdapterRecord, Library
from loramix.store.blobs import BlobStore


def test_add_from_peft_dir_and_get(lib, adapter_dir):
    rec = lib.add(adapter_dir, "grammar", description="fixes grammar", domain_tags=["english"],
                  skill_tags=("editing", "grammar"), examples=["fix: he go home", "  "])
    assert isinstance(rec, AdapterRecord)
    assert (rec.name, rec.description, rec.rank, rec.alpha) == ("grammar", "fixes grammar", 4, 8.0)
    assert rec.domain_tags == ["english"] and rec.skill_tags == ["editing", "grammar"]
    assert rec.tags == ["english", "editing", "grammar"]
    assert rec.target_modules == ["q_proj", "v_proj"] and rec.n_params == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    assert rec.use_count == 0 and not rec.has_key and rec.meta == {} and abs(rec.created - time.time()) < 60
    assert len(rec.id) == 16 and len(rec.blob) == 64
    assert lib.get(rec.id) == rec == lib.get("grammar") == lib.get(rec)
    assert lib.examples(rec.id) == ["fix: he go home"]
    assert json.loads(json.dumps(rec.to_dict()))["skill_tags"] == ["editing", "grammar"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.name = "other"  # type: ignore[misc]


def test_add_weights_with_meta_and_key(lib, make_weights, same_weights):
    w = make_weights(0)
    rec = lib.add_weights(w, "w1", meta={"report": {"loss": 1.5}}, key=np.ones(8))
    assert rec.meta == {"report": {"loss": 1.5}} and rec.has_key
    assert same_weights(lib.load("w1"), w)
    assert lib.load("w1", verify=True).rank == 4


def test_name_taken_raises_adapter_exists(lib, make_weights):
    first = lib.add_weights(make_weights(0), "dup")
    with pytest.raises(AdapterExists, match=f"'dup' already exists \\(id {first.id}\\)"):
        lib.add_weights(make_weights(1), "dup")
    assert lib.ids() == [first.id]


@pytest.mark.parametrize("name", ["", "has space", "x" * 101, "../up", "..", "a/b", "ünï", "trailing\n",
                                  "deadbeefdeadbeef", None])
def test_invalid_names_rejected(lib, make_weights, name):
    with pytest.raises(InvalidAdapter, match="adapter name"):
        lib.add_weights(make_weights(0), name)
    assert len(lib) == 0


def test_valid_names(lib, make_weights):
    for i, name in enumerate(["a", "A.b_c-9", "x" * 100, ".hidden"]):
        assert lib.add_weights(make_weights(i), name).name == name


def test_not_found_message(lib, make_weights):
    with pytest.raises(AdapterNotFound, match="'nope'.*the library is empty"):
        lib.get("nope")
    lib.add_weights(make_weights(0), "botany-expert")
    with pytest.raises(AdapterNotFound, match="'botany'.*similar names: botany-expert") as e:
        lib.load("botany")
    assert isinstance(e.value, KeyError) and not str(e.value).startswith("'")
    with pytest.raises(AdapterNotFound, match="expected an existing name or id"):
        lib.remove("zzz")


def test_list_ids_len_contains(lib, make_weights):
    a = lib.add_weights(make_weights(0), "a", domain_tags=["bio"], skill_tags=["qa"])
    b = lib.add_weights(make_weights(1), "b", domain_tags=["bio", "chem"])
    c = lib.add_weights(make_weights(2), "c", skill_tags=["qa", "bio"])
    assert lib.ids() == [a.id, b.id, c.id] and len(lib) == 3
    assert [r.name for r in lib.list()] == ["a", "b", "c"]
    assert [r.name for r in lib.list(tags=["bio"])] == ["a", "b", "c"]
    assert [r.name for r in lib.list(tags=["bio", "qa"])] == ["a", "c"]
    assert [r.name for r in lib.list(tags=["chem", "qa"])] == []
    assert [r.name for r in lib.list(tags=["nothing"])] == []
    assert [r.name for r in lib.list(limit=2)] == ["a", "b"]
    assert [r.name for r in lib.list(limit=2, offset=2)] == ["c"]
    assert "a" in lib and a.id in lib and "zz" not in lib and 3 not in lib


def test_update(lib, make_weights):
    a = lib.add_weights(make_weights(0), "a", domain_tags=["bio"], meta={"x": 1})
    lib.add_weights(make_weights(1), "b")
    rec = lib.update("a", description="new", skill_tags=["qa"], meta={"y": 2})
    assert (rec.description, rec.domain_tags, rec.skill_tags, rec.meta) == ("new", ["bio"], ["qa"], {"y": 2})
    assert [r.name for r in lib.list(tags=["qa"])] == ["a"]
    lib.update(a.id, domain_tags=[])
    assert lib.list(tags=["bio"]) == []
    assert lib.update(a.id, name="a2").name == "a2" and "a" not in lib
    with pytest.raises(AdapterExists):
        lib.update("a2", name="b")


def test_keys(lib, make_weights):
    ids = [lib.add_weights(make_weights(i), f"n{i}").id for i in range(4)]
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((4, 6))
    for i in (2, 0, 3):
        lib.set_key(ids[i], vecs[i])
    got_ids, mat = lib.keys()
    assert got_ids == [ids[0], ids[2], ids[3]] and mat.dtype == np.float32 and mat.shape == (3, 6)
    np.testing.assert_array_equal(mat, vecs[[0, 2, 3]].astype(np.float32))
    got_ids, mat = lib.keys([ids[3], ids[1], "unknown", ids[0]])
    assert got_ids == [ids[3], ids[0]]
    np.testing.assert_array_equal(mat, vecs[[3, 0]].astype(np.float32))
    assert lib.get(ids[0]).has_key and not lib.get(ids[1]).has_key
    conn = sqlite3.connect(lib.db_path)
    assert conn.execute("SELECT typeof(vec), dim, length(vec) FROM keys LIMIT 1").fetchone() == ("blob", 6, 24)
    conn.close()
    batches = list(lib.iter_keys(batch_size=2))
    assert [b[0] for b in batches] == [[ids[0], ids[2]], [ids[3]]]
    lib.set_keys([ids[1], "n3"], np.zeros((2, 6)))
    assert lib.keys()[0] == ids and not lib.keys()[1][3].any()
    lib.delete_key(ids[1])
    assert lib.keys()[0] == [ids[0], ids[2], ids[3]]
    assert lib.keys([])[1].shape == (0, 0)


def test_bad_keys_rejected(lib, make_weights):
    aid = lib.add_weights(make_weights(0), "a").id
    for bad in (np.ones((2, 3)), np.array([]), np.array([1.0, np.nan]), np.array(["a"])):
        with pytest.raises(LibraryError, match="routing key"):
            lib.set_key(aid, bad)
    with pytest.raises(AdapterNotFound):
        lib.set_key("missing", np.ones(3))
    lib.set_key(aid, np.ones(3))
    lib.set_key(lib.add_weights(make_weights(1), "b").id, np.ones(4))
    with pytest.raises(LibraryError, match=r"different sizes \[3, 4\]"):
        lib.keys()


def test_examples_use_and_events(lib, make_weights):
    a = lib.add_weights(make_weights(0), "a", examples=["one"])
    b = lib.add_weights(make_weights(1), "b")
    assert lib.add_examples(a.id, ["two", "", "three"]) == 2
    assert lib.examples(a.id) == ["one", "two", "three"] and lib.examples("b") == []
    lib.record_use([a.id, b.id])
    lib.record_use([a.id], event="reroute", detail={"query": "q", "from": b.id})
    assert lib.get("a").use_count == 2 and lib.get("b").use_count == 1
    ev = lib.events(a.id)
    assert len(ev) == 1 and ev[0]["event"] == "reroute" and ev[0]["detail"] == {"query": "q", "from": b.id}
    assert lib.events(b.id) == []
    with pytest.raises(AdapterNotFound):
        lib.record_use([b.id, "ghost"], event="x")
    assert lib.get("b").use_count == 1 and lib.events(b.id) == []  # all or nothing
    with pytest.raises(LibraryError, match="detail but no event"):
        lib.record_use([a.id], detail={"x": 1})


def test_remove_cascades(lib, make_weights):
    a = lib.add_weights(make_weights(0), "a", domain_tags=["t"], examples=["e"], key=np.ones(3))
    keep = lib.add_weights(make_weights(1), "keep", domain_tags=["t"], examples=["e"], key=np.ones(3))
    lib.record_use([a.id, keep.id], event="used")
    lib.remove("a")
    assert "a" not in lib and lib.ids() == [keep.id]
    conn = sqlite3.connect(lib.db_path)
    for table in ("keys", "examples", "events", "tags"):
        assert conn.execute(f"SELECT DISTINCT adapter_id FROM {table}").fetchall() == [(keep.id,)], table
    conn.close()
    assert not lib.blobs.exists(a.blob) and lib.blobs.exists(keep.blob)
    with pytest.raises(AdapterNotFound):
        lib.load(a.id)


def test_meta_path(lib):
    p = lib.meta_path("index")
    assert p == lib.home / "meta" / "index" and p.is_dir()
    with pytest.raises(InvalidAdapter):
        lib.meta_path("../escape")


def test_schema(lib):
    conn = sqlite3.connect(lib.db_path)
    cols = [r[1] for r in conn.execute("PRAGMA table_info(adapters)")]
    assert cols == ["id", "name", "description", "domain_tags", "skill_tags", "rank", "alpha", "target_modules",
                    "n_params", "created", "use_count", "blob", "meta", "owner", "public", "kind", "last_used"]
    assert [r[1] for r in conn.execute("PRAGMA table_info(keys)")] == ["adapter_id", "dim", "vec"]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    plan = " ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN SELECT id FROM adapters WHERE name = 'x'"))
    assert "USING INDEX" in plan or "USING COVERING INDEX" in plan
    for table in ("keys", "examples", "events", "tags"):
        fks = conn.execute(f"PRAGMA foreign_key_list({table})").fetchall()
        assert fks and fks[0][2] == "adapters" and fks[0][6] == "CASCADE"
    conn.close()
    assert lib._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_reopen_and_home_from_env(tmp_path, make_weights, monkeypatch):
    monkeypatch.setenv("LORAMIX_HOME", str(tmp_path / "envhome"))
    with Library() as first:
        assert first.home == tmp_path / "envhome" and (first.home / "registry.sqlite").is_file()
        assert (first.home / "blobs").is_dir()
        first.add_weights(make_weights(0), "a", key=np.ones(2))
    with Library(tmp_path / "envhome") as again:
        assert again.ids() == [again.get("a").id] and again.keys()[1].shape == (1, 2)


def test_newer_schema_refused(tmp_path):
    Library(tmp_path / "h").close()
    conn = sqlite3.connect(tmp_path / "h" / "registry.sqlite")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(LibraryError, match="schema version 99"):
        Library(tmp_path / "h")


def test_open_is_cheap_with_many_rows(tmp_path, monkeypatch):
    """100k rows: opening reads no adapter rows, keys or blobs; get/list/len are indexed SQL."""
    Library(tmp_path / "big").close()
    conn = sqlite3.connect(tmp_path / "big" / "registry.sqlite")
    rows = [(f"{i:016x}"[::-1], f"name{i}", "", "[]", "[]", 4, 8.0, "[]", 10, 0.0, 0, "0" * 64, "{}", None, 0)
            for i in range(100_000)]
    with conn:
        conn.executemany("INSERT INTO adapters (id, name, description, domain_tags, skill_tags, rank, alpha, "
                         "target_modules, n_params, created, use_count, blob, meta, owner, public) "
                         "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    conn.close()

    def forbidden(*a, **k):
        raise AssertionError("opening the library touched blobs")

    monkeypatch.setattr(BlobStore, "iter_shas", forbidden)
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    statements: list[str] = []
    real_connect = sqlite3.connect

    def tracing_connect(*a, **k):
        c = real_connect(*a, **k)
        c.set_trace_callback(statements.append)
        return c

    monkeypatch.setattr(sqlite3, "connect", tracing_connect)
    t0 = time.perf_counter()
    with Library(tmp_path / "big") as big:
        opened = time.perf_counter() - t0
        assert statements and not [s for s in statements if "FROM" in s.upper()]  # only PRAGMAs at open
        assert big.get("name12345").name == "name12345"
        assert [r.name for r in big.list(limit=3)] == ["name0", "name1", "name2"]
        assert len(big) == 100_000
    assert opened < 2.0, opened


def test_threads_share_one_library(lib, make_weights):
    errors: list[BaseException] = []
    weights = [make_weights(i) for i in range(12)]

    def work(t: int) -> None:
        try:
            for j in range(3):
                rec = lib.add_weights(weights[t * 3 + j], f"t{t}-{j}", key=np.full(4, t, dtype=np.float32))
                lib.record_use([rec.id], event="hit")
                lib.list(limit=5)
                lib.keys()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(lib) == 12 and all(r.use_count == 1 and r.has_key for r in lib.list())


def test_two_libraries_on_one_home(tmp_path, make_weights):
    with Library(tmp_path / "h") as one, Library(tmp_path / "h") as two:
        done = []

        def add(library: Library, start: int) -> None:
            for i in range(start, start + 4):
                library.add_weights(make_weights(i), f"n{i}")
            done.append(start)

        threads = [threading.Thread(target=add, args=(lib_, s)) for lib_, s in ((one, 0), (two, 4))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert sorted(done) == [0, 4]
        assert len(one) == len(two) == 8 and two.load("n1").rank == 4
