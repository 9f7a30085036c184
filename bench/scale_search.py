#!/usr/bin/env python
"""Search latency and recall@3 of a library built by bench/scale.py, at several search widths.

    python bench/scale_search.py --out DIR [--widths 8,12,16,24] [--real-max 3000] [--queries 200]

Loads ``DIR/library``'s persisted key index (never rebuilds it), takes the same held-out query passages
as bench/scale.py (their cached MiniLM embeddings), computes the exact top-3 by brute force over the
index's key file, then for each width (IVF ``nprobe`` or HNSW ``efSearch``) times one query at a time on
one thread: the whole ``AnnIndex.search`` (approximate candidates + exact re-rank) and, apart, faiss's
own search. Prints one line per width; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import cached_embeddings, pct, real_passages  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the folder bench/scale.py used")
    p.add_argument("--widths", default="8,12,16,24", help="nprobe (IVF) or efSearch (HNSW) values")
    p.add_argument("--real-max", type=int, default=3000)
    p.add_argument("--queries", type=int, default=200)
    args = p.parse_args(argv)

    import faiss

    from loramix.route.ann import AnnConfig, AnnIndex
    from loramix.route.encoder import get_encoder

    faiss.omp_set_num_threads(1)
    _, query_texts = real_passages(args.real_max, args.queries)
    queries = cached_embeddings(query_texts, "queries", get_encoder())
    folder = args.out / "library" / "meta" / "index"
    ix = AnnIndex(folder, AnnConfig())
    alive, dim = ix._alive, int(ix.dim or 0)
    n = len(alive)
    best_s = np.full((len(queries), 3), -np.inf, dtype=np.float32)
    best_r = np.zeros((len(queries), 3), dtype=np.int64)
    with open(folder / "ann_vecs.f32", "rb") as f:
        for j in range(0, n, 100_000):
            m = min(100_000, n - j)
            sc = queries @ np.frombuffer(f.read(m * dim * 4), dtype=np.float32).reshape(m, dim).T  # (Q, m)
            sc[:, ~alive[j:j + m]] = -np.inf
            top = np.argpartition(-sc, 3, axis=1)[:, :3]
            all_s = np.concatenate([best_s, np.take_along_axis(sc, top, 1)], 1)
            all_r = np.concatenate([best_r, top + j], 1)
            keep = np.argsort(-all_s, axis=1, kind="stable")[:, :3]
            best_s, best_r = np.take_along_axis(all_s, keep, 1), np.take_along_axis(all_r, keep, 1)
    exact = [{int(x) for x in row} for row in best_r]
    res: dict = {"bench": "scale_search", "n": int(ix.ntotal), "kind": ix.kind,
                 "nlist": getattr(faiss.downcast_index(ix._index), "nlist", None), "widths": {}}
    for w in (int(x) for x in args.widths.split(",")):
        if ix.kind == "ivfsq":
            ix.cfg.ivf_probe = w
        else:
            ix.cfg.ef_search = w
        ix._apply_search_params()
        for _ in range(2):  # the second pass is the measured one
            lat, raw, hits = [], [], 0
            for qi, q in enumerate(queries):
                t = time.perf_counter()
                got = ix.search(q[None], 3)[0]
                lat.append((time.perf_counter() - t) * 1000)
                hits += len(set(ix.rows_of([a for a, _ in got]).tolist()) & exact[qi])
                t = time.perf_counter()
                ix._index.search(q[None], max(ix.cfg.rerank, 3))
                raw.append((time.perf_counter() - t) * 1000)
        row = {"search_p50_ms": round(pct(lat, 50), 4), "search_p99_ms": round(pct(lat, 99), 4),
               "faiss_p50_ms": round(pct(raw, 50), 4), "recall_at_3": round(hits / (3 * len(queries)), 4)}
        res["widths"][w] = row
        print(f"width {w}: {row}", flush=True)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
