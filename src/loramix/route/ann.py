"""A key index that holds a million adapters: exact below a size, approximate (faiss HNSW over 8-bit
scalar-quantised vectors, or IVF + SQ8) above it, with exact re-ranking, tombstones and persistence.

Layout under the index folder (``lib.meta_path("index")``):

- ``ann_vecs.f32``  every indexed key as raw float32 rows (row = position), memory-mapped: the exact
  vectors used for re-ranking, pre-filtered search and rebuilds (never all in RAM for big indexes);
- ``ann.faiss``     the faiss index whose labels are row numbers;
- ``ann_meta.npz``  per row: adapter id (as uint64: ids are 16 hex digits), alive flag, key checksum;
  plus the dimension, the index kind and the library generation the index was synced at.

Removal marks a row dead (a tombstone); searches skip dead rows and the index is rebuilt from the live
rows once more than ``rebuild_dead_share`` of them are dead. Tag filters: a selective filter (at most
``prefilter_max`` allowed adapters) is answered exactly over the allowed rows' vectors; a broad one by
searching the approximate index for more candidates and dropping those not allowed (widening until
``k`` pass, then falling back to the exact path), so results are always within the filter.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from loramix.route.index import SyncReport

__all__ = ["AnnConfig", "AnnIndex"]

VEC_FILE, INDEX_FILE, META_FILE = "ann_vecs.f32", "ann.faiss", "ann_meta.npz"
FORMAT = 1
KINDS = ("auto", "flat", "hnsw", "ivfsq")


@dataclass
class AnnConfig:
    """How the key index is built and searched."""

    kind: str = "auto"  # auto: flat up to exact_max keys, hnsw up to hnsw_max, ivfsq above; or force one
    exact_max: int = 5_000  # up to this many keys exact (flat) search; at 10k bench/scale.py measured HNSW faster
    hnsw_max: int = 50_000  # above: IVF + SQ8 (at 100k keys HNSW+SQ8 recall@3 fell to 0.84, IVF kept 0.97)
    hnsw_m: int = 32  # HNSW graph degree
    ef_construction: int = 80
    ef_search: int = 96
    ivf_lists: int = 0  # 0: about 4 * sqrt(n)
    ivf_probe: int = 0  # IVF lists searched per query; 0: auto, enough lists to scan about ivf_scan keys
    ivf_scan: int = 2_000  # auto nprobe: at 1M keys (2,564 lists) that is 6 lists, p50 0.49 ms at recall@3 0.965
    ivf_graph_lists: int = 1024  # from this many lists on, the centroids are searched through an HNSW graph
    kmeans_iters: int = 10  # k-means iterations finding the IVF lists (faiss's default is 25)
    rerank: int = 8  # approximate candidates re-scored exactly (at least k); at 1M, 8 and 24 gave the same recall
    prefilter_max: int = 20_000  # a tag filter allowing at most this many adapters is searched exactly
    rebuild_dead_share: float = 0.2  # rebuild once this share of rows are tombstones
    threads: int = 1  # faiss threads per search (one query: 1 is fastest)
    checkpoint_s: float = 120.0  # a long first sync saves its progress this often (a kill resumes from there)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; expected one of {', '.join(KINDS)}")


def _to_u64(ids: Iterable[str]) -> np.ndarray:
    return np.fromiter((int(a, 16) for a in ids), dtype=np.uint64)


def _to_str(x: int) -> str:
    return f"{int(x):016x}"


def _mapped(path: Path, n: int, d: int) -> np.ndarray:
    """The first ``n`` rows of a float32 file, memory-mapped, as a plain ndarray view (indexing an
    ``np.memmap`` costs ~0.2 ms of Python per call; the view reads the same pages)."""
    if not n:
        return np.zeros((0, d), np.float32)
    return np.asarray(np.memmap(path, dtype=np.float32, mode="r", shape=(n, d)))


def _checksums(mat: np.ndarray) -> np.ndarray:
    return np.fromiter((int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little")
                        for r in np.ascontiguousarray(mat, dtype=np.float32)), dtype=np.uint64, count=len(mat))


class AnnIndex:
    """Adapter keys for routing; the same interface as :class:`loramix.route.index.KeyIndex`."""

    def __init__(self, folder: Path | None, cfg: AnnConfig | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.cfg = cfg or AnnConfig()
        self.dim: int | None = None
        self.kind = "flat"
        self._index: Any = None
        self._vecs = np.zeros((0, 0), dtype=np.float32)  # (rows, d) — a memmap once persisted
        self._keys = np.zeros(0, dtype=np.uint64)  # row -> adapter id
        self._alive = np.zeros(0, dtype=bool)
        self._count: tuple[Any, int] = (None, 0)  # (state it was counted at, live rows)
        self._vec_fd: int | None = None  # the key file, for positioned reads of a few rows
        self._sums = np.zeros(0, dtype=np.uint64)
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None  # (sorted live ids, their rows)
        self.lib_generation = -1  # library generation at the last sync
        self.generation = 0  # bumped on every change
        if self.folder is not None:
            self._load()

    # --- state --------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        key = (self.generation, id(self._alive), len(self._alive))
        if self._count[0] != key:  # counted once per change, not per search (a million flags take ~1 ms)
            self._count = (key, int(self._alive.sum()))
        return self._count[1]

    def __len__(self) -> int:
        return self.ntotal

    def ids(self) -> list[str]:
        return [_to_str(x) for x in self._keys[self._alive]]

    def _table(self) -> tuple[np.ndarray, np.ndarray]:
        if self._lookup is None:
            rows = np.flatnonzero(self._alive)
            order = np.argsort(self._keys[rows], kind="stable")
            self._lookup = (self._keys[rows][order], rows[order])
        return self._lookup

    def rows_of(self, adapter_ids: Iterable[str]) -> np.ndarray:
        """Rows of the live adapters among ``adapter_ids`` (absent ones are skipped)."""
        want = _to_u64(adapter_ids)
        keys, rows = self._table()
        if not len(keys) or not len(want):
            return np.zeros(0, dtype=np.int64)
        pos = np.clip(np.searchsorted(keys, want), 0, len(keys) - 1)
        hit = keys[pos] == want
        return rows[pos[hit]].astype(np.int64)

    def __contains__(self, adapter_id: object) -> bool:
        return isinstance(adapter_id, str) and len(self.rows_of([adapter_id])) == 1

    # --- persistence --------------------------------------------------------------------------
    def _paths(self) -> tuple[Path, Path, Path]:
        assert self.folder is not None
        return self.folder / VEC_FILE, self.folder / INDEX_FILE, self.folder / META_FILE

    def _load(self) -> None:
        vpath, ipath, mpath = self._paths()
        if not (vpath.is_file() and ipath.is_file() and mpath.is_file()):
            return
        try:
            meta = np.load(mpath)
            if int(meta["format"]) != FORMAT:
                return
            dim, n = int(meta["dim"]), len(meta["keys"])
            if vpath.stat().st_size < n * dim * 4:
                return  # vectors missing: start empty, the next sync re-adds from the library
            index = faiss.read_index(str(ipath))
            if index.ntotal != n or index.d != dim:
                return
        except Exception:
            return
        self.dim, self.kind, self._index = dim, str(meta["kind"]), index
        self._keys, self._alive, self._sums = meta["keys"], meta["alive"].copy(), meta["sums"]
        self._vecs = _mapped(vpath, n, dim)
        self.lib_generation = int(meta["lib_generation"])
        self._apply_search_params()

    def save(self) -> None:
        """Persist atomically: vectors first (append-only), then the faiss index, then the row table."""
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        vpath, ipath, mpath = self._paths()
        if self._index is None:
            for p in (vpath, ipath, mpath):
                p.unlink(missing_ok=True)
            return
        if vpath.is_file():
            with open(vpath, "rb+") as f:
                os.fsync(f.fileno())
        tmp = ipath.with_name(f".{INDEX_FILE}.{os.getpid()}.tmp")
        faiss.write_index(self._index, str(tmp))
        os.replace(tmp, ipath)
        tmp = mpath.with_name(f".ann_meta.{os.getpid()}.tmp.npz")
        np.savez(tmp, format=FORMAT, dim=int(self.dim or 0), kind=self.kind, keys=self._keys, alive=self._alive,
                 sums=self._sums, lib_generation=self.lib_generation)
        os.replace(tmp, mpath)

    # --- vectors: an append-only file, memory-mapped (in RAM for an index without a folder) ------
    def _write_vecs(self, vecs: np.ndarray) -> None:
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if self.folder is None:
            self._vecs = vecs
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        vpath = self._paths()[0]
        tmp = vpath.with_name(f".{VEC_FILE}.{os.getpid()}.tmp")
        vecs.tofile(tmp)
        os.replace(tmp, vpath)
        self._remap(len(vecs), vecs.shape[1])

    def _append_vecs(self, vecs: np.ndarray) -> None:
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if self.folder is None:
            self._vecs = np.concatenate([self._vecs, vecs])
            return
        n = len(self._keys)  # rows before this append
        vpath = self._paths()[0]
        with open(vpath, "r+b" if vpath.exists() else "wb") as f:
            f.truncate(n * vecs.shape[1] * 4)  # drop rows a killed process appended but never indexed
            f.seek(0, os.SEEK_END)
            f.write(vecs.tobytes())
        self._remap(n + len(vecs), vecs.shape[1])

    def _remap(self, n: int, d: int) -> None:
        if self._vec_fd is not None:  # the file may have been replaced: reopen on the next read
            os.close(self._vec_fd)
            self._vec_fd = None
        vpath = self._paths()[0]
        self._vecs = _mapped(vpath, n, d)

    # --- building -----------------------------------------------------------------------------
    def _choose_kind(self, n: int) -> str:
        if self.cfg.kind != "auto":
            return self.cfg.kind
        return "flat" if n <= self.cfg.exact_max else "hnsw" if n <= self.cfg.hnsw_max else "ivfsq"

    def _new_index(self, kind: str, d: int, sample: np.ndarray, n_expected: int = 0) -> Any:
        if kind == "flat":
            return faiss.IndexFlatIP(d)
        if kind == "hnsw":
            hnsw: Any = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, self.cfg.hnsw_m,  # type: ignore[arg-type]
                                          faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = self.cfg.ef_construction
            hnsw.train(sample)
            return hnsw
        nlist = self.cfg.ivf_lists or max(16, int(4 * math.sqrt(max(n_expected, len(sample), 1))))
        nlist = min(nlist, max(1, len(sample) // 39))
        # many lists: the coarse search itself goes through a small HNSW graph over the centroids (the
        # k-means that finds them runs on a flat index)
        graph = nlist >= self.cfg.ivf_graph_lists
        quant: Any = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT) if graph else faiss.IndexFlatIP(d)
        index = faiss.IndexIVFScalarQuantizer(quant, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        if graph:
            index.clustering_index = faiss.IndexFlatIP(d)
            index.cp.niter = self.cfg.kmeans_iters
        index.train(sample)
        return index

    def _apply_search_params(self) -> None:
        base: Any = faiss.downcast_index(self._index) if self._index is not None else None
        if self.kind == "hnsw" and base is not None:
            base.hnsw.efSearch = self.cfg.ef_search
        elif self.kind == "ivfsq" and base is not None:
            base.nprobe = self.nprobe
            quant: Any = faiss.downcast_index(base.quantizer)
            if isinstance(quant, faiss.IndexHNSW):
                quant.hnsw.efSearch = max(64, 2 * base.nprobe)

    @property
    def nprobe(self) -> int:
        """IVF lists searched per query: ``cfg.ivf_probe``, or (auto) as many as hold about ``cfg.ivf_scan``
        keys on average, so that the work per search stays flat as the library grows."""
        base: Any = faiss.downcast_index(self._index) if self._index is not None else None
        nlist = int(getattr(base, "nlist", 1) or 1)
        if self.cfg.ivf_probe > 0:
            return min(self.cfg.ivf_probe, nlist)
        per_list = max(self.ntotal, 1) / nlist
        return max(1, min(nlist, math.ceil(self.cfg.ivf_scan / per_list)))

    def rebuild(self, expected: int | None = None) -> None:
        """Rebuild from the live rows (drops tombstones; may switch exact <-> approximate)."""
        rows = np.flatnonzero(self._alive)
        vecs = np.asarray(self._vecs[rows], dtype=np.float32)
        keys, sums = self._keys[rows], self._sums[rows]
        self._build(keys, vecs, sums, expected)

    def _build(self, keys: np.ndarray, vecs: np.ndarray, sums: np.ndarray, expected: int | None = None) -> None:
        n, d = vecs.shape
        self.kind = self._choose_kind(max(n, expected or 0))
        rng = np.random.default_rng(0)
        sample = vecs[rng.choice(n, size=min(n, 100_000), replace=False)] if n else vecs
        self._index = self._new_index(self.kind, d, np.ascontiguousarray(sample), max(n, expected or 0))
        for i in range(0, n, 65536):
            self._index.add(np.ascontiguousarray(vecs[i:i + 65536]))
        self.dim = d
        self._write_vecs(vecs)
        self._keys, self._sums = keys.copy(), sums.copy()
        self._alive = np.ones(n, dtype=bool)
        self._lookup = None
        self._apply_search_params()
        self.generation += 1

    # --- changes ------------------------------------------------------------------------------
    def remove(self, adapter_ids: list[str]) -> list[str]:
        rows = self.rows_of(adapter_ids)
        if not len(rows):
            return []
        present = [_to_str(x) for x in self._keys[rows]]
        self._alive[rows] = False
        self._lookup = None
        self.generation += 1
        dead = len(self._alive) - self.ntotal
        if len(self._alive) and dead / len(self._alive) > self.cfg.rebuild_dead_share:
            self.rebuild()
        return present

    def upsert(self, adapter_ids: list[str], vecs: np.ndarray) -> None:
        if not adapter_ids:
            return
        vecs = np.ascontiguousarray(vecs, dtype=np.float32).reshape(len(adapter_ids), -1)
        keys, sums = _to_u64(adapter_ids), _checksums(vecs)
        if self.dim != vecs.shape[1] or self._index is None:  # first keys, or a new encoder: start over
            self._build(keys, vecs, sums)
            return
        self.remove(list(adapter_ids))
        n_after = self.ntotal + len(adapter_ids)
        if self._choose_kind(n_after) != self.kind:  # crossed the exact/approximate threshold
            live = np.flatnonzero(self._alive)
            self._build(np.concatenate([self._keys[live], keys]),
                        np.concatenate([np.asarray(self._vecs[live], dtype=np.float32), vecs]),
                        np.concatenate([self._sums[live], sums]))
            return
        self._index.add(vecs)
        self._append_vecs(vecs)
        self._keys = np.concatenate([self._keys, keys])
        self._sums = np.concatenate([self._sums, sums])
        self._alive = np.concatenate([self._alive, np.ones(len(keys), dtype=bool)])
        self._lookup = None
        self.generation += 1
        self._apply_search_params()  # an auto nprobe follows the size

    def sync(self, lib: Any, keyed: set[str] | None = None, verify: bool = False) -> SyncReport:
        """Match the index to the library's keys: add new, drop removed, (``verify``) re-add changed.

        ``keyed`` (ids having keys) is read from the library when None. Nothing is read when the
        library's generation equals the one of the last sync. Saves when anything changed."""
        report = SyncReport()
        gen = int(getattr(lib, "generation", -2))
        if gen == self.lib_generation and gen >= 0 and keyed is None:
            return report
        if keyed is None and self.ntotal == 0 and hasattr(lib, "iter_keys"):
            return self._first_sync(lib, gen)  # an empty index: stream every key once, in insertion order
        if keyed is None:
            keyed = {r[0] for r in lib._read("SELECT adapter_id FROM keys")}
        have = set(self.ids())
        report.removed = self.remove([a for a in have if a not in keyed])
        wanted = sorted(keyed) if verify else sorted(a for a in keyed if a not in have)
        for i in range(0, len(wanted), 50_000):
            ids, mat = lib.keys(wanted[i:i + 50_000])
            if not ids:
                continue
            mat = np.asarray(mat, dtype=np.float32)
            rows = self.rows_of(ids)
            old = dict(zip((_to_str(x) for x in self._keys[rows]), self._sums[rows].tolist(), strict=True))
            sums = _checksums(mat)
            changed = [j for j, a in enumerate(ids) if old.get(a) != int(sums[j])]
            if self.dim is not None and mat.shape[1] != self.dim:
                changed = list(range(len(ids)))
            for j in changed:
                (report.updated if ids[j] in old else report.added).append(ids[j])
            if changed:
                self.upsert([ids[j] for j in changed], mat[changed])
                if len(wanted) > 50_000:
                    self.save()  # a long first sync survives a kill: the next one resumes from here
        self.lib_generation = gen
        if report.changed or self.folder is not None:
            self.save()
        return report

    def _first_sync(self, lib: Any, gen: int) -> SyncReport:
        report = SyncReport()
        n_total = int(lib._read("SELECT COUNT(*) FROM keys")[0][0])
        saved = time.monotonic()
        for ids, mat in lib.iter_keys(batch_size=100_000):  # the first batch is the approximate index's sample
            if self.dim is None or self._index is None:
                self._build(_to_u64(ids), np.asarray(mat, dtype=np.float32), _checksums(mat), expected=n_total)
            else:
                self.upsert(ids, mat)
            report.added += ids
            if time.monotonic() - saved > self.cfg.checkpoint_s:
                self.save()  # a long first sync survives a kill: the next one resumes from here
                saved = time.monotonic()
        self.lib_generation = gen
        self.save()
        return report

    # --- queries ------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, allowed: set[str] | None = None) -> list[list[tuple[str, float]]]:
        """Top-``k`` (adapter id, inner product) per query row, best first, within ``allowed``."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(len(queries), -1)
        if self._index is None or self.ntotal == 0 or len(q) == 0:
            return [[] for _ in range(len(q))]
        if allowed is not None:
            rows = self.rows_of(allowed)
            if len(rows) == 0:
                return [[] for _ in range(len(q))]
            if len(rows) <= self.cfg.prefilter_max or self.kind == "flat" or len(rows) < 4 * k:
                return [self._exact(qi, k, rows) for qi in q]
            return [self._post_filter(qi, k, rows) for qi in q]
        if self.kind == "flat" and self.ntotal == len(self._alive):
            return [self._format(s, r) for s, r in zip(*self._faiss(q, min(k, self.ntotal)), strict=True)]
        return [self._approx(qi, k, None) for qi in q]

    def _faiss(self, q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(self.cfg.threads)
        try:
            return self._index.search(q, n)
        finally:
            faiss.omp_set_num_threads(threads)

    def _format(self, scores: np.ndarray, rows: np.ndarray) -> list[tuple[str, float]]:
        return [(_to_str(self._keys[r]), float(s)) for s, r in zip(scores, rows, strict=True) if r >= 0]

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        """Key vectors of a few rows by positioned reads of the key file (touching the memory map would
        count ~64 KB of mapped file per row in the process's RSS, growing towards the whole file)."""
        if self.folder is None or len(rows) > 4096 or not len(self._vecs):
            return np.asarray(self._vecs[rows], dtype=np.float32)
        if self._vec_fd is None:
            self._vec_fd = os.open(self._paths()[0], os.O_RDONLY)
        fd, d = self._vec_fd, self._vecs.shape[1]
        data = b"".join(os.pread(fd, 4 * d, r * 4 * d) for r in rows.tolist())
        return np.frombuffer(data, dtype=np.float32).reshape(len(rows), d)  # (m, d)

    def _exact(self, qi: np.ndarray, k: int, rows: np.ndarray) -> list[tuple[str, float]]:
        rows = np.sort(rows)
        scores = self._rows(rows) @ qi  # (m,)
        top = np.argpartition(-scores, k - 1)[:k] if len(scores) > k else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        return self._format(scores[top], rows[top])

    def _approx(self, qi: np.ndarray, k: int, allowed_mask: np.ndarray | None = None,
                n_cand: int | None = None) -> list[tuple[str, float]]:
        """Approximate candidates (more when there are tombstones), then an exact re-rank of them."""
        want = n_cand or max(self.cfg.rerank, k)
        dead = len(self._alive) - self.ntotal
        n = min(len(self._alive), want + min(dead, 4 * want))
        _, found = self._faiss(qi[None], n)
        rows = found[0]
        rows = rows[rows >= 0]
        rows = rows[self._alive[rows]]
        if allowed_mask is not None:
            rows = rows[allowed_mask[rows]]
        if not len(rows):
            return []
        return self._exact(qi, k, rows)

    def _post_filter(self, qi: np.ndarray, k: int, rows: np.ndarray) -> list[tuple[str, float]]:
        mask = np.zeros(len(self._alive), dtype=bool)
        mask[rows] = True
        share = len(rows) / max(self.ntotal, 1)
        n = int(max(self.cfg.rerank, k) / share * 2)
        while n < len(self._alive):
            got = self._approx(qi, k, mask, n)
            if len(got) >= k:
                return got
            n *= 4
        return self._exact(qi, k, rows)

    def vectors(self, adapter_ids: list[str]) -> np.ndarray:
        if not adapter_ids:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        rows = [int(self.rows_of([a])[0]) for a in adapter_ids]
        return np.asarray(self._vecs[rows], dtype=np.float32)
