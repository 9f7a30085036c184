"""Experts from unlabelled text: embed, k-means into N segments, train one adapter per segment.

Texts are embedded with the router's sentence encoder (unit vectors) and clustered with k-means
(``n_init=10``, seeded). Each segment becomes an ordinary library adapter ``{prefix}-{i}`` trained
by ``Loramix.train_adapter`` on the segment's texts, which are also its examples, so its routing key
is their mean embedding. Its description lists the segment's top terms by class-based TF-IDF (the
segment's texts joined into one document, IDF across segments), so the terms tell segments apart.

When true labels exist (a JSONL source with a ``label`` or ``domain`` field, or a comma-separated
list of corpora, each text labelled by its corpus), the adjusted Rand index of the segmentation is
reported.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from loramix.config import TrainConfig
from loramix.errors import ConfigError, TrainingError
from loramix.train.corpora import jsonl_rows

if TYPE_CHECKING:
    from loramix.app import Loramix


class TextEncoder(Protocol):
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray: ...


# --- data ---------------------------------------------------------------------------------------
def _jsonl_with_labels(path: Path) -> tuple[list[str], list[str] | None]:
    texts: list[str] = []
    labels: list[str | None] = []
    for row, text in jsonl_rows(path):
        if text.strip():
            label = row.get("label", row.get("domain"))
            texts.append(text)
            labels.append(None if label is None else str(label))
    if not texts:
        raise TrainingError(f"--data {path}: no texts found")
    return texts, ([lb for lb in labels if lb is not None] if all(lb is not None for lb in labels) else None)


def load_texts(spec: str, limit: int | None = None, seed: int = 0) -> tuple[list[str], list[str] | None]:
    """Texts and, when known, their true labels for ``--data SPEC``.

    ``SPEC``: anything :func:`loramix.train.corpora.load_source` reads (a JSONL file also gives labels
    from a ``label``/``domain`` field), or a comma-separated list of sources, labelled by source and
    sharing ``limit`` equally.
    """
    from loramix.train.corpora import load_source

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix in (".jsonl", ".ndjson"):
        texts, labels = _jsonl_with_labels(path)
        if limit is not None and len(texts) > limit:
            pick = sorted(random.Random(seed).sample(range(len(texts)), limit))
            texts = [texts[i] for i in pick]
            labels = [labels[i] for i in pick] if labels else None
        return texts, labels
    parts = [p.strip() for p in spec.split(",") if p.strip()] if not path.is_file() else [spec]
    if len(parts) <= 1:
        return load_source(spec, limit=limit), None
    per = max(1, limit // len(parts)) if limit is not None else None
    texts, labels = [], []
    for part in dict.fromkeys(parts):
        got = load_source(part, limit=per)
        texts += got
        labels += [part] * len(got)
    return texts, labels


# --- clustering ---------------------------------------------------------------------------------
def cluster_texts(texts: Sequence[str], n: int, encoder: TextEncoder, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means of the texts' unit embeddings: labels (N,) in 0..n-1 and centroids (n, d) float32."""
    from sklearn.cluster import KMeans

    if n < 1:
        raise ConfigError(f"the number of segments must be at least 1, got {n}")
    if n > len(texts):
        raise TrainingError(f"cannot cut {len(texts)} texts into {n} segments; expected at least {n} texts")
    vecs = np.asarray(encoder.encode(list(texts)), dtype=np.float32)  # (N, d)
    km = KMeans(n_clusters=n, n_init=10, random_state=seed).fit(vecs)
    return km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float32)  # (N,), (n, d)


def segment_ari(labels: Sequence[int] | np.ndarray, true_labels: Sequence[Any]) -> float:
    """Adjusted Rand index of a segmentation against true labels (1 = identical partitions)."""
    from sklearn.metrics import adjusted_rand_score

    if len(labels) != len(true_labels):
        raise ValueError(f"got {len(labels)} labels but {len(true_labels)} true labels")
    return float(adjusted_rand_score(list(true_labels), list(labels)))


def top_terms(texts: Sequence[str], labels: np.ndarray, n: int, k: int = 8) -> list[list[str]]:
    """The ``k`` top class-based TF-IDF terms of each segment 0..n-1 (empty when it has none)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    docs = [" ".join(t for t, lb in zip(texts, labels, strict=True) if lb == i) for i in range(n)]
    vec = TfidfVectorizer(stop_words="english", sublinear_tf=True, token_pattern=r"(?u)\b[^\W\d_]{3,}\b")
    try:
        m = vec.fit_transform(docs).toarray()  # (n, V)
    except ValueError:  # no terms left (e.g. only stop words)
        return [[] for _ in range(n)]
    vocab = vec.get_feature_names_out()
    return [[str(vocab[j]) for j in np.argsort(-row)[:k] if row[j] > 0] for row in m]


# --- training -----------------------------------------------------------------------------------
def train_experts(engine: Loramix, texts: Sequence[str], n: int, cfg: TrainConfig | None = None,
                  prefix: str = "cluster", seed: int = 0, true_labels: Sequence[str] | None = None,
                  source: str = "", progress: bool = True,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Cluster ``texts`` into ``n`` segments and train one expert per segment; returns a report.

    Segments too small to train on (fewer than 4 texts, or less than one sequence of tokens) are
    skipped and listed under ``skipped``. Fails before training if a name ``{prefix}-{i}`` is taken.
    """
    cfg = cfg or TrainConfig()
    say = log or (lambda _msg: None)
    texts = list(texts)
    if true_labels is not None and len(true_labels) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(true_labels)} true labels")
    names = [f"{prefix}-{i}" for i in range(n)]
    taken = [nm for nm in names if nm in engine.library]
    if taken:
        raise ConfigError(f"adapters named {', '.join(taken)} already exist; remove them or pass another prefix")
    say(f"embedding {len(texts)} texts")
    labels, _ = cluster_texts(texts, n, engine.router.encoder, seed)
    terms = top_terms(texts, labels, n)
    ari = segment_ari(labels, true_labels) if true_labels is not None else None
    if ari is not None:
        say(f"segments vs true labels: ARI {ari:.3f}")
    report: dict[str, Any] = {"n": n, "texts": len(texts), "ari": ari, "sizes": np.bincount(labels, minlength=n).tolist(),
                              "segments": [], "skipped": []}
    for i, name in enumerate(names):
        seg = [t for t, lb in zip(texts, labels, strict=True) if lb == i]
        info: dict[str, Any] = {"segment": i, "name": name, "size": len(seg), "terms": terms[i]}
        if true_labels is not None:
            info["labels"] = dict(Counter(tl for tl, lb in zip(true_labels, labels, strict=True) if lb == i).most_common())
        say(f"segment {i + 1}/{n}: {len(seg)} texts; {', '.join(terms[i][:5]) or '(no terms)'}")
        desc = f"expert for text segment {i} of {n}" + (f" from {source}" if source else "")
        desc += (": " + ", ".join(terms[i])) if terms[i] else ""
        try:
            rec, rep = engine.train_adapter(name, seg, cfg, description=desc, skill_tags=["cluster"],
                                            source=f"{source} segment {i}/{n}".strip(), progress=progress)
        except TrainingError as e:
            say(f"segment {i + 1}/{n} skipped: {e}")
            report["skipped"].append({**info, "reason": str(e)})
            continue
        info |= {"id": rec.id, "eval_loss_before": rep["eval_loss_before"], "eval_loss_after": rep["eval_loss_after"],
                 "seconds": rep["seconds"]}
        report["segments"].append(info)
    return report
