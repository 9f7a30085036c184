"""The built-in routing strategies: semantic, tags and hybrid (registered on import of loramix.route)."""

from __future__ import annotations

import numpy as np

from loramix.config import RouteConfig
from loramix.route.lexical import normalize_word, tokenize
from loramix.route.router import Candidates, Router, register_strategy


def semantic(
    router: Router, queries: list[str], qvecs: np.ndarray, cfg: RouteConfig, allowed: set[str] | None
) -> list[Candidates]:
    """Dense cosine top-k."""
    return router.dense_search(qvecs, cfg.k, allowed)


def tags(
    router: Router, queries: list[str], qvecs: np.ndarray, cfg: RouteConfig, allowed: set[str] | None
) -> list[Candidates]:
    """Adapters whose tags occur among the query's words or ``cfg.tags``; score = fraction of tags matched."""
    pool = sorted(allowed) if allowed is not None else router.keyed_ids()
    extra = {normalize_word(w) for t in cfg.tags for w in tokenize(t)}
    out: list[Candidates] = []
    for query, qvec in zip(queries, qvecs, strict=True):
        words = {normalize_word(w) for w in tokenize(query)} | extra
        scored = [(a, router.tag_matches(a, words)) for a in pool]
        scored = [(a, s) for a, s in scored if s > 0]
        dense = router.dense_scores(qvec, [a for a, _ in scored]) if scored else np.zeros(0)
        order = sorted(range(len(scored)), key=lambda i: (-scored[i][1], -float(dense[i]), scored[i][0]))
        out.append([scored[i] for i in order])
    return out


def hybrid(
    router: Router, queries: list[str], qvecs: np.ndarray, cfg: RouteConfig, allowed: set[str] | None
) -> list[Candidates]:
    """``alpha * cosine + (1 - alpha) * BM25 / max BM25`` over the union of dense and lexical top-N."""
    n = max(4 * cfg.k, 20)
    bm25 = router.lexical()
    dense_top = router.dense_search(qvecs, n, allowed)
    out: list[Candidates] = []
    for query, qvec, dense_cands in zip(queries, qvecs, dense_top, strict=True):
        lex = bm25.scores(query, allowed)
        lex_top = sorted(lex.items(), key=lambda kv: -kv[1])[:n]
        pool = list(dict.fromkeys([a for a, _ in dense_cands] + [a for a, _ in lex_top if a in router.index]))
        if not pool:
            out.append([])
            continue
        dense = router.dense_scores(qvec, pool)
        lex_vals = np.array([lex.get(a, 0.0) for a in pool])
        top = float(lex_vals.max())
        lex_norm = lex_vals / top if top > 0 else lex_vals
        score = cfg.hybrid_alpha * dense + (1.0 - cfg.hybrid_alpha) * lex_norm
        out.append(sorted(zip(pool, score.astype(float).tolist(), strict=True), key=lambda kv: -kv[1]))
    return out


register_strategy("semantic", semantic)
register_strategy("tags", tags)
register_strategy("hybrid", hybrid)
