#!/usr/bin/env python
"""Where a cold load's time goes in a library built by bench/scale.py: registry lookups, the pack read,
the nano -> LoRA expansion; each timed for random adapters not read before by this process.

    python bench/scale_load.py --out DIR [--samples 200]

Prints per-part p50 and p90 in ms; the last line is one JSON object. Run it once the bench is done: a
page the OS already caches makes a read cheap, one it does not makes it a disk read, so the first
samples after a big build are the honest cold ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import pct  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)

    import torch

    from loramix.store import Library
    from loramix.store.nano_io import read_nano_stack

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    lib = Library(args.out / "library")
    keys = np.load(lib.meta_path("index") / "ann_meta.npz")["keys"]  # ids from the index's file: no registry page read
    n = len(keys)
    rng = np.random.default_rng(args.seed)
    parts: dict[str, list[float]] = {"registry_get": [], "pack_entry": [], "pack_read": [], "expand": [], "total": []}
    for i in rng.choice(n, args.samples, replace=False):
        aid = f"{int(keys[i]):016x}"
        t0 = time.perf_counter()
        rec = lib.get(aid)
        t1 = time.perf_counter()
        row = lib._read("SELECT pack, offset, length FROM pack_entries WHERE sha = ?", (rec.blob,))[0]
        t2 = time.perf_counter()
        data = lib.packs.read(lib._conn, rec.blob)  # entry lookup again (now cached) + the mmap read + crc
        t3 = time.perf_counter()
        st = read_nano_stack(data, lib.bases.get)
        st.to_lora(lib.bases.get(st.basis_id))
        t4 = time.perf_counter()
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
            parts[k].append(v * 1000)
        assert row is not None
    res = {"bench": "scale_load", "n": n, "samples": args.samples,
           "p50_ms": {k: round(pct(v, 50), 4) for k, v in parts.items()},
           "p90_ms": {k: round(pct(v, 90), 4) for k, v in parts.items()}}
    for k in parts:
        print(f"{k:13s} p50 {res['p50_ms'][k]:8.4f} ms   p90 {res['p90_ms'][k]:8.4f} ms")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
