"""Routing measurements: top-k accuracy, confusion matrices, a TF-IDF baseline and cluster mapping.

Everything here is model-free (numpy / scikit-learn), so it is cheap to test. A *ranking* is, per
query, a list of labels (adapter names) best first; the gold label is the adapter that should win.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

Ranking = Sequence[Sequence[str]]


def truncate_query(text: str, max_chars: int = 200) -> str:
    """The start of ``text`` as a query: at most ``max_chars`` characters, cut at a word boundary.

    Whitespace is collapsed first. A single word longer than ``max_chars`` is cut hard.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > 0 else text[:max_chars]).rstrip()


def topk_accuracy(ranked: Ranking, gold: Sequence[str], k: int) -> float:
    """Fraction of queries whose gold label is among the first ``k`` of their ranking (0..1)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(ranked) != len(gold):
        raise ValueError(f"got {len(ranked)} rankings but {len(gold)} gold labels; expected one per query")
    if not gold:
        raise ValueError("no queries: top-k accuracy of an empty set is undefined")
    hits = sum(g in list(r)[:k] for r, g in zip(ranked, gold, strict=True))
    return hits / len(gold)


def routing_accuracy(ranked: Ranking, gold: Sequence[str], ks: Sequence[int] = (1, 3)) -> dict[str, Any]:
    """``{"top1": x, "top3": y, ..., "n": queries}`` as fractions."""
    out: dict[str, Any] = {f"top{k}": topk_accuracy(ranked, gold, k) for k in ks}
    out["n"] = len(gold)
    return out


def per_label_accuracy(ranked: Ranking, gold: Sequence[str], k: int = 1) -> dict[str, float]:
    """Top-k accuracy of the queries of each gold label."""
    groups: dict[str, list[int]] = {}
    for i, g in enumerate(gold):
        groups.setdefault(g, []).append(i)
    return {g: topk_accuracy([ranked[i] for i in ix], [gold[i] for i in ix], k) for g, ix in groups.items()}


def confusion_matrix(predicted: Sequence[str | None], gold: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Counts ``(len(labels), len(labels) + 1)``: row = gold label, column = predicted label.

    The last column counts predictions that are not among ``labels`` (e.g. ``None``: nothing routed).
    Gold labels must all be in ``labels``.
    """
    if len(predicted) != len(gold):
        raise ValueError(f"got {len(predicted)} predictions but {len(gold)} gold labels")
    pos = {lb: i for i, lb in enumerate(labels)}
    m = np.zeros((len(labels), len(labels) + 1), dtype=np.int64)
    for p, g in zip(predicted, gold, strict=True):
        if g not in pos:
            raise ValueError(f"gold label {g!r} is not one of the labels {list(labels)}")
        m[pos[g], pos.get(p, len(labels)) if p is not None else len(labels)] += 1
    return m


def rank_by_scores(scores: np.ndarray, labels: Sequence[str], k: int | None = None) -> list[list[str]]:
    """Per row of ``scores`` (n, C), the labels by descending score (ties: label order), top ``k``."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] != len(labels):
        raise ValueError(f"scores must be (n, {len(labels)}), got {scores.shape}")
    order = np.argsort(-scores, axis=1, kind="stable")  # (n, C)
    if k is not None:
        order = order[:, :k]
    return [[labels[j] for j in row] for row in order.tolist()]


class TfidfCentroidRouter:
    """TF-IDF nearest-centroid classifier: the lexical baseline a dense router must beat.

    ``fit(texts, labels)`` builds sublinear word TF-IDF vectors (vocabulary from the training texts),
    one L2-normalised mean vector per label; ``scores(queries)`` gives cosines ``(n, C)`` and
    ``rank(queries)`` the labels best first.
    """

    def __init__(self, **vectorizer: Any) -> None:
        opts: dict[str, Any] = {"sublinear_tf": True, "stop_words": "english", "min_df": 1,
                                "token_pattern": r"(?u)\b\w\w+\b"}
        opts.update(vectorizer)
        self._opts = opts
        self.labels: list[str] = []
        self._vec: Any = None
        self._centroids: np.ndarray | None = None  # (C, V)

    def fit(self, texts: Sequence[str], labels: Sequence[str]) -> TfidfCentroidRouter:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.preprocessing import normalize

        if len(texts) != len(labels):
            raise ValueError(f"got {len(texts)} texts but {len(labels)} labels")
        if not texts:
            raise ValueError("no training texts")
        self.labels = list(dict.fromkeys(labels))
        self._vec = TfidfVectorizer(**self._opts)
        x = self._vec.fit_transform(list(texts))  # (N, V) sparse, rows L2-normalised
        y = np.array([self.labels.index(lb) for lb in labels])
        cents = np.vstack([np.asarray(x[y == c].mean(axis=0)) for c in range(len(self.labels))])  # (C, V)
        self._centroids = normalize(cents)
        return self

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        if self._vec is None or self._centroids is None:
            raise RuntimeError("call fit() before scores()")
        q = self._vec.transform(list(queries))  # (n, V) sparse
        return np.asarray(q @ self._centroids.T)  # (n, C)

    def rank(self, queries: Sequence[str], k: int | None = None) -> list[list[str]]:
        return rank_by_scores(self.scores(queries), self.labels, k)


def centroid_keys(vecs: np.ndarray, groups: Sequence[Hashable]) -> tuple[list[Hashable], np.ndarray]:
    """Per group, the L2-normalised mean of its (unit) vectors, as the router computes adapter keys."""
    vecs = np.asarray(vecs, dtype=np.float32)
    names = list(dict.fromkeys(groups))
    g = np.array([names.index(x) for x in groups])
    keys = np.stack([vecs[g == i].mean(axis=0) for i in range(len(names))])  # (G, d)
    keys /= np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
    return names, keys


def majority_labels(clusters: Sequence[Hashable], true_labels: Sequence[str]) -> dict[Hashable, str]:
    """Each cluster's most frequent true label (ties: the label seen first in the cluster)."""
    if len(clusters) != len(true_labels):
        raise ValueError(f"got {len(clusters)} cluster ids but {len(true_labels)} true labels")
    members: dict[Hashable, list[str]] = {}
    for c, t in zip(clusters, true_labels, strict=True):
        members.setdefault(c, []).append(t)
    return {c: Counter(ts).most_common(1)[0][0] for c, ts in members.items()}


def map_ranking(ranked: Ranking, mapping: Mapping[Any, str]) -> list[list[str]]:
    """Rankings of clusters as rankings of labels: mapped through ``mapping``, repeats dropped."""
    return [list(dict.fromkeys(mapping[c] for c in row if c in mapping)) for row in ranked]


def slug(text: str) -> str:
    """A file-name-safe form of a label."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"
