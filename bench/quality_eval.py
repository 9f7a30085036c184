"""Helpers of bench/quality.py: the val/test split, a cached loss scorer, router results, Arrow diagnostics."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NamedMixture = list[tuple[str, float]]  # [(domain / adapter name, weight)]


def split_val_test(docs: Sequence[Any], n_val: int, seed: int, domain: str) -> tuple[list[Any], list[Any]]:
    """Cut a domain's held-out docs into validation and test by key (a headword stays on one side)."""
    groups: dict[str, list[Any]] = defaultdict(list)
    for d in docs:
        groups[d.key.lower()].append(d)
    keys = sorted(groups)
    random.Random(f"val:{seed}:{domain}").shuffle(keys)
    val: list[Any] = []
    test: list[Any] = []
    for k in keys:
        (val if len(val) < n_val else test).extend(groups[k])
    return val, test


def query_target(text: str, query_chars: int, target_words: int) -> tuple[str, str] | None:
    """A (query, continuation) pair like the benchmark's queries: the first ``query_chars`` characters
    at a word boundary, or the first half of the words when the text is not longer than that (most
    dictionary senses are short), then the next ``target_words`` words; None for texts of < 2 words."""
    from loramix.evaluate.routing import truncate_query

    flat = " ".join(text.split())
    words = re.findall(r"\S+", flat)
    if len(words) < 2:
        return None
    q = truncate_query(flat, query_chars)
    if len(q) >= len(flat):
        q = " ".join(words[: max(1, len(words) // 2)])
    rest = re.findall(r"\S+", flat[len(q):])[:target_words]
    return q, " " + " ".join(rest)


class Scorer:
    """Mean token NLL of full texts under named mixtures, cached as JSON in ``path`` (resumable).

    A row's key hashes the text and the mixture as (adapter fingerprint, weight) pairs, so a retrained
    adapter is never served a stale loss. ``score(texts, mixtures)`` scores only the missing rows.
    """

    def __init__(self, path: Path, mixer: Callable[[], Any], id_of: dict[str, str], fp_of: dict[str, str]) -> None:
        self.path = path
        self.mixer = mixer
        self.id_of = id_of
        self.fp_of = fp_of
        self.data: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
        self.scored = 0

    def key(self, text: str, mix: NamedMixture) -> str:
        body = json.dumps([text, sorted([self.fp_of.get(n, n), round(float(w), 6)] for n, w in mix if w)])
        return hashlib.blake2b(body.encode(), digest_size=16).hexdigest()

    def score(self, texts: Sequence[str], mixtures: Sequence[NamedMixture], chunk: int = 48,
              progress: Callable[[int], None] | None = None) -> list[float]:
        from loramix.evaluate.score import score_texts

        keys = [self.key(t, m) for t, m in zip(texts, mixtures, strict=True)]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self.data}.values(), key=lambda i: len(texts[i]))
        for s in range(0, len(todo), chunk):
            part = todo[s:s + chunk]
            res = score_texts(self.mixer(), [texts[i] for i in part],
                              [[(self.id_of[n], w) for n, w in mixtures[i] if w] for i in part])
            for i, r in zip(part, res, strict=True):
                self.data[keys[i]] = r.loss
            self.scored += len(part)
            self.save()
            if progress:
                progress(len(part))
        return [self.data[k] for k in keys]

    def save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)


@dataclass
class RouterRun:
    """One router's rankings (adapter names, best first) and top-3 mixtures on each query set."""

    ranked: dict[str, list[list[str]]] = field(default_factory=dict)  # split -> per query
    mix3: dict[str, list[NamedMixture]] = field(default_factory=dict)
    seconds: float = 0.0


def macro(losses: Sequence[float], domains_of: Sequence[str], domains: Sequence[str]) -> dict[str, float | None]:
    from loramix.evaluate.report import loss_table

    per: dict[str, list[float]] = defaultdict(list)
    for d, x in zip(domains_of, losses, strict=True):
        per[d].append(x)
    return loss_table(per, domains)


def top1_mix(ranked: Sequence[Sequence[str]]) -> list[NamedMixture]:
    return [[(r[0], 1.0)] if r else [] for r in ranked]


# --- Arrow diagnostics ------------------------------------------------------------------------------
def arrow_diagnostics(weights: dict[str, Any]) -> dict[str, Any]:
    """Why Arrow can or cannot separate these experts, from their weights alone.

    ``top_share``: per adapter and layer, the share of the update's energy (squared Frobenius norm) on
    its top singular direction (1/r for a flat spectrum, 1.0 for a rank-1 update), averaged. ``cross_cos``:
    per layer, the mean |cos| between the prototypes (top right singular vectors) of two different
    experts, averaged over layers; ``self_floor`` is the same for random unit vectors of that size.
    Arrow needs prototypes that differ across experts (low cross_cos) and updates with a dominant
    direction (high top_share).
    """
    import torch

    protos: dict[str, dict[str, torch.Tensor]] = {}
    shares: list[float] = []
    dim = 0
    for name, w in weights.items():
        protos[name] = {}
        for layer, (a, b) in w.layers.items():
            qb, rb = torch.linalg.qr(b.double())
            qa, ra = torch.linalg.qr(a.double().T)
            _, s, vh = torch.linalg.svd(rb @ ra.T)
            shares.append(float(s[0] ** 2 / (s**2).sum().clamp_min(1e-30)))
            v = qa @ vh[0]
            protos[name][layer] = (v / v.norm().clamp_min(1e-12)).float()
            dim = int(v.numel())
    names = list(protos)
    cos: list[float] = []
    pair = np.zeros((len(names), len(names)))  # mean |cos| of two experts' prototypes over shared layers
    shared = 0
    for layer in protos[names[0]] if names else []:
        if not all(layer in protos[n] for n in names):
            continue
        vs = torch.stack([protos[n][layer] for n in names])  # (E, n_in)
        c = (vs @ vs.T).abs()  # (E, E)
        e = len(vs)
        pair += c.double().numpy()
        shared += 1
        if e > 1:
            cos.append(float((c.sum() - c.diagonal().sum()) / (e * (e - 1))))
    rank = next(iter(weights.values())).rank if weights else 0
    return {"top_share": float(np.mean(shares)) if shares else None, "flat_share": 1.0 / rank if rank else None,
            "cross_cos": float(np.mean(cos)) if cos else None,
            "random_cos": float(np.sqrt(2.0 / (np.pi * dim))) if dim else None, "layers": len(cos),
            "names": names, "pair_cos": (pair / max(shared, 1)).round(4).tolist()}


def plot_arrow(diag: dict[str, Any], path: Path) -> Path:
    """Heat map of the mean |cos| between two experts' Arrow prototypes (what Arrow tells experts apart by)."""
    from loramix.evaluate.report import _plt

    plt = _plt()
    m, names = np.asarray(diag["pair_cos"]), diag["names"]
    size = 2.0 + 0.45 * max(len(names), 4)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(m, cmap="Reds", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6, color="white" if m[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.04, label="mean |cos| of top singular directions over layers")
    ax.set_title(f"Arrow prototypes (random vectors: {diag['random_cos']:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
