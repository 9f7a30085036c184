"""Passage retrieval: dense (faiss over chunk vectors) and BM25, fused, then optionally LM-reranked.

The dense index is :class:`loramix.route.index.KeyIndex` (the adapter keys' index) over chunk ids,
synced incrementally from :class:`DocStore`; BM25 is :class:`loramix.route.lexical.BM25`, updated
from the same sync report. Results are cached per (query, options) and the cache is dropped when
the store's generation changes (any add, remove or retag, from any process).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from loramix.config import DocsConfig
from loramix.documents.store import CollectionRecord, DocStore, TextEncoder
from loramix.errors import DocumentError
from loramix.route.index import KeyIndex
from loramix.route.lexical import BM25
from loramix.store.tenancy import visible_to

__all__ = ["Passage", "Retriever", "mix_scores", "rrf"]

# scorer(prompt token ids, target token ids) -> mean NLL of each target given its prompt
PairScorer = Callable[[list[list[int]], list[list[int]]], list[float]]


@dataclass
class Passage:
    """A retrieved chunk and how it was ranked (``score``: the final order's score)."""

    collection: str
    id: str
    key: str
    text: str
    score: float
    ranks: dict[str, int] = field(default_factory=dict)  # retriever -> 1-based rank

    def to_dict(self, with_text: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_text:
            d.pop("text")
        d["score"] = round(self.score, 5)
        return d


def rrf(rankings: Sequence[Sequence[str]], k: int = 60) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: ``sum 1 / (k + rank)`` over the rankings holding an id, best first."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for r, doc in enumerate(ranking, 1):
            scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + r)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def mix_scores(dense: Sequence[tuple[str, float]], lexical: Sequence[tuple[str, float]],
               dense_weight: float) -> list[tuple[str, float]]:
    """Convex mix of the two retrievers' min-max normalised scores (a chunk missing from one list
    scores 0 there), best first; ``dense_weight`` 1.0 keeps the dense order, 0.0 BM25's."""

    def norm(pairs: Sequence[tuple[str, float]]) -> dict[str, float]:
        if not pairs:
            return {}
        lo, hi = min(s for _, s in pairs), max(s for _, s in pairs)
        return {cid: (s - lo) / (hi - lo) if hi > lo else 1.0 for cid, s in pairs}

    d, b = norm(dense), norm(lexical)
    scores = {cid: dense_weight * d.get(cid, 0.0) + (1 - dense_weight) * b.get(cid, 0.0) for cid in {*d, *b}}
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


class Retriever:
    """Retrieves passages from a :class:`DocStore`; thread-safe."""

    def __init__(self, store: DocStore, encoder: TextEncoder | None = None, cache_size: int = 1024) -> None:
        self.store = store
        self._encoder = encoder
        self._lock = threading.RLock()
        self.index = KeyIndex(store.index_dir())
        self._bm25: BM25 | None = None
        self._generation = -1
        self._collections: dict[str, CollectionRecord] = {}
        self._members: dict[str, set[str]] = {}  # collection id -> chunk ids
        self._cache: OrderedDict[tuple, list[Passage]] = OrderedDict()
        self.cache_size = cache_size
        self.hits = 0
        self.misses = 0
        self.sync()

    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            from loramix.route.encoder import get_encoder

            self._encoder = get_encoder()
        return self._encoder

    # --- keeping in sync ----------------------------------------------------------------------
    def sync(self) -> bool:
        """Match the index, BM25 and membership to the store when its generation moved; True if it did."""
        with self._lock:
            gen = self.store.generation()
            if gen == self._generation:
                return False
            recs = self.store.list()
            self._collections = {r.name: r for r in recs}
            self._members = {r.id: set(self.store.chunk_ids([r.id])) for r in recs}
            keyed = set().union(*self._members.values()) if self._members else set()
            report = self.index.sync(self.store, keyed)
            if self._bm25 is not None:
                for cid in report.removed:
                    self._bm25.remove(cid)
                for ch in self.store.chunks([*report.added, *report.updated]):
                    self._bm25.add(ch.id, ch.text)
            self._cache.clear()  # any change may change any answer
            self._generation = gen
            return True

    def _lexical(self) -> BM25:
        if self._bm25 is None:
            bm = BM25()
            for ch in self.store.chunks(self.index.ids()):
                bm.add(ch.id, ch.text)
            self._bm25 = bm
        return self._bm25

    def collections(self, specs: Sequence[str], route_tags: Sequence[str] = (),
                    tenant: str | None = None) -> list[CollectionRecord]:
        """Resolve names, ``tag:NAME`` and ``auto`` (collections sharing a tag with ``route_tags``) among the
        collections ``tenant`` may read (None: all); an unreadable name raises like a missing one."""
        self.sync()
        readable = [r for r in self._collections.values() if visible_to(r.owner, r.public, tenant)]
        out: dict[str, CollectionRecord] = {}
        for spec in specs:
            if spec.startswith("tag:"):
                tag = spec[4:]
                picked = [r for r in readable if tag in r.tags]
                if not picked:
                    raise DocumentError(f"no collection carries the tag {tag!r}; tags in use: "
                                        f"{sorted({t for r in readable for t in r.tags}) or 'none'}")
            elif spec == "auto":
                wanted = {t.lower() for t in route_tags}
                picked = [r for r in readable if wanted & {t.lower() for t in r.tags}]
            else:
                rec = self._collections.get(spec)
                ok = rec is not None and visible_to(rec.owner, rec.public, tenant)
                picked = [rec if ok and rec is not None else self.store.get(spec, tenant=tenant)]
            out.update((r.name, r) for r in picked)
        return list(out.values())

    # --- retrieval ----------------------------------------------------------------------------
    def candidates(self, query: str, collections: Sequence[CollectionRecord], cfg: DocsConfig,
                   qvec: np.ndarray | None = None) -> dict[str, list[tuple[str, float]]]:
        """Ranked (chunk id, score) pairs per retriever (dense, bm25) within ``collections``."""
        allowed = set().union(*(self._members.get(c.id, set()) for c in collections)) if collections else set()
        if not allowed:
            return {"dense": [], "bm25": []}
        out: dict[str, list[tuple[str, float]]] = {}
        if cfg.fusion != "bm25":
            q = qvec if qvec is not None else self.encoder.encode([query])
            out["dense"] = self.index.search(np.asarray(q).reshape(1, -1), cfg.candidates, allowed)[0]
        if cfg.fusion != "dense":
            out["bm25"] = self._lexical().top(query, cfg.candidates, allowed)
        return out

    def retrieve(self, query: str, cfg: DocsConfig, route_tags: Sequence[str] = (),
                 scorer: PairScorer | None = None, tokenizer: Any = None, scorer_key: str = "",
                 tenant: str | None = None) -> list[Passage]:
        """The top ``cfg.passages`` passages for ``query`` (reranked by ``scorer`` when ``cfg.rerank``) from
        the collections ``tenant`` may read. ``scorer_key`` names the scoring model and mixture, so reranked
        results are cached per mixture; the cache key holds the resolved collections, so two tenants share
        an entry only when they search the same collections."""
        if not cfg.collections:
            return []
        cols = self.collections(cfg.collections, route_tags, tenant)  # unknown names fail even with passages=0
        if cfg.passages == 0:
            return []
        key = (query, tuple(sorted(c.name for c in cols)), cfg.passages, cfg.candidates, cfg.fusion, cfg.rrf_k,
               cfg.dense_weight, cfg.rerank, cfg.rerank_top, scorer_key if cfg.rerank else "")
        with self._lock:
            if key in self._cache:
                self.hits += 1
                self._cache.move_to_end(key)
                return list(self._cache[key])
            self.misses += 1
        ranked = self.rank(query, cols, cfg, scorer, tokenizer)[: cfg.passages]
        with self._lock:
            self._cache[key] = ranked
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return list(ranked)

    def rank(self, query: str, collections: Sequence[CollectionRecord], cfg: DocsConfig,
             scorer: PairScorer | None = None, tokenizer: Any = None, qvec: np.ndarray | None = None) -> list[Passage]:
        """Every fused candidate as a Passage, best first (no cache)."""
        cands = self.candidates(query, collections, cfg, qvec)
        if cfg.fusion == "mix":
            fused = mix_scores(cands["dense"], cands["bm25"], cfg.dense_weight)
        else:
            fused = rrf([[cid for cid, _ in pairs] for pairs in cands.values()], cfg.rrf_k)
        ranks = {name: {cid: r for r, (cid, _) in enumerate(pairs, 1)} for name, pairs in cands.items()}
        chunks = {ch.id: ch for ch in self.store.chunks([cid for cid, _ in fused])}
        out = [Passage(ch.collection, ch.id, ch.key, ch.text, s,
                       {n: rk[cid] for n, rk in ranks.items() if cid in rk})
               for cid, s in fused if (ch := chunks.get(cid)) is not None]
        if cfg.rerank and scorer is not None and out:
            out = lm_rerank(query, out, scorer, tokenizer, cfg.rerank_top)
        return out

    def stats(self) -> dict[str, Any]:
        total = self.hits + self.misses
        return {"retrieval_cache": {"hits": self.hits, "misses": self.misses, "entries": len(self._cache),
                                    "hit_rate": round(self.hits / total, 4) if total else 0.0},
                "chunks": self.index.ntotal, "collections": len(self._collections)}


RERANK_SEPARATOR = "\n\n"


def lm_rerank(query: str, passages: list[Passage], scorer: PairScorer, tokenizer: Any, top: int) -> list[Passage]:
    """Re-order the first ``top`` passages by the LM's mean loss of ``query`` given each passage
    (lowest first; the passage's score becomes ``-loss``); the rest keep their order after them."""
    head, tail = passages[:top], passages[top:]
    q = tokenizer(" " + query.strip(), add_special_tokens=False)["input_ids"]
    prompts = [tokenizer(p.text.strip() + RERANK_SEPARATOR, add_special_tokens=False)["input_ids"] for p in head]
    losses = scorer(prompts, [q] * len(head))
    for p, loss in zip(head, losses, strict=True):
        p.ranks["fused"] = passages.index(p) + 1
        p.score = -float(loss)
    head.sort(key=lambda p: p.score, reverse=True)
    return head + tail
