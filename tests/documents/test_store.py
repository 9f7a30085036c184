"""Document collections: chunking, the SQLite store (whole or gone), the faiss cache, retrieval and its cache."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from loramix.config import DocsConfig
from loramix.documents import DocStore, Retriever, chunk_text, mix_scores, read_source, rrf
from loramix.errors import CollectionNotFound, ConfigError, DocumentError
from loramix.testing import HashEncoder

# The tests embed with HashEncoder (random vectors): retrieval that must find the right passage fuses
# in BM25 (the product default, fusion="dense", is for a real encoder).
HASH_FUSION = "rrf"

TEXTS = [
    "The zebra is an African equine with black and white stripes.",
    "An acid reacts with a base to form a salt and water.",
    "The oak is a tree of the genus Quercus bearing acorns. " * 12,
    "A compiler translates source code into machine code.",
]


def test_chunk_overlap() -> None:
    words = [f"w{i}" for i in range(25)]
    chunks = chunk_text(" ".join(words), 10, 4)
    assert chunks[0].split() == words[:10] and chunks[1].split() == words[6:16]
    assert chunks[-1].split()[-1] == "w24"
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a.split()[-4:] == b.split()[:4]  # consecutive chunks share the overlap
    assert chunk_text("short text", 10, 4) == ["short text"] and chunk_text("   ", 10, 4) == []


def test_add_list_show_remove(tmp_path: Path) -> None:
    s = DocStore(tmp_path)
    rec = s.add("facts", TEXTS, HashEncoder(), keys=["zebra", "acid", "oak", "compiler"], tags=["science"],
                chunk_words=32, chunk_overlap=8)
    assert rec.n_docs == 4 and rec.n_chunks > 4 and rec.dim == 16 and rec.tags == ["science"]
    assert [r.name for r in s.list()] == ["facts"] and s.list(tags=["nope"]) == []
    oak = [c for c in s.chunks(collection="facts") if c.key == "oak"]
    assert len(oak) > 1 and [c.seq for c in oak] == list(range(len(oak)))
    ids, mat = s.keys([c.id for c in oak])
    assert ids == [c.id for c in oak] and mat.shape == (len(oak), 16)
    g = s.generation()
    s.remove("facts")
    assert s.generation() > g and s.list() == [] and s.chunk_ids() == []
    with pytest.raises(CollectionNotFound, match="no document collection named 'facts'"):
        s.get("facts")


def test_bad_input_is_refused_and_loses_nothing(tmp_path: Path) -> None:
    s = DocStore(tmp_path)
    s.add("keep", TEXTS[:2], HashEncoder())
    for name in ("bad name", "", "auto", "tag:x"):
        with pytest.raises(DocumentError):
            s.add(name, TEXTS, HashEncoder())
    with pytest.raises(DocumentError, match="already exists"):
        s.add("keep", TEXTS, HashEncoder())
    with pytest.raises(DocumentError, match="no non-blank text"):
        s.add("empty", ["  ", ""], HashEncoder())
    with pytest.raises(DocumentError, match="one key per text"):
        s.add("k", TEXTS, HashEncoder(), keys=["a"])
    with pytest.raises(DocumentError, match="tag"):
        s.add("t", TEXTS, HashEncoder(), tags=["a,b"])

    class NaNEncoder(HashEncoder):
        def encode(self, texts, batch_size=64):
            v = super().encode(texts)
            v[-1, 0] = np.nan
            return v

    with pytest.raises(DocumentError, match="non-finite"):
        s.add("nan", TEXTS, NaNEncoder())

    class WideEncoder(HashEncoder):
        dim = 32

    with pytest.raises(DocumentError, match="one encoder"):
        s.add("wide", TEXTS, WideEncoder())
    assert [r.name for r in s.list()] == ["keep"] and len(s.chunk_ids()) == 2
    with pytest.raises(ConfigError):
        DocsConfig(fusion="max")


def test_failed_insert_rolls_back_whole_collection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure in the middle of the write transaction leaves neither the collection nor any chunk."""
    s = DocStore(tmp_path)
    real = s._conn

    class Flaky:
        def __getattr__(self, name):
            return getattr(real, name)

        def executemany(self, sql, rows):
            rows = list(rows)
            real.executemany(sql, rows[:2])  # some chunks written, then the process "dies"
            raise sqlite3.OperationalError("disk I/O error")

    g = s.generation()
    monkeypatch.setattr(s, "_conn", Flaky())
    with pytest.raises(DocumentError, match="disk I/O error.*nothing was changed"):
        s.add("half", TEXTS, HashEncoder())
    monkeypatch.undo()
    assert s.list() == [] and s.chunk_ids() == [] and s.generation() == g
    again = DocStore(tmp_path)  # and a fresh process sees the same
    assert again.list() == [] and again.chunk_ids() == []


def test_index_synced_incrementally_and_rebuilt_when_corrupt(tmp_path: Path) -> None:
    s = DocStore(tmp_path)
    enc = HashEncoder()
    s.add("a", TEXTS[:2], enc)
    r = Retriever(s, enc)
    assert r.index.ntotal == 2
    s.add("b", TEXTS[2:], enc)
    r.sync()
    assert r.index.ntotal == len(s.chunk_ids())
    s.remove("a")
    r.sync()
    assert sorted(r.index.ids()) == sorted(s.chunk_ids())
    # the cache on disk is reloaded as is, and a damaged one is rebuilt from SQLite
    assert sorted(Retriever(s, enc).index.ids()) == sorted(s.chunk_ids())
    meta = s.index_dir() / "keys.json"
    m = json.loads(meta.read_text())
    m["adapters"] = {}
    meta.write_text(json.dumps(m))
    assert sorted(Retriever(s, enc).index.ids()) == sorted(s.chunk_ids())


