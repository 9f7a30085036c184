"""Routing queries to adapters: keys, strategies, and score-to-weight mixing.

A strategy is a function ``fn(router, queries, qvecs, cfg, allowed) -> list[list[(adapter id, score)]]``
returning, per query, candidates ranked best first (at least ``cfg.k`` when it can). ``qvecs`` are the
queries' unit embeddings ``(n, d)``; ``allowed`` is the set of adapter ids passing ``cfg.tags`` and
visible to the caller's tenant (None when there is neither filter). The router then drops candidates under ``cfg.min_score``, keeps the top
``cfg.k`` and turns their scores into weights with :func:`softmax_weights`. Add strategies with
:func:`register_strategy`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loramix.config import RouteConfig
from loramix.errors import AdapterNotFound, ConfigError, RoutingError
from loramix.route.ann import AnnIndex
from loramix.route.cache import RouteCache, cache_key
from loramix.route.encoder import Encoder, get_encoder
from loramix.route.index import KeyIndex, SyncReport
from loramix.route.lexical import BM25, normalize_word, tokenize
from loramix.route.likelihood import LikelihoodFn, fetch_k, rerank, reranks

EMPTY_MESSAGE = "the library has no adapters with routing keys; add one with `loramix adapters add`"

Candidates = list[tuple[str, float]]
StrategyFn = Callable[["Router", list[str], np.ndarray, RouteConfig, "set[str] | None"], list[Candidates]]
_STRATEGIES: dict[str, StrategyFn] = {}


def register_strategy(name: str, fn: StrategyFn, replace: bool = False) -> None:
    """Make ``fn`` available as ``RouteConfig(strategy=name)``."""
    if name in _STRATEGIES and not replace:
        raise ConfigError(
            f"routing strategy {name!r} is already registered; pass replace=True to override it"
        )
    _STRATEGIES[name] = fn


def registered_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def softmax_weights(scores: Sequence[float], temperature: float) -> list[float]:
    """``softmax(score / temperature)``: weights summing to 1, sharper at lower temperature."""
    if not scores:
        return []
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(scores, dtype=np.float64) / temperature
    e = np.exp(z - z.max())
    return (e / e.sum()).tolist()


@dataclass
class RoutedAdapter:
    """One selected adapter: its score under the strategy and its mixture weight."""

    id: str
    name: str
    score: float
    weight: float


@dataclass
class Route:
    """The adapters chosen for one query (empty: use the base model)."""

    adapters: list[RoutedAdapter] = field(default_factory=list)
    latency_ms: float = 0.0
    strategy: str = "semantic"
    encode_ms: float = 0.0  # embedding the query (0 when answered from the cache)
    search_ms: float = 0.0  # the strategy's search over the keys (0 when answered from the cache)
    cached: bool = False  # answered from the routing cache
    rerank: str = "none"  # "likelihood" when the language model re-ranked the strategy's candidates
    rerank_ms: float = 0.0  # the language model's scoring of the candidates (0 when not re-ranked or cached)

    @property
    def mixture(self) -> list[tuple[str, float]]:
        """``[(adapter id, weight), ...]`` as the mixer takes it."""
        return [(a.id, a.weight) for a in self.adapters]

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapters": [
                {"name": a.name, "id": a.id, "score": a.score, "weight": a.weight} for a in self.adapters
            ],
            "latency_ms": self.latency_ms,
            "encode_ms": self.encode_ms,
            "search_ms": self.search_ms,
            "cached": self.cached,
            "strategy": self.strategy,
            "rerank": self.rerank,
            "rerank_ms": self.rerank_ms,
        }


@dataclass
class _Meta:
    """What the router caches about one adapter (from one ``lib.list()`` query)."""

    name: str
    tags: frozenset[str]  # lower-cased tags
    tag_terms: tuple[tuple[str, ...], ...]  # each tag as normalised words, for the tags strategy
    has_key: bool
    record: Any
    owner: str | None = None  # tenant name; None = the operator's shared library
    public: bool = False

    def visible_to(self, tenant: str | None) -> bool:
        return tenant is None or self.owner is None or self.public or self.owner == tenant


def _meta(rec: Any) -> _Meta:
    tags = [str(t) for t in (getattr(rec, "tags", None) or [*rec.domain_tags, *rec.skill_tags])]
    terms = tuple(t for t in (tuple(normalize_word(w) for w in tokenize(tag)) for tag in tags) if t)
    return _Meta(rec.name, frozenset(t.lower() for t in tags), terms, bool(rec.has_key), rec,
                 getattr(rec, "owner", None), bool(getattr(rec, "public", False)))


def _spread(items: list[str], n: int) -> list[str]:
    """At most ``n`` items, evenly spaced."""
    if len(items) <= n:
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


class Router:
    """Routes queries to adapters of ``lib`` and keeps its faiss key index in sync.

    ``auto_key``: adapters without a routing key get one computed at sync time (only those).
    ``check_interval``: seconds between cheap checks (``lib.ids()``) for added/removed adapters
    during routing; 0 checks on every call, None never (call :meth:`sync` yourself).
    """

    def __init__(
        self,
        lib: Any,
        encoder: Encoder | None = None,
        *,
        auto_key: bool = True,
        check_interval: float | None = 0.0,
        max_examples: int = 256,
        cache_size: int = 4096,
    ) -> None:
        self.lib = lib
        self._encoder = encoder
        self.auto_key = auto_key
        self.check_interval = check_interval
        self.max_examples = max_examples
        self._lock = threading.RLock()
        # a Library (with a generation counter) gets the scalable index; other stores the flat one
        self.index: Any = (AnnIndex(lib.meta_path("index")) if hasattr(lib, "generation")
                           else KeyIndex(lib.meta_path("index")))
        self.cache = RouteCache(cache_size)  # query + options -> routes, invalidated by any library change
        self._meta: dict[str, _Meta] = {}
        self._bm25: BM25 | None = None
        self._last_check = 0.0
        self.index_generation: int | None = None
        # the language-model seam of rerank="likelihood" (loramix.route.likelihood); the engine attaches it
        self.likelihood: LikelihoodFn | None = None
        self.last_sync: SyncReport = self.sync(verify=True)

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = get_encoder()
        return self._encoder

    # --- keeping in sync ----------------------------------------------------------------------
    def sync(self, verify: bool = False) -> SyncReport:
        """Bring the index up to date with the library (new, removed and, with ``verify``, re-keyed adapters)."""
        with self._lock:
            self._meta = {rec.id: _meta(rec) for rec in self.lib.list()}
            if self.auto_key:
                unkeyed = [a for a, m in self._meta.items() if not m.has_key]
                if unkeyed:  # others' adapters: one removed meanwhile by another process is skipped
                    self._compute_keys(unkeyed, update_index=False, missing_ok=True)
            keyed = {a for a, m in self._meta.items() if m.has_key}
            report = self.index.sync(self.lib, keyed, verify=verify)
            if self._bm25 is not None:
                for a in report.removed:
                    self._bm25.remove(a)
                for a in {*report.added, *report.updated}:
                    self._bm25.add(a, self._doc_text(a))
            self._last_check = time.monotonic()
            self.last_sync = report
            self.index_generation = getattr(self.lib, "generation", None)
            return report

    def _maybe_sync(self) -> None:
        if self.check_interval is None or time.monotonic() - self._last_check < self.check_interval:
            return
        with self._lock:
            gen = getattr(self.lib, "generation", None)
            if gen is not None and gen == self.index_generation:
                self._last_check = time.monotonic()
                return  # nothing changed in the library since the last sync (any process)
            self.index_generation = gen
            if set(self.lib.ids()) != set(self._meta):
                self.sync()
            self._last_check = time.monotonic()

    # --- keys ---------------------------------------------------------------------------------
    def compute_key(self, name_or_id: str) -> np.ndarray:
        """Embed an adapter's examples (mean, renormalised; else description, else name + tags), store and index it."""
        rec = self.lib.get(name_or_id)
        return self.compute_keys([rec.id])[rec.id]

    def compute_keys(self, ids: list[str] | None = None) -> dict[str, np.ndarray]:
        """:meth:`compute_key` for many adapters (all when None) with one encoder call."""
        with self._lock:
            ids = [self.lib.get(a).id for a in ids] if ids is not None else self.lib.ids()
            keys = self._compute_keys(ids, update_index=True)
            return keys

    def _key_texts(self, adapter_id: str) -> list[str]:
        rec = self.lib.get(adapter_id)
        examples = [e for e in self.lib.examples(adapter_id) if e and e.strip()]
        if examples:
            return _spread(examples, self.max_examples)
        if rec.description and rec.description.strip():
            return [rec.description]
        tags = getattr(rec, "tags", None) or [*rec.domain_tags, *rec.skill_tags]
        return [" ".join([rec.name.replace("_", " ").replace("-", " "), *tags])]

    def _compute_keys(self, ids: list[str], update_index: bool, missing_ok: bool = False) -> dict[str, np.ndarray]:
        texts, owner = [], []
        for a in ids:
            try:
                t = self._key_texts(a)
            except AdapterNotFound:
                if not missing_ok:
                    raise
                self._meta.pop(a, None)
                continue
            texts += t
            owner += [a] * len(t)
        ids = list(dict.fromkeys(owner))
        if not ids:
            return {}
        vecs = self.encoder.encode(texts)
        wanted = set(ids)
        keyed_elsewhere = [a for a in self.index.ids() if a not in wanted]
        if self.index.dim not in (None, vecs.shape[1]) and keyed_elsewhere:
            raise RoutingError(
                f"the encoder {self.encoder.name} gives {vecs.shape[1]}-dim keys but the library's keys have "
                f"dim {self.index.dim}; recompute all of them with Router.compute_keys()"
            )
        owner_arr = np.array(owner)
        out: dict[str, np.ndarray] = {}
        for a in ids:
            key = vecs[owner_arr == a].mean(axis=0)
            out[a] = (key / max(float(np.linalg.norm(key)), 1e-12)).astype(np.float32)
        kept = self._store_keys(out, missing_ok)
        for a in set(ids) - set(kept):
            out.pop(a)
            self._meta.pop(a, None)
        ids = kept
        for a in ids:
            if a in self._meta:
                self._meta[a].has_key = True
        if update_index:
            stored_ids, stored = self.lib.keys(ids)  # index what the store kept
            self.index.upsert(list(stored_ids), np.asarray(stored, dtype=np.float32))
            self.index.save()
            self._meta.update({r.id: _meta(r) for r in (self.lib.get(a) for a in ids)})
            if self._bm25 is not None:
                for a in ids:
                    self._bm25.add(a, self._doc_text(a))
        return out

    def _store_keys(self, keys: dict[str, np.ndarray], missing_ok: bool = False) -> list[str]:
        """Store keys (one transaction when the library can); returns the ids stored."""
        set_keys = getattr(self.lib, "set_keys", None)
        if set_keys is not None:
            if missing_ok:
                return list(set_keys(list(keys), np.stack(list(keys.values())), missing_ok=True))
            set_keys(list(keys), np.stack(list(keys.values())))
        else:
            for a, key in keys.items():
                self.lib.set_key(a, key)
        return list(keys)

    # --- helpers for strategies ---------------------------------------------------------------
    def name_of(self, adapter_id: str) -> str:
        meta = self._meta.get(adapter_id)
        return meta.name if meta else adapter_id

    def record(self, adapter_id: str) -> Any:
        """The cached AdapterRecord of an adapter."""
        return self._meta[adapter_id].record

    def keyed_ids(self) -> list[str]:
        return self.index.ids()

    def allowed_ids(self, tags: Sequence[str]) -> set[str] | None:
        """Keyed adapters carrying all ``tags`` (None when no tags are given)."""
        if not tags:
            return None
        want = {t.lower() for t in tags}
        return {a for a in self.index.ids() if a in self._meta and want <= self._meta[a].tags}

    def visible_ids(self, tenant: str | None) -> set[str] | None:
        """Keyed adapters ``tenant`` may route to (None: no filter, for tenant None or when all are visible)."""
        if tenant is None:
            return None
        keyed = self.index.ids()
        # an id the router has no record of yet (added since the last sync) counts as invisible
        visible = {a for a in keyed if a in self._meta and self._meta[a].visible_to(tenant)}
        return None if len(visible) == len(keyed) else visible

    def dense_search(self, qvecs: np.ndarray, n: int, allowed: set[str] | None) -> list[Candidates]:
        return self.index.search(qvecs, n, allowed)

    def dense_scores(self, qvec: np.ndarray, ids: list[str]) -> np.ndarray:
        """Cosine of one query with these adapters' keys."""
        return self.index.vectors(ids) @ np.asarray(qvec, dtype=np.float32)

    def _doc_text(self, adapter_id: str) -> str:
        rec = self.lib.get(adapter_id)
        tags = getattr(rec, "tags", None) or [*rec.domain_tags, *rec.skill_tags]
        examples = _spread(self.lib.examples(adapter_id), self.max_examples)
        return " ".join([rec.name, rec.description or "", *tags, *examples])

    def lexical(self) -> BM25:
        """The BM25 index over adapter texts, built on first use and then updated incrementally."""
        with self._lock:
            if self._bm25 is None:
                bm25 = BM25()
                for a in self.index.ids():
                    bm25.add(a, self._doc_text(a))
                self._bm25 = bm25
            return self._bm25

    def tag_matches(self, adapter_id: str, words: set[str]) -> float:
        """Fraction of the adapter's tags whose words all occur in ``words`` (normalised)."""
        terms = self._meta[adapter_id].tag_terms if adapter_id in self._meta else ()
        if not terms:
            return 0.0
        return sum(all(w in words for w in t) for t in terms) / len(terms)

    # --- routing ------------------------------------------------------------------------------
    def route(self, query: str, cfg: RouteConfig | None = None, tenant: str | None = None) -> Route:
        """Pick adapters and mixture weights for one query, among those ``tenant`` may see (None: all)."""
        return self.route_batch([query], cfg, tenant)[0]

    def route_batch(self, queries: Sequence[str], cfg: RouteConfig | None = None,
                    tenant: str | None = None) -> list[Route]:
        """:meth:`route` for many queries with one encoder call; ``latency_ms`` is the batch time per query.

        With ``tenant``, candidates are limited to the shared, public and the tenant's own adapters before
        the strategy ranks them (as the tag filter does), and an invisible one is never returned.
        """
        if isinstance(queries, str):
            raise TypeError("route_batch takes a list of queries; use route() for one")
        cfg = cfg or RouteConfig()
        fn = _STRATEGIES.get(cfg.strategy)
        if fn is None:
            raise ConfigError(
                f"routing strategy {cfg.strategy!r} is not available; registered: {', '.join(registered_strategies())}"
            )
        if not queries:
            return []
        t0 = time.perf_counter()
        self._maybe_sync()
        gen = getattr(self.lib, "generation", None)
        keys = [cache_key(q, cfg, tenant) for q in queries]
        hits = self.cache.get_many(keys, (gen, self.index.generation)) if gen is not None else [None] * len(keys)
        todo = [i for i, h in enumerate(hits) if h is None]
        if not todo:
            ms = (time.perf_counter() - t0) * 1000.0 / len(queries)
            return [Route(list(h.adapters), ms, h.strategy, cached=True, rerank=h.rerank) for h in hits if h is not None]
        if self.index.ntotal == 0:
            raise RoutingError(EMPTY_MESSAGE)
        likelihood = self.likelihood
        lm_rerank = reranks(cfg, likelihood)
        scfg = dataclasses.replace(cfg, k=fetch_k(cfg)) if lm_rerank else cfg  # the strategy's config
        t_enc = time.perf_counter()
        qvecs = self.encoder.encode([queries[i] for i in todo])
        encode_ms = (time.perf_counter() - t_enc) * 1000.0 / len(todo)
        with self._lock:
            t_search = time.perf_counter()
            if self.index.ntotal == 0:
                raise RoutingError(EMPTY_MESSAGE)
            visible = self.visible_ids(tenant)
            if visible is not None and not visible:
                raise RoutingError(EMPTY_MESSAGE)  # as for an empty library: nothing to say about the others
            allowed = self.allowed_ids(cfg.tags)
            if visible is not None:
                allowed = visible if allowed is None else allowed & visible
            if allowed is not None and not allowed and cfg.tags:
                raise RoutingError(
                    f"no adapter with a routing key carries all of the tags {sorted(cfg.tags)}"
                )
            if qvecs.shape[1] != self.index.dim:
                raise RoutingError(
                    f"the encoder {self.encoder.name} gives {qvecs.shape[1]}-dim vectors but the routing keys have "
                    f"dim {self.index.dim}; recompute them with Router.compute_keys()"
                )
            ranked = fn(self, [queries[i] for i in todo], qvecs, scfg, allowed)
            if allowed is not None:  # whatever a strategy does, nothing outside the filters comes back
                ranked = [[(a, s) for a, s in cands if a in allowed] for cands in ranked]
            names = {a: self.name_of(a) for cands in ranked for a, _ in cands[: scfg.k]}
            search_ms = (time.perf_counter() - t_search) * 1000.0 / len(todo)
        rerank_ms = 0.0
        if lm_rerank:  # outside the router's lock: the language model's pass is the slow part
            assert likelihood is not None
            t_lm = time.perf_counter()
            ranked = rerank(likelihood, [queries[i] for i in todo], ranked, cfg)
            rerank_ms = (time.perf_counter() - t_lm) * 1000.0 / len(todo)
        per_query_ms = (time.perf_counter() - t0) * 1000.0 / len(queries)
        routes: list[Route | None] = [None if h is None else Route(list(h.adapters), per_query_ms, h.strategy, cached=True)
                                      for h in hits]
        for i, cands in zip(todo, ranked, strict=True):
            if cfg.min_score is not None:
                cands = [(a, s) for a, s in cands if s >= cfg.min_score]
            cands = cands[: cfg.k]
            weights = softmax_weights([s for _, s in cands], cfg.temperature)
            adapters = [
                RoutedAdapter(a, names.get(a, a), float(s), float(w))
                for (a, s), w in zip(cands, weights, strict=True)
            ]
            routes[i] = Route(adapters, per_query_ms, cfg.strategy, encode_ms=encode_ms, search_ms=search_ms,
                              rerank="likelihood" if lm_rerank else "none", rerank_ms=rerank_ms)
            if gen is not None:
                self.cache.put(keys[i], (gen, self.index.generation), routes[i])
        return [r for r in routes if r is not None]
