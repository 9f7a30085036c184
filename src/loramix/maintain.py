"""Library self-maintenance: library statistics, near-duplicate merging (dedupe) and pruning of unused adapters.

- :func:`library_stats`: counts by kind, bytes on disk, the use histogram; never loads torch.
- :func:`find_duplicates`: candidates from key similarity through the key index (each adapter's nearest
  keys scoring at least ``key_threshold``), confirmed by the cosine similarity of the adapters' weight
  deltas (at least ``threshold``, computed from the low-rank factors without forming dense deltas), grouped
  transitively. :func:`dedupe` merges each group into one adapter: nano groups by averaging their cores
  (exactly the average delta, still a nano adapter), LoRA groups with :func:`loramix.mix.merge`; the merged
  adapter takes the most used member's name, the union of tags and examples, the mean key, and records
  what it replaced in ``meta.replaces``. It is added before the members are removed, so a crash between
  leaves both, never neither.
- :func:`prune`: removes adapters used at most ``max_uses`` times and not used (or created) for
  ``unused_days``.

Every function takes ``dry_run``: then it only reports, and the library stays byte-identical.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loramix.store import Library

__all__ = ["DedupeReport", "PruneReport", "dedupe", "find_duplicates", "library_stats", "prune"]

USE_BUCKETS = ((0, 0), (1, 1), (2, 9), (10, 99), (100, 999), (1000, None))


def library_stats(lib: Library) -> dict[str, Any]:
    """Counts, bytes on disk, use histogram and pack state of a library (SQL only)."""
    kinds = {r[0]: int(r[1]) for r in lib._read("SELECT kind, COUNT(*) FROM adapters GROUP BY kind")}
    hist = {}
    for lo, hi in USE_BUCKETS:
        label = f"{lo}" if lo == hi else f"{lo}+" if hi is None else f"{lo}-{hi}"
        sql = "SELECT COUNT(*) FROM adapters WHERE use_count >= ?" + ("" if hi is None else " AND use_count <= ?")
        hist[label] = int(lib._read(sql, (lo,) if hi is None else (lo, hi))[0][0])
    keyed = int(lib._read("SELECT COUNT(*) FROM keys")[0][0])
    packed = lib._read("SELECT COUNT(*), COALESCE(SUM(length), 0) FROM pack_entries")[0]
    disk = lib.disk_bytes()
    live = int(lib._read("SELECT COALESCE(SUM(p.length), 0) FROM pack_entries p WHERE EXISTS "
                         "(SELECT 1 FROM adapters a WHERE a.blob = p.sha)")[0][0])
    return {"adapters": sum(kinds.values()), "by_kind": kinds, "keyed": keyed, "generation": lib.generation,
            "use_histogram": hist, "disk_bytes": sum(disk.values()), "disk": disk,
            "packs": {"files": len(lib.packs.pack_numbers()), "entries": int(packed[0]), "live_bytes": live,
                      "reclaimable_bytes": max(0, disk["packs"] - live)}}


# --- dedupe ----------------------------------------------------------------------------------------
def _factors(lib: Library, rec: Any) -> dict[str, tuple[Any, Any]]:
    """Per layer (A (r, n_in), scale * B (n_out, r)) as float64."""
    w = lib.load(rec.id)
    return {p: (a.double(), b.double() * w.scale) for p, (a, b) in w.layers.items()}


def delta_cosine(fa: dict[str, tuple[Any, Any]], fb: dict[str, tuple[Any, Any]]) -> float:
    """cos(delta_a, delta_b) over all layers, from the factors: <B1 A1, B2 A2> = sum((B1^T B2) * (A1 A2^T))."""
    def inner(x: dict[str, tuple[Any, Any]], y: dict[str, tuple[Any, Any]]) -> float:
        total = 0.0
        for p in x.keys() & y.keys():
            a1, b1 = x[p]
            a2, b2 = y[p]
            total += float(((b1.T @ b2) * (a1 @ a2.T)).sum())  # (r1, r2)
        return total

    na, nb = inner(fa, fa), inner(fb, fb)
    return inner(fa, fb) / max(np.sqrt(na * nb), 1e-30)


@dataclass
class DedupeReport:
    groups: list[list[dict[str, Any]]] = field(default_factory=list)  # members: id, name, uses, cosines
    merged: list[dict[str, Any]] = field(default_factory=list)  # the new adapters
    candidates: int = 0
    confirmed: int = 0
    dry_run: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "candidate_pairs": self.candidates, "confirmed_pairs": self.confirmed,
                "groups": self.groups, "merged": self.merged}


def find_duplicates(lib: Library, index: Any, threshold: float = 0.95, key_threshold: float = 0.9,
                    neighbours: int = 5) -> tuple[list[list[str]], int, int, dict[tuple[str, str], float]]:
    """Groups of near-duplicate adapter ids, the numbers of candidate and confirmed pairs, and the pairs' cosines."""
    ids = index.ids()
    pairs: set[tuple[str, str]] = set()
    for i in range(0, len(ids), 256):
        chunk = ids[i:i + 256]
        vecs = index.vectors(chunk)
        for a, hits in zip(chunk, index.search(vecs, neighbours + 1), strict=True):
            for b, s in hits:
                if b != a and s >= key_threshold:
                    pairs.add((min(a, b), max(a, b)))
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    cos: dict[tuple[str, str], float] = {}
    cache: dict[str, Any] = {}
    recs: dict[str, Any] = {}
    for a, b in sorted(pairs):
        for x in (a, b):
            if x not in cache:
                recs[x] = lib.get(x)
                cache[x] = _factors(lib, recs[x])
        if recs[a].kind != recs[b].kind:
            continue
        c = delta_cosine(cache[a], cache[b])
        cos[(a, b)] = c
        if c >= threshold:
            parent[find(a)] = find(b)
    groups: dict[str, list[str]] = defaultdict(list)
    for x in {x for pr, c in cos.items() if c >= threshold for x in pr}:
        groups[find(x)].append(x)
    out = [sorted(g) for g in groups.values() if len(g) > 1]
    return sorted(out), len(pairs), sum(c >= threshold for c in cos.values()), cos