def test_rrf_and_fused_retrieval(tmp_path: Path) -> None:
    assert rrf([["a", "b"], ["b", "c"]], k=1) == [("b", 1 / 3 + 1 / 2), ("a", 1 / 2), ("c", 1 / 3)]
    s = DocStore(tmp_path)
    enc = HashEncoder()
    s.add("facts", TEXTS, enc, keys=["zebra", "acid", "oak", "compiler"], chunk_words=200)
    r = Retriever(s, enc)
    cfg = DocsConfig(fusion=HASH_FUSION, collections=["facts"], passages=2)
    got = r.retrieve("what does an acid form with a base", cfg)
    assert got[0].key == "acid" and got[0].ranks["bm25"] == 1 and "dense" in got[0].ranks
    exact = r.retrieve(TEXTS[3], DocsConfig(collections=["facts"], passages=1, fusion="dense"))
    assert exact[0].key == "compiler" and exact[0].ranks == {"dense": 1}  # HashEncoder: same text, same vector
    assert r.retrieve("acid", DocsConfig(fusion=HASH_FUSION, collections=["facts"], passages=0)) == []


def test_mix_fusion_weights_and_ends(tmp_path: Path) -> None:
    got = dict(mix_scores([("a", 0.9), ("b", 0.5)], [("b", 12.0), ("c", 4.0)], 0.25))
    assert got == pytest.approx({"a": 0.25, "b": 1.0 * 0.75 + 0.0 * 0.25, "c": 0.0})  # min-max: a 1/b 0 dense, b 1/c 0 bm25
    s = DocStore(tmp_path)
    enc = HashEncoder()
    s.add("facts", TEXTS, enc, keys=["zebra", "acid", "oak", "compiler"], chunk_words=200)
    r = Retriever(s, enc)
    q = "what does an acid form with a base"

    def ids(fusion: str, w: float = 0.5) -> list[str]:
        return [p.id for p in r.retrieve(q, DocsConfig(collections=["facts"], passages=4, fusion=fusion, dense_weight=w))]

    assert ids("mix", 1.0) == ids("dense")  # HashEncoder ranks all 4 chunks: weight 1 is dense alone
    assert ids("mix", 0.0)[0] == ids("bm25")[0] and ids("mix", 0.0) != ids("mix", 1.0)
    with pytest.raises(ConfigError, match="dense_weight"):
        DocsConfig(fusion="mix", dense_weight=1.5)


def test_retrieval_cache_hits_and_invalidation(tmp_path: Path) -> None:
    s = DocStore(tmp_path)
    enc = HashEncoder()
    s.add("facts", TEXTS, enc, tags=["sci"])
    r = Retriever(s, enc)
    cfg = DocsConfig(fusion=HASH_FUSION, collections=["facts"], passages=2)
    first = r.retrieve("acid base salt", cfg)
    assert r.retrieve("acid base salt", cfg) == first and r.retrieve("acid base salt", DocsConfig(fusion=HASH_FUSION, collections=["tag:sci"], passages=2)) == first
    assert (r.hits, r.misses) == (2, 1) and r.stats()["retrieval_cache"]["hit_rate"] == pytest.approx(2 / 3, abs=1e-3)
    assert r.retrieve("acid base salt", DocsConfig(fusion=HASH_FUSION, collections=["facts"], passages=1)) == first[:1]  # other options: a miss
    assert r.misses == 2
    DocStore(tmp_path).add("more", ["Salt is sodium chloride; an acid and a base give a salt."], enc)  # another process
    got = r.retrieve("acid base salt", DocsConfig(fusion=HASH_FUSION, collections=["facts", "more"], passages=2))
    assert r.misses == 3 and got[0].collection == "more"
    DocStore(tmp_path).remove("more")
    with pytest.raises(CollectionNotFound):
        r.retrieve("acid base salt", DocsConfig(fusion=HASH_FUSION, collections=["facts", "more"], passages=2))
    assert r.retrieve("acid base salt", cfg) == first and r.misses == 4  # the cache was dropped by the change


def test_collections_by_tag_and_auto(tmp_path: Path) -> None:
    s = DocStore(tmp_path)
    enc = HashEncoder()
    s.add("zoo", TEXTS[:1], enc, tags=["zoology"])
    s.add("chem", TEXTS[1:2], enc, tags=["chemistry", "science"])
    r = Retriever(s, enc)
    assert [c.name for c in r.collections(["tag:science"])] == ["chem"]
    assert [c.name for c in r.collections(["auto"], route_tags=["Zoology"])] == ["zoo"]
    assert r.collections(["auto"], route_tags=[]) == []
    with pytest.raises(DocumentError, match="no collection carries the tag"):
        r.collections(["tag:nope"])


def test_read_source_text_and_jsonl(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("first paragraph here.\n\nsecond one here.\n")
    assert read_source(str(txt)) == (["first paragraph here.", "second one here."], ["0", "1"])
    js = tmp_path / "a.jsonl"
    js.write_text(json.dumps({"id": "x1", "text": "hello there"}) + "\n" + json.dumps({"text": "no id"}) + "\n")
    assert read_source(str(js)) == (["hello there", "no id"], ["x1", "1"])
    with pytest.raises(DocumentError, match="docs source"):
        read_source(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DocumentError, match="not valid JSON"):
        read_source(str(bad))
