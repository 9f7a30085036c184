#!/usr/bin/env python
"""Why the label-free router wins or loses: its pair signal and an ablation of what it learns.

    python bench/label_free_ablation.py --out OUT [the bench/quality.py options OUT was made with]

Reuses OUT/library (the experts) and its loss cache (OUT/library/meta/router/losses.npz): no expert is
trained and no row that bench/quality.py scored is scored again. On a copy of the library it prints
(1) on the unlabelled pairs, how often the pair's own domain adapter has the lowest loss and the
median gap between the best and the second adapter; (2) for both key conditions, the untrained keys
and four learners (the old d x d head; keys only; the loss-weighted centroid start alone; the full
grid), each one's top-1 on the held-out queries and questions, and its held-out-pair verdict.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

import quality  # bench/ is sys.path[0]
from quality_lib import DESCRIPTIONS

VARIANTS = {"old-head": {"learn": "head", "key_reg_grid": (0.0,), "centroid_init": False},
            "keys": {"centroid_init": False}, "centroid-only": {"key_reg_grid": (0.0,)}, "full": {}}


def main() -> None:
    from loramix.app import Loramix
    from loramix.config import RouteConfig, RouterTrainConfig
    from loramix.route.trained import router_dir
    from loramix.train.router import LOSS_CACHE, candidate_losses, train_router

    args = quality.parse_args(sys.argv[1:])
    b = quality.Bench(args)
    b.data()
    qs, ts = b._pairs()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(args.out / "library", work / "a")
        ea = Loramix(work / "a", args.base)
        have = [d for d in b.domains if d in ea.library]
        eb = Loramix(work / "b", args.base)
        for d in have:
            eb.add_weights(ea.library.load(ea.library.get(d).id), d, description=DESCRIPTIONS[d])
        shutil.copyfile(router_dir(ea.library) / LOSS_CACHE, router_dir(eb.library) / LOSS_CACHE)
        k = max(2, min(args.router_k, len(have)))
        losses = candidate_losses(ea, qs, ts, [[ea.library.get(d).id for d in have]] * len(qs), max_len=192,
                                  score_query=True)  # (N, n)
        own = np.array([have.index(d) for d in b.pair_domains])  # (N,) diagnostics only
        srt = np.sort(losses, axis=1)
        print(f"{len(qs)} pairs, {len(have)} experts: own adapter lowest on {(losses.argmin(1) == own).mean():.3f} "
              f"of the pairs; median best-vs-second gap {np.median(srt[:, 1] - srt[:, 0]):.3f} nats")
        hq = [q for s in ("val", "test", "questions") for q in b.sets[s]["queries"]]
        hg = [g for s in ("val", "test", "questions") for g in b.sets[s]["gold"]]

        def top1(eng: Loramix, strategy: str) -> float:
            routes = eng.router.route_batch(hq, RouteConfig(k=1, strategy=strategy))
            name = {eng.library.get(d).id: d for d in have}
            return float(np.mean([name[r.adapters[0].id] == g for r, g in zip(routes, hg, strict=True)]))

        print(f"top-1 on {len(hq)} held-out queries and questions (val + test + questions)")
        for cond, eng in (("examples", ea), ("description", eb)):
            print(f"{cond}: untrained {top1(eng, 'semantic'):.3f}")
            for name, kw in VARIANTS.items():
                cfg = RouterTrainConfig(k=k, max_len=192, score_query=True, seed=args.seed, **kw)  # type: ignore[arg-type]
                v = train_router(eng, qs, ts, cfg, progress=False).validation
                print(f"{cond}: {name:13s} {top1(eng, 'trained'):.3f}  held-out pairs: routed loss keys "
                      f"{v['routed_loss_keys']:.4f} head {v['routed_loss_trained']:.4f} (gain {v['gain']:+.4f} +- "
                      f"{v['gain_se']:.4f}, beats keys {v['beats_keys']}; tau {v['tau']}, pull {v['key_reg']}, "
                      f"start {v['init']}, mix {v['mix']}, step {v['best_step']})", flush=True)


if __name__ == "__main__":
    main()
