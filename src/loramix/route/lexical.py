"""A small incremental BM25 index over adapter texts (name, description, tags, examples)."""

from __future__ import annotations

import math
import re
from collections import Counter

_WORD = re.compile(r"[a-z0-9]+")
# fmt: off
STOPWORDS = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "by", "can", "do", "does", "for", "from", "how", "i",
    "in", "is", "it", "its", "me", "my", "of", "on", "or", "so", "that", "the", "this", "to", "was",
    "what", "when", "where", "which", "who", "why", "will", "with", "you", "your",
})
# fmt: on


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens without stop words."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


def normalize_word(word: str) -> str:
    """A crude singular form, so that ``plants`` matches ``plant``."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


class BM25:
    """Okapi BM25 with postings kept per term, so adding or removing one document is cheap."""

    def __init__(self, k1: float = 1.5, b: float = 0.75) -> None:
        self.k1 = k1
        self.b = b
        self._postings: dict[str, dict[str, int]] = {}  # term -> {doc id: term frequency}
        self._lengths: dict[str, int] = {}
        self._terms: dict[str, list[str]] = {}  # doc id -> its distinct terms
        self._total_len = 0

    def __len__(self) -> int:
        return len(self._lengths)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._lengths

    def add(self, doc_id: str, text: str) -> None:
        """Index (or re-index) one document."""
        if doc_id in self._lengths:
            self.remove(doc_id)
        terms = [normalize_word(w) for w in tokenize(text)]
        counts = Counter(terms)
        for term, tf in counts.items():
            self._postings.setdefault(term, {})[doc_id] = tf
        self._terms[doc_id] = list(counts)
        self._lengths[doc_id] = len(terms)
        self._total_len += len(terms)

    def remove(self, doc_id: str) -> None:
        """Forget one document (no-op when absent)."""
        length = self._lengths.pop(doc_id, None)
        if length is None:
            return
        self._total_len -= length
        for term in self._terms.pop(doc_id, []):
            docs = self._postings.get(term, {})
            docs.pop(doc_id, None)
            if not docs:
                self._postings.pop(term, None)

    def scores(self, query: str, allowed: set[str] | None = None) -> dict[str, float]:
        """BM25 score of every document sharing a term with ``query`` (restricted to ``allowed``)."""
        n = len(self._lengths)
        if n == 0:
            return {}
        avg_len = max(self._total_len / n, 1e-9)
        out: dict[str, float] = {}
        for term in set(normalize_word(w) for w in tokenize(query)):
            docs = self._postings.get(term)
            if not docs:
                continue
            idf = math.log(1.0 + (n - len(docs) + 0.5) / (len(docs) + 0.5))
            for doc_id, tf in docs.items():
                if allowed is not None and doc_id not in allowed:
                    continue
                norm = tf + self.k1 * (1.0 - self.b + self.b * self._lengths[doc_id] / avg_len)
                out[doc_id] = out.get(doc_id, 0.0) + idf * tf * (self.k1 + 1.0) / norm
        return out

    def top(self, query: str, n: int, allowed: set[str] | None = None) -> list[tuple[str, float]]:
        """The ``n`` best (doc id, score) pairs, best first."""
        ranked = sorted(self.scores(query, allowed).items(), key=lambda kv: (-kv[1], kv[0]))
        return ranked[:n]
