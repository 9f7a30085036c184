"""A persisted faiss inner-product index over adapter routing keys.

The library's keys (``lib.keys()``) are the source of truth; this index is a cache of them kept in
``lib.meta_path("index")``: ``keys.faiss`` (an ``IndexIDMap2(IndexFlatIP(d))``) and ``keys.json``
(adapter id -> [faiss id, key checksum]). :meth:`KeyIndex.sync` brings it up to date by adding new
keys, dropping removed ones and re-adding changed ones; nothing is re-embedded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

INDEX_FILE = "keys.faiss"
MAP_FILE = "keys.json"
FORMAT = 1


def key_checksum(vec: np.ndarray) -> str:
    """A short fingerprint of a key's float32 bytes."""
    data = np.ascontiguousarray(vec, dtype=np.float32).tobytes()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


@dataclass
class SyncReport:
    """What one sync changed."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed)


# Below this many multiply-adds a search runs on one thread: OpenMP start-up costs ~10 ms on a busy
# CPU, while one thread scans 50k keys of dim 384 in about a millisecond.
SINGLE_THREAD_WORK = 20_000_000


def _search(index: Any, queries: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
    work = len(queries) * index.ntotal * index.d
    if work > SINGLE_THREAD_WORK:
        return index.search(queries, k, params=params)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(queries, k, params=params)
    finally:
        faiss.omp_set_num_threads(threads)


class KeyIndex:
    """Adapter keys in a faiss ``IndexIDMap2(IndexFlatIP)``, with adapter-id <-> faiss-id maps."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.dim: int | None = None
        self._index: Any = None
        self._fid: dict[str, int] = {}  # adapter id -> faiss id
        self._aid: dict[int, str] = {}  # faiss id -> adapter id
        self._sums: dict[str, str] = {}  # adapter id -> key checksum
        self._next_fid = 0
        self.generation = 0  # bumped on every change
        if self.folder is not None:
            self._load()

    # --- state --------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def ids(self) -> list[str]:
        return list(self._fid)

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._fid

    def __len__(self) -> int:
        return len(self._fid)

    def _reset(self, dim: int | None) -> None:
        self.dim = dim
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim)) if dim else None
        self._fid, self._aid, self._sums = {}, {}, {}
        self.generation += 1

    def _load(self) -> None:
        assert self.folder is not None
        ipath, mpath = self.folder / INDEX_FILE, self.folder / MAP_FILE
        if not (ipath.is_file() and mpath.is_file()):
            return
        try:
            meta = json.loads(mpath.read_text())
            index: Any = faiss.read_index(str(ipath))
            entries = {str(k): (int(v[0]), str(v[1])) for k, v in meta["adapters"].items()}
            stored = set(faiss.vector_to_array(index.id_map).tolist()) if index.ntotal else set()
            if (
                meta.get("format") != FORMAT
                or index.d != meta["dim"]
                or stored != {f for f, _ in entries.values()}
            ):
                return  # inconsistent cache: start empty, sync re-adds from the library's keys
        except Exception:
            return
        self.dim = int(meta["dim"])
        self._index = index
        self._fid = {a: f for a, (f, _) in entries.items()}
        self._aid = {f: a for a, f in self._fid.items()}
        self._sums = {a: s for a, (_, s) in entries.items()}
        self._next_fid = max([int(meta.get("next_fid", 0)), *[f + 1 for f in self._aid]])

    def save(self) -> None:
        """Write the index and its id map atomically (no-op for an in-memory index)."""
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "dim": self.dim,
            "next_fid": self._next_fid,
            "adapters": {a: [f, self._sums[a]] for a, f in self._fid.items()},
        }
        ipath, mpath = self.folder / INDEX_FILE, self.folder / MAP_FILE
        if self._index is None:
            ipath.unlink(missing_ok=True)
            mpath.unlink(missing_ok=True)
            return
        tmp = ipath.with_name(f".{INDEX_FILE}.{os.getpid()}.tmp")
        faiss.write_index(self._index, str(tmp))
        os.replace(tmp, ipath)
        tmp = mpath.with_name(f".{MAP_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, mpath)

    # --- changes ------------------------------------------------------------------------------
    def remove(self, adapter_ids: list[str]) -> list[str]:
        """Drop these adapters' keys; returns the ids that were present."""
        present = [a for a in adapter_ids if a in self._fid]
        if not present:
            return []
        fids = np.array([self._fid[a] for a in present], dtype=np.int64)
        self._index.remove_ids(fids)
        for a in present:
            del self._aid[self._fid.pop(a)]
            self._sums.pop(a, None)
        self.generation += 1
        return present

    def upsert(self, adapter_ids: list[str], vecs: np.ndarray) -> None:
        """Add or replace keys (rows of ``vecs``, same order as ``adapter_ids``)."""
        if not adapter_ids:
            return
        vecs = np.ascontiguousarray(vecs, dtype=np.float32).reshape(len(adapter_ids), -1)
        if self.dim != vecs.shape[1]:  # first keys, or keys of a new encoder: start over
            self._reset(vecs.shape[1])
        self.remove(list(adapter_ids))
        fids = np.arange(self._next_fid, self._next_fid + len(adapter_ids), dtype=np.int64)
        self._next_fid += len(adapter_ids)
        self._index.add_with_ids(vecs, fids)
        for a, f, v in zip(adapter_ids, fids.tolist(), vecs, strict=True):
            self._fid[a], self._aid[f], self._sums[a] = f, a, key_checksum(v)
        self.generation += 1

    def sync(self, lib: Any, keyed: set[str], verify: bool = False) -> SyncReport:
        """Match the index to ``keyed`` (the library's adapter ids that have keys).

        New ids are read with ``lib.keys(new_ids)``; with ``verify`` every key is read back and
        re-added when its checksum changed. Saves when anything changed.
        """
        report = SyncReport()
        report.removed = self.remove([a for a in self._fid if a not in keyed])
        wanted = sorted(keyed) if verify else sorted(a for a in keyed if a not in self._fid)
        if wanted:
            ids, mat = lib.keys(wanted)
            mat = np.asarray(mat, dtype=np.float32)
            if len(ids) and self.dim is not None and mat.shape[1] != self.dim:
                if not verify:  # keys changed dimension (new encoder): re-read all of them
                    return self._merge(report, self.sync(lib, keyed, verify=True))
                self._reset(None)
            changed = [(a, v) for a, v in zip(ids, mat, strict=True) if self._sums.get(a) != key_checksum(v)]
            if changed:
                for a, _ in changed:
                    (report.updated if a in self._fid else report.added).append(a)
                self.upsert([a for a, _ in changed], np.stack([v for _, v in changed]))
        if report.changed:
            self.save()
        return report

    @staticmethod
    def _merge(a: SyncReport, b: SyncReport) -> SyncReport:
        return SyncReport(a.added + b.added, a.updated + b.updated, a.removed + b.removed)

    # --- queries ------------------------------------------------------------------------------
    def search(
        self, queries: np.ndarray, k: int, allowed: set[str] | None = None
    ) -> list[list[tuple[str, float]]]:
        """Top-``k`` (adapter id, inner product) per query row, best first, within ``allowed``."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        empty: list[list[tuple[str, float]]] = [[] for _ in range(len(queries))]
        if self.ntotal == 0 or len(queries) == 0:
            return empty
        params = None
        pool = self.ntotal
        if allowed is not None:
            fids = np.array([self._fid[a] for a in allowed if a in self._fid], dtype=np.int64)
            if len(fids) == 0:
                return empty
            if len(fids) < self.ntotal:
                sel = faiss.IDSelectorBatch(fids)  # kept alive by this frame until the search is done
                params = faiss.SearchParameters()
                params.sel = sel
            pool = len(fids)
        scores, fids_out = _search(self._index, queries, min(k, pool), params)
        return [
            [(self._aid[int(f)], float(s)) for s, f in zip(row_s, row_f, strict=True) if f >= 0]
            for row_s, row_f in zip(scores, fids_out, strict=True)
        ]

    def vectors(self, adapter_ids: list[str]) -> np.ndarray:
        """The stored keys of these adapters, ``(n, dim)``."""
        if not adapter_ids:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        return np.stack([self._index.reconstruct(self._fid[a]) for a in adapter_ids]).astype(np.float32)