def dedupe(lib: Library, index: Any, threshold: float = 0.95, key_threshold: float = 0.9, method: str = "svd",
           dry_run: bool = False) -> DedupeReport:
    """Find near-duplicate groups and (unless ``dry_run``) merge each into one adapter."""
    groups, n_cand, n_conf, cos = find_duplicates(lib, index, threshold, key_threshold)
    report = DedupeReport(candidates=n_cand, confirmed=n_conf, dry_run=dry_run)
    for g in groups:
        recs = sorted((lib.get(a) for a in g), key=lambda r: (-r.use_count, r.created))
        report.groups.append([{"id": r.id, "name": r.name, "uses": r.use_count, "kind": r.kind,
                               "cosine_to_first": round(cos.get((min(recs[0].id, r.id), max(recs[0].id, r.id)),
                                                                1.0), 4)} for r in recs])
        if dry_run:
            continue
        report.merged.append(_merge_group(lib, recs, method))
    return report


def _merge_group(lib: Library, recs: list[Any], method: str) -> dict[str, Any]:
    from loramix.mix import merge

    keep = recs[0]
    weights: Any
    if all(r.kind == "nano" for r in recs):
        nanos = [lib.load_nano(r.id) for r in recs]
        if len({n.basis_id for n in nanos}) == 1:
            import torch

            from loramix.nano import NanoWeights

            cores = {p: torch.stack([n.cores[p].float() for n in nanos if p in n.cores]).sum(0) / len(nanos)
                     for p in sorted({p for n in nanos for p in n.cores})}
            weights = NanoWeights(rank=nanos[0].rank, basis_id=nanos[0].basis_id, cores=cores)
            how = "nano core average (exact average delta)"
        else:
            weights, how = merge([lib.load(r.id) for r in recs], [1 / len(recs)] * len(recs), method), method
    else:
        weights, how = merge([lib.load(r.id) for r in recs], [1 / len(recs)] * len(recs), method), method
    _, keys = lib.keys([r.id for r in recs])
    key = None
    if len(keys):
        k = keys.mean(axis=0)
        key = (k / max(float(np.linalg.norm(k)), 1e-12)).astype(np.float32)
    examples = list(dict.fromkeys(e for r in recs for e in lib.examples(r.id)))[:256]
    dtags = list(dict.fromkeys(t for r in recs for t in r.domain_tags))
    stags = list(dict.fromkeys(t for r in recs for t in r.skill_tags))
    replaces = [{"id": r.id, "name": r.name, "uses": r.use_count} for r in recs]
    tmp_name = f"dedupe-{keep.id}-{int(time.time())}"
    new = lib.add_weights(weights, tmp_name, description=keep.description, domain_tags=dtags, skill_tags=stags,
                          examples=examples or None, key=key,
                          meta={**keep.meta, "replaces": replaces, "merged_by": f"dedupe ({how})"})
    for r in recs:  # the merged adapter exists before any member goes
        lib.remove(r.id)
    new = lib.update(new.id, name=keep.name)
    return {"id": new.id, "name": new.name, "kind": new.kind, "replaces": replaces, "method": how}


# --- prune -----------------------------------------------------------------------------------------
@dataclass
class PruneReport:
    removed: list[dict[str, Any]] = field(default_factory=list)
    kept: int = 0
    dry_run: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "removed": self.removed, "count": len(self.removed), "kept": self.kept}


def prune(lib: Library, unused_days: float, max_uses: int, dry_run: bool = False,
          now: float | None = None) -> PruneReport:
    """Remove adapters used at most ``max_uses`` times whose last use (or creation) is ``unused_days`` old."""
    cutoff = (time.time() if now is None else now) - unused_days * 86400.0
    rows = lib._read("SELECT id, name, use_count, created, COALESCE(last_used, created) AS seen FROM adapters "
                     "WHERE use_count <= ? AND COALESCE(last_used, created) <= ? ORDER BY rowid", (max_uses, cutoff))
    report = PruneReport(dry_run=dry_run)
    report.removed = [{"id": r["id"], "name": r["name"], "uses": r["use_count"], "last_seen": r["seen"]} for r in rows]
    report.kept = len(lib) - len(rows)
    if not dry_run:
        for r in rows:
            lib.remove(r["id"])
    return report
