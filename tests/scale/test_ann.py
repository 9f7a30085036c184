"""The scalable key index: recall against exact search, deletions, tag filters, persistence, library sync."""

from __future__ import annotations

import numpy as np
import pytest

from loramix.route.ann import AnnConfig, AnnIndex
from loramix.store import Library, NewAdapter

from .helpers import nano, synthetic_basis


def clustered(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, d))
    x = centres[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def ids(n: int, start: int = 0) -> list[str]:
    return [f"{i:016x}" for i in range(start, start + n)]


def exact(vecs: np.ndarray, keys: list[str], q: np.ndarray, k: int, allowed: set[str] | None = None) -> list[str]:
    s = vecs @ q
    order = [i for i in np.argsort(-s, kind="stable") if allowed is None or keys[i] in allowed]
    return [keys[i] for i in order[:k]]


@pytest.mark.parametrize("kind", ["hnsw", "ivfsq"])
def test_recall_at_3_against_exact(kind):
    vecs, keys = clustered(6000), ids(6000)
    idx = AnnIndex(None, AnnConfig(kind=kind, exact_max=100))
    idx.upsert(keys, vecs)
    assert idx.kind == kind and idx.ntotal == 6000
    qs = clustered(200, seed=1)
    hits = sum(len(set(exact(vecs, keys, q, 3)) & {a for a, _ in idx.search(q[None], 3)[0]}) for q in qs)
    assert hits / (3 * len(qs)) >= 0.95


def test_ivf_with_a_graph_over_its_centroids_persists_and_recalls(tmp_path):
    vecs, keys = clustered(4000), ids(4000)
    cfg = AnnConfig(kind="ivfsq", ivf_lists=64, ivf_graph_lists=32, ivf_probe=24)
    idx = AnnIndex(tmp_path / "ix", cfg)
    idx.upsert(keys, vecs)
    idx.save()
    again = AnnIndex(tmp_path / "ix", cfg)
    import faiss

    assert isinstance(faiss.downcast_index(faiss.downcast_index(again._index).quantizer), faiss.IndexHNSW)
    qs = clustered(100, seed=2)
    hits = sum(len(set(exact(vecs, keys, q, 3)) & {a for a, _ in again.search(q[None], 3)[0]}) for q in qs)
    assert hits / (3 * len(qs)) >= 0.95


def test_auto_nprobe_scans_about_ivf_scan_keys_and_follows_growth():
    import faiss

    vecs, keys = clustered(6000), ids(6000)
    idx = AnnIndex(None, AnnConfig(kind="ivfsq", ivf_lists=40, ivf_scan=600))
    idx.upsert(keys[:4000], vecs[:4000])
    ivf = faiss.downcast_index(idx._index)
    assert idx.nprobe == ivf.nprobe == 6  # 4,000 keys in 40 lists: 100 per list -> 600 / 100
    idx.upsert(keys[4000:], vecs[4000:])
    assert idx.nprobe == ivf.nprobe == 4  # 150 per list: ceil(600 / 150)
    idx.cfg.ivf_probe = 9  # a fixed width wins over auto
    idx._apply_search_params()
    assert ivf.nprobe == 9


def test_auto_goes_flat_then_hnsw_then_ivf():
    idx = AnnIndex(None, AnnConfig(exact_max=100, hnsw_max=1000))
    assert [idx._choose_kind(n) for n in (100, 101, 1000, 1001)] == ["flat", "hnsw", "hnsw", "ivfsq"]


def test_auto_is_exact_below_threshold_and_approximate_above():
    vecs, keys = clustered(700), ids(700)
    idx = AnnIndex(None, AnnConfig(exact_max=500))
    idx.upsert(keys[:400], vecs[:400])
    assert idx.kind == "flat"
    q = clustered(1, seed=3)[0]
    assert [a for a, _ in idx.search(q[None], 5)[0]] == exact(vecs[:400], keys[:400], q, 5)
    idx.upsert(keys[400:], vecs[400:])  # crosses the threshold: rebuilt as HNSW
    assert idx.kind == "hnsw" and idx.ntotal == 700


def test_deletions_tombstones_and_rebuild():
    vecs, keys = clustered(3000), ids(3000)
    idx = AnnIndex(None, AnnConfig(kind="hnsw", rebuild_dead_share=0.3))
    idx.upsert(keys, vecs)
    gone = set(keys[:500])
    assert sorted(idx.remove(sorted(gone))) == sorted(gone)
    assert len(idx._alive) == 3000 and idx.ntotal == 2500  # tombstones, not rebuilt yet
    for q in vecs[:50]:  # queries equal to removed keys: never returned
        assert not {a for a, _ in idx.search(q[None], 3)[0]} & gone
    idx.remove(keys[500:1000])  # 1/3 dead: rebuilt without them
    assert len(idx._alive) == 2000 == idx.ntotal
    idx.upsert(keys[:10], vecs[:10])  # re-added
    assert idx.search(vecs[3][None], 1)[0][0][0] == keys[3]


@pytest.mark.parametrize("n_allowed", [40, 2500])
def test_tag_filter_results_stay_in_filter(n_allowed):
    vecs, keys = clustered(5000), ids(5000)
    idx = AnnIndex(None, AnnConfig(kind="hnsw", prefilter_max=100))
    idx.upsert(keys, vecs)
    rng = np.random.default_rng(0)
    allowed = set(rng.choice(keys, n_allowed, replace=False).tolist())
    hits = total = 0
    for q in clustered(50, seed=2):
        got = [a for a, _ in idx.search(q[None], 3, allowed)[0]]
        want = exact(vecs, keys, q, 3, allowed)
        assert len(got) == 3 and set(got) <= allowed
        if n_allowed <= 100:
            assert got == want  # pre-filtered: exact
        hits += len(set(got) & set(want))
        total += 3
    assert hits / total >= 0.95


def test_persisted_and_loaded_without_rebuild(tmp_path, monkeypatch):
    vecs, keys = clustered(2000), ids(2000)
    idx = AnnIndex(tmp_path / "ix", AnnConfig(kind="hnsw"))
    idx.upsert(keys, vecs)
    idx.remove(keys[:5])
    idx.save()
    q = clustered(5, seed=9)
    before = idx.search(q, 3)
    monkeypatch.setattr(AnnIndex, "_build", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    again = AnnIndex(tmp_path / "ix", AnnConfig(kind="hnsw"))
    assert again.kind == "hnsw" and again.ntotal == 1995 and keys[0] not in again
    assert again.search(q, 3) == before


def test_sync_with_library_incremental(tmp_path):
    lib = Library(tmp_path / "lib")
    basis = synthetic_basis()
    lib.put_basis(basis)
    vecs = clustered(300, d=16)
    new = lib.add_many([NewAdapter(f"a{i}", nano(basis, i), key=vecs[i]) for i in range(300)])
    idx = AnnIndex(lib.meta_path("index"), AnnConfig(exact_max=100))
    rep = idx.sync(lib)
    assert len(rep.added) == 300 and idx.kind == "hnsw"
    assert not idx.sync(lib).changed  # same generation: nothing read
    lib.remove("a7")
    lib.set_key("a8", vecs[0])
    rep = idx.sync(lib, verify=True)
    assert rep.removed == [new[7]] and rep.updated == [new[8]] and not rep.added
    reopened = AnnIndex(lib.meta_path("index"), AnnConfig(exact_max=100))
    assert reopened.ntotal == 299 and not reopened.sync(lib).changed
    assert reopened.search(vecs[0][None], 2)[0][0][0] in {new[0], new[8]}
