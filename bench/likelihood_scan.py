#!/usr/bin/env python
"""The validation scan behind RouteConfig.rerank_prior and rerank_k (the likelihood re-ranking's two knobs).

    python bench/likelihood_scan.py QUALITY-OPTIONS...   (the same options as a finished bench/quality.py run)

It reuses the run's experts in ``OUT/library`` (example keys) and ``OUT/library_desc`` (description keys),
scores every query of the val, test and questions sets under every expert alone (summed NLL of the query, the
quantity the re-ranking uses; cached in ``OUT/likelihood_scan.json``), and prints the top-1 accuracy of
``argmax over the keys' top-k of prior * cosine - NLL`` for a grid of priors and k, per split and key
condition. Choose on the val rows; the test and questions rows are for reading only.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (bench/ on the path)

PRIORS = (0, 5, 10, 20, 30, 50, 75, 100, 150, 300)
KS = (3, 8, 18)


def score(args, bench) -> dict:
    from loramix.app import Loramix
    from loramix.evaluate.score import score_texts

    path = args.out / "likelihood_scan.json"
    if path.is_file():
        return json.loads(path.read_text())
    engines = {c: Loramix(args.out / lib, args.base, mix=bench.mix_cfg) for c, lib in (("a", "library"), ("b", "library_desc"))}
    ids = {c: {r.name: r.id for r in e.library.list()} for c, e in engines.items()}
    res: dict = {"domains": bench.domains}
    for split in ("val", "test", "questions"):
        qs = bench.sets[split]["queries"]
        out: dict = {"gold": bench.sets[split]["gold"]}
        for c, eng in engines.items():
            eng.router.sync()
            hits = eng.router.dense_search(eng.router.encoder.encode(qs), len(bench.domains), None)
            name = {v: k for k, v in ids[c].items()}
            out[f"cos_{c}"] = [[dict((name[a], s) for a, s in row).get(d, -1.0) for d in bench.domains] for row in hits]
        rows = [q for q in qs for _ in bench.domains]
        mixes = [[(ids["a"][d], 1.0)] for _ in qs for d in bench.domains]
        t0 = time.time()
        sc = score_texts(engines["a"].mixer, rows, mixes, max_len=256)
        print(f"{split}: {len(rows)} rows scored in {time.time() - t0:.0f} s", flush=True)
        out["nll"] = np.array([s.nll for s in sc]).reshape(len(qs), len(bench.domains)).tolist()
        res[split] = out
    path.write_text(json.dumps(res))
    return res


def accuracy(res: dict, split: str, cond: str, prior: float, k: int) -> float:
    o, domains = res[split], res["domains"]
    gold = np.array([domains.index(g) for g in o["gold"]])
    cos, nll = np.array(o[f"cos_{cond}"]), np.array(o["nll"])[:, : len(domains)]  # (N, D)
    top = np.argsort(-cos, axis=1)[:, :k]  # (N, k)
    post = np.full_like(cos, -np.inf)
    rows = np.arange(len(gold))[:, None]
    post[rows, top] = prior * cos[rows, top] - nll[rows, top]
    return float((post.argmax(axis=1) == gold).mean())


def main() -> None:
    args = quality.parse_args(sys.argv[1:])
    bench = quality.Bench(args)
    bench.data()
    res = score(args, bench)
    print("top-1 of argmax(prior * cosine - NLL) over the keys' top-k; a: example keys, b: description keys")
    print(f"{'split':10} {'keys':4} {'k':>3} " + " ".join(f"{p:>6}" for p in PRIORS) + "   keys alone")
    for split in ("val", "test", "questions"):
        for cond in ("a", "b"):
            for k in KS:
                row = " ".join(f"{accuracy(res, split, cond, p, k):6.3f}" for p in PRIORS)
                print(f"{split:10} {cond:4} {k:>3} {row}   {accuracy(res, split, cond, 1e9, 1):.3f}")


if __name__ == "__main__":
    main()
