#!/usr/bin/env python
"""Nano vs LoRA experts on the quality benchmark's domains: share of LoRA's loss reduction kept, and size.

    python bench/nano_quality.py --out DIR [--domains a,b,...] [--steps N] [--train-per-domain N]
                                 [--test-per-domain N] [--nano-lrs 0.3,1.0] [--nano-rank R] [--json]

For each domain, one LoRA expert and one nano expert are trained on the same texts with the same steps,
batch size and sequence length (``build_benchmark`` split, as bench/quality.py). The nano learning rate
is picked among ``--nano-lrs`` by each run's own held-out *training-split* eval loss (never the test
texts). Both are then scored on the domain's held-out test texts (mean token NLL): reduction = base -
oracle (the domain's own expert alone). ``kept = mean nano reduction / mean LoRA reduction``; gate: kept
>= 0.8 at nano size < 1% of LoRA's. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--domains", default="zoology,botany,law,music,computing,bible")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--train-per-domain", type=int, default=150)
    p.add_argument("--test-per-domain", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--nano-lrs", default="1e-1,3e-1")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--nano-rank", type=int, default=None, help="nano core size r (r x r per layer; default --rank)")
    p.add_argument("--base", default=None)
    p.add_argument("--nano-suffix", default="", help="name nano experts <domain>-nano<suffix> (a second lr sweep "
                   "beside cached ones)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    from loramix.base import load_base, resolve_base_path
    from loramix.config import MixConfig, TrainConfig
    from loramix.evaluate.score import score_texts
    from loramix.mix import MixedModel
    from loramix.store import Library
    from loramix.train.corpora import build_benchmark
    from loramix.train.expert import train_expert
    from loramix.train.nano import train_nano

    t_start = time.perf_counter()
    domains = args.domains.split(",")
    train, test = build_benchmark(domains, args.train_per_domain, args.test_per_domain, seed=0)
    base_path = str(resolve_base_path(args.base))
    args.out.mkdir(parents=True, exist_ok=True)
    lib = Library(args.out / "library")
    common = dict(steps=args.steps, seq_len=args.seq_len)
    nano_rank = args.nano_rank or args.rank
    per: dict[str, dict] = {}
    base = load_base(args.base)
    mm = MixedModel(base, lib.load, MixConfig(capacity=4))
    rows: list[tuple[str, dict]] = []
    for d in domains:
        texts = [doc.text for doc in train[d]]
        for kind, lrs in (("lora", [args.lora_lr]), ("nano", [float(x) for x in args.nano_lrs.split(",")])):
            name = f"{d}-{kind}" + (args.nano_suffix if kind == "nano" else "")
            if name in lib:
                per.setdefault(d, {})[kind] = lib.get(name).meta["train"]
                print(f"{name}: reused", flush=True)
                continue
            best = None
            for lr in lrs:
                rank = args.rank if kind == "lora" else nano_rank
                cfg = TrainConfig(kind=kind, rank=rank, alpha=2.0 * rank, lr=lr, nano_lr=lr, **common)
                if kind == "lora":
                    w, rep = train_expert(base_path, texts, cfg, progress=False)
                else:
                    w, rep, basis = train_nano(base_path, texts, cfg, bases=lib.bases, progress=False)
                print(f"{name} lr {lr}: eval loss {rep.eval_loss_before:.3f} -> {rep.eval_loss_after:.3f} "
                      f"({rep.seconds:.0f} s)", flush=True)
                if best is None or rep.eval_loss_after < best[1].eval_loss_after:
                    best = (w, rep, lr)
            assert best is not None
            info = {"lr": best[2], "eval_loss_before": best[1].eval_loss_before,
                    "eval_loss_after": best[1].eval_loss_after, "seconds": best[1].seconds}
            lib.add_weights(best[0], name, domain_tags=[d], meta={"train": info})
            per.setdefault(d, {})[kind] = info
        tests = [doc.text for doc in test[d]]
        res = {}
        with torch.no_grad():
            for setting in ("base", "lora", "nano"):
                suffix = args.nano_suffix if setting == "nano" else ""
                mix = [] if setting == "base" else [(lib.get(f"{d}-{setting}{suffix}").id, 1.0)]
                res[setting] = float(np.mean([s.loss for s in score_texts(mm, tests, [mix] * len(tests))]))
        res["lora_reduction"] = res["base"] - res["lora"]
        res["nano_reduction"] = res["base"] - res["nano"]
        res["kept"] = res["nano_reduction"] / res["lora_reduction"] if res["lora_reduction"] > 0 else None
        rows.append((d, res))
        print(f"{d:10s} base {res['base']:.3f}  lora {res['lora']:.3f}  nano {res['nano']:.3f}  kept "
              f"{res['kept'] if res['kept'] is None else round(res['kept'], 3)}", flush=True)
        summarize(args, argv, domains, rows, per, lib, t_start, final=d == domains[-1])
    return 0


def summarize(args: argparse.Namespace, argv: list[str] | None, domains: list[str], rows: list[tuple[str, dict]],
              per: dict[str, dict], lib: Any, t_start: float, final: bool) -> None:
    lora_red = float(np.mean([r["lora_reduction"] for _, r in rows]))
    nano_red = float(np.mean([r["nano_reduction"] for _, r in rows]))
    lora_rec, nano_rec = lib.get(f"{domains[0]}-lora"), lib.get(f"{domains[0]}-nano{args.nano_suffix}")
    size = nano_rec.n_params / lora_rec.n_params
    kept = nano_red / lora_red if lora_red > 0 else None
    out = {"bench": "nano_quality", "complete": final, "domains_done": [d for d, _ in rows], "domains": domains, "steps": args.steps, "train_per_domain": args.train_per_domain,
           "test_per_domain": args.test_per_domain, "rank": args.rank, "nano_rank": args.nano_rank or args.rank, "lora_params": lora_rec.n_params,
           "nano_params": nano_rec.n_params, "size_ratio": round(size, 5),
           "lora_reduction": round(lora_red, 4), "nano_reduction": round(nano_red, 4),
           "kept": None if kept is None else round(kept, 4),
           "gate": bool(final and len(rows) >= 6 and kept is not None and kept >= 0.8 and size < 0.01),
           "per_domain": {d: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for d, r in rows},
           "train": per, "seconds": round(time.perf_counter() - t_start, 1),
           "command": "python bench/nano_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    (args.out / "nano_quality.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
