"""BM25 and the faiss key index, without the encoder."""

from __future__ import annotations

import numpy as np
import pytest

from loramix.route import BM25, KeyIndex
from loramix.route.lexical import normalize_word, tokenize


def test_tokenize_drops_stopwords_and_case() -> None:
    assert tokenize("How do I Water the FERNS?") == ["water", "ferns"]
    assert normalize_word("ferns") == "fern" and normalize_word("berries") == "berry"
    assert normalize_word("glass") == "glass"


def test_bm25_prefers_rare_terms_and_updates_incrementally() -> None:
    bm = BM25()
    bm.add("a", "tomato sauce pasta recipe")
    bm.add("b", "tomato plant garden soil")
    bm.add("c", "zymurgy fermentation of beer")
    top = bm.top("zymurgy tomato", 3)
    assert top[0][0] == "c"  # the rare word outweighs the shared one
    assert {d for d, _ in top} == {"a", "b", "c"}
    assert bm.scores("garden", allowed={"a"}) == {}

    fresh = BM25()
    fresh.add("a", "tomato sauce pasta recipe")
    fresh.add("c", "zymurgy fermentation of beer")
    bm.remove("b")
    bm.remove("missing")  # no-op
    assert len(bm) == 2 and "b" not in bm
    assert bm.scores("tomato zymurgy") == pytest.approx(fresh.scores("tomato zymurgy"))
    bm.add("a", "something else")  # re-adding replaces
    assert "a" not in bm.scores("tomato")


class KeysOnly:
    """The part of the Library contract KeyIndex.sync uses."""

    def __init__(self, keys: dict[str, np.ndarray]) -> None:
        self.store = keys
        self.reads: list[list[str]] = []

    def keys(self, ids=None):
        ids = [i for i in (ids if ids is not None else self.store) if i in self.store]
        self.reads.append(ids)
        return ids, np.stack([self.store[i] for i in ids]).astype(np.float32)


def unit(rng: np.random.Generator, d: int = 8) -> np.ndarray:
    v = rng.standard_normal(d).astype(np.float32)
    return v / np.linalg.norm(v)


def test_key_index_sync_is_incremental_and_persisted(tmp_path) -> None:
    rng = np.random.default_rng(0)
    lib = KeysOnly({f"id{i}": unit(rng) for i in range(5)})
    idx = KeyIndex(tmp_path)
    rep = idx.sync(lib, set(lib.store))
    assert sorted(rep.added) == sorted(lib.store) and idx.ntotal == 5

    lib.store["id5"] = unit(rng)
    lib.reads.clear()
    rep = KeyIndex(tmp_path).sync(lib, set(lib.store))  # reopened from disk
    assert rep.added == ["id5"] and lib.reads == [["id5"]]  # only the new key was read

    del lib.store["id0"]
    lib.store["id1"] = unit(rng)
    idx = KeyIndex(tmp_path)
    rep = idx.sync(lib, set(lib.store), verify=True)
    assert rep.removed == ["id0"] and rep.updated == ["id1"] and rep.added == []
    assert KeyIndex(tmp_path).ntotal == 5

    hits = idx.search(lib.store["id3"][None], 2)[0]
    assert hits[0][0] == "id3" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [a for a, _ in idx.search(lib.store["id3"][None], 5, allowed={"id2", "id4"})[0]] in (
        ["id2", "id4"],
        ["id4", "id2"],
    )
    assert idx.search(lib.store["id3"][None], 3, allowed=set())[0] == []
    np.testing.assert_allclose(idx.vectors(["id4"])[0], lib.store["id4"], atol=1e-6)


def test_key_index_recovers_from_a_broken_cache(tmp_path) -> None:
    rng = np.random.default_rng(1)
    lib = KeysOnly({f"id{i}": unit(rng) for i in range(3)})
    KeyIndex(tmp_path).sync(lib, set(lib.store))
    (tmp_path / "keys.json").write_text("{not json")
    idx = KeyIndex(tmp_path)
    assert idx.ntotal == 0
    assert sorted(idx.sync(lib, set(lib.store)).added) == ["id0", "id1", "id2"]
