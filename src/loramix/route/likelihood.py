"""Re-rank a strategy's candidates by how well each adapter predicts the query itself.

Each adapter is a language model of its domain, so the query's own likelihood under it is a label-free
domain signal (Branch-Train-Merge routes its experts the same way: Bayes' rule with the experts'
likelihood of the context). The strategy's score is the prior; for candidate ``j`` of a query ``x``

    log posterior_j = rerank_prior * score_j - NLL(x | adapter j)        (NLL summed over the query's tokens)

The first ``max(k, rerank_k)`` candidates are scored (one batched pass of the mixer, a row per
candidate) and re-ordered by it; candidates past them keep their order behind. The score handed back
stays in the strategy's units, ``score_j - (NLL_j - min NLL) / rerank_prior``, so the router's
``softmax(score / temperature)`` weights and ``min_score`` keep their meaning (the best-predicting
candidate keeps its own score; the others lose one unit per ``rerank_prior`` nats).

The language model is a seam: ``Router.likelihood`` is a callable ``(queries, candidate ids per query) ->
summed NLL per candidate`` that the engine (:class:`loramix.app.Loramix`) attaches; a bare router has none,
and ``rerank="auto"`` then leaves the strategy's order as it is. ``auto`` also re-ranks only strategies whose
scores are cosines (:data:`AUTO_STRATEGIES`), the units ``rerank_prior`` was picked in; ``likelihood`` re-ranks
any strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from loramix.config import RouteConfig
from loramix.errors import RoutingError

Candidates = list[tuple[str, float]]
# (queries, candidate adapter ids per query) -> per query, the summed NLL of the query under each candidate alone
LikelihoodFn = Callable[[Sequence[str], Sequence[Sequence[str]]], list[np.ndarray]]

AUTO_STRATEGIES = frozenset({"semantic", "trained"})  # cosine scores: rerank="auto" applies
NO_LM = ("rerank='likelihood' scores the query with the language model, but this router has none attached; "
         "route through a Loramix engine, or pass rerank='none'")


def reranks(cfg: RouteConfig, likelihood: LikelihoodFn | None) -> bool:
    """Whether ``cfg`` re-ranks on a router whose language-model seam is ``likelihood``."""
    if cfg.rerank == "likelihood" and likelihood is None:
        raise RoutingError(NO_LM)
    return cfg.rerank == "likelihood" or (cfg.rerank == "auto" and likelihood is not None
                                          and cfg.strategy in AUTO_STRATEGIES)


def fetch_k(cfg: RouteConfig) -> int:
    """How many candidates the strategy is asked for when re-ranking."""
    return max(cfg.k, cfg.rerank_k)


def rerank(likelihood: LikelihoodFn, queries: Sequence[str], ranked: Sequence[Candidates],
           cfg: RouteConfig) -> list[Candidates]:
    """``ranked`` re-ordered per query by the log posterior (see the module docstring)."""
    n = fetch_k(cfg)
    heads = [list(c[:n]) for c in ranked]
    todo = [i for i, h in enumerate(heads) if len(h) > 1]  # a lone candidate needs no language model
    nlls = likelihood([queries[i] for i in todo], [[a for a, _ in heads[i]] for i in todo]) if todo else []
    out = [list(c) for c in ranked]
    for i, nll in zip(todo, nlls, strict=True):
        head = heads[i]
        nll = np.asarray(nll, dtype=np.float64)  # (K,)
        if nll.shape != (len(head),) or not np.all(np.isfinite(nll)):
            raise RoutingError(f"the language model gave {nll.shape} scores for {len(head)} candidates "
                               "(or a non-finite one); expected one finite NLL per candidate")
        score = np.array([s for _, s in head], dtype=np.float64) - (nll - nll.min()) / cfg.rerank_prior  # (K,)
        order = np.argsort(-score, kind="stable")
        out[i] = [(head[j][0], float(score[j])) for j in order] + list(ranked[i][n:])
    return out
