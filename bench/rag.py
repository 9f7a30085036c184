#!/usr/bin/env python
"""Retrieval-augmented generation benchmark: documents and adapters, alone and together, on real text.

    python bench/rag.py --out DIR [--json] [--domains a,b,..] [--train-per-domain N] [--test-per-domain N]
                        [--collection-per-domain N] [--steps N] [--aware-steps N] [--passages N]

1. data     ``build_benchmark(domains, train, val + test, seed)`` (split by headword, deduplicated across
            domains); the held-out texts of each domain are split by headword into a validation part
            (``--val-per-domain``: tunes the fusion weight, nothing else) and the test part (every figure).
            One collection per domain from the same corpus minus every entry whose headword is a held-out
            text's headword (in any domain) and minus any text equal to a held-out text: a test text's own
            source entry (all its senses) is never in a collection. ``check_no_leak`` verifies it twice:
            on the rows stored, and by retrieving with each held-out text *in full* as the query.
2. adapters per domain, a plain expert (packed text) and a retrieval-aware expert (passages + the text's
            opening, loss on the rest; passages never from the text's own headword), tagged plain/aware.
            Each trains until its eval loss (on its own held-out share of the training texts) stops
            improving by ``--min-delta`` for ``--patience`` evaluations ``--eval-every`` steps apart,
            capped at ``--steps`` / ``--aware-steps`` and ``--max-adapter-seconds``; the best weights are kept.
3. recall   the query is the text's first 40% of words (``split_texts``); related entries are the
            same-domain collection entries that cross-reference the test entry: the test text names their
            headword, or their text names the test headword (headwords of >= 5 letters found in < 1% of the
            domain's entries). recall@5 = |related in top 5| / min(|related|, 5), over texts with >= 1 related
            entry, for dense, BM25, RRF, the tuned mix (``fusion="mix"``: the dense weight with the best
            validation recall@5 on a grid of 0, 0.1, .., 1; ties go to the larger weight) and the tuned mix +
            LM rerank (top ``--rerank-top`` by the base model's loss of the query given each passage).
            "fused" is the tuned mix; the passages in every loss below come from it too.
4. loss     mean token NLL of the rest of the text given (passages +) the opening, macro-mean over domains:
            base, base + passages, routed plain adapters, routed plain adapters + passages, routed aware
            adapters + passages (routing: semantic top-3 on the opening, within the plain or aware adapters).
5. caches   a request stream (``--cache-queries`` test queries, each followed by the same again and by its first
            30% of words) through
            ``rag.retrieve`` and the passage KV prefix cache (chat prompts, base model): hit rates, and the
            prefill time of prompts that hit, cached vs full, timed round-robin, with the logits checked equal.
Order of work: data, recall, losses without adapters, caches (a partial report.json is written here),
then the adapters and the losses that need them.
The last line printed with --json is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_DOMAINS = ["zoology", "botany", "chemistry", "medicine", "law", "computing"]
MIN_HEADWORD = 5  # letters; shorter headwords are too often ordinary words
MAX_HEADWORD_SHARE = 0.01  # a headword named in more entries than this share is not a cross-reference


class LeakError(AssertionError):
    """A test text's own source entry is in (or retrievable from) a collection."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="work folder (library home, report)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
    p.add_argument("--domains", default=",".join(DEFAULT_DOMAINS))
    p.add_argument("--train-per-domain", type=int, default=150)
    p.add_argument("--test-per-domain", type=int, default=16)
    p.add_argument("--val-per-domain", type=int, default=8, help="held-out texts that tune the fusion weight")
    p.add_argument("--collection-per-domain", type=int, default=2000, help="cap on entries per collection")
    p.add_argument("--steps", type=int, default=300, help="cap on plain expert steps (batch 8 x seq-len tokens)")
    p.add_argument("--aware-steps", type=int, default=300, help="cap on aware expert steps (batch 4 pairs)")
    p.add_argument("--eval-every", type=int, default=10, help="steps between plateau checks (0: run the cap)")
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--min-delta", type=float, default=0.005)
    p.add_argument("--max-adapter-seconds", type=float, default=None, help="wall-clock cap per adapter")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--passages", type=int, default=3)
    p.add_argument("--budget", type=int, default=256, help="passage tokens in the prompt")
    p.add_argument("--rerank-top", type=int, default=10)
    p.add_argument("--resume-from", type=Path, default=None,
                   help="the partial report.json of an earlier pass with the same --out and data options: its "
                        "leakage check, test recall, base/docs losses and cache figures are reused; the fusion "
                        "weight is re-chosen, then adapters are trained and scored")
    p.add_argument("--kinds", default="plain,aware", help="experts to train: plain, aware or both (a missing kind's "
                   "losses are reported as null)")
    p.add_argument("--skip-aware-alone", action="store_true", help="do not score the aware experts without passages")
    p.add_argument("--cache-queries", type=int, default=24, help="test queries in the cache stream (x3 requests)")
    p.add_argument("--base", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data and leakage

def norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def build_collections(domains: Sequence[str], tests: dict[str, list[Any]], per_domain: int, seed: int,
                      load: Any = None) -> dict[str, list[Any]]:
    """Per domain, the corpus entries minus every test headword (any domain) and every test text."""
    from loramix.train.corpora import load_domain

    load = load or load_domain
    test_keys = {d.key.lower() for ds in tests.values() for d in ds}
    test_texts = {norm(d.text) for ds in tests.values() for d in ds}
    out = {}
    for dom in domains:
        docs = [d for d in load(dom) if d.key.lower() not in test_keys and norm(d.text) not in test_texts]
        docs.sort(key=lambda d: (d.key, d.text))
        random.Random(f"{seed}:{dom}").shuffle(docs)
        out[dom] = docs[:per_domain]
    return out


def split_validation(held: dict[str, list[Any]], n_val: int, seed: int) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """(validation, test) per domain from the held-out docs, split by headword (no headword on both sides):
    headwords in a seeded order go to validation until it holds ``n_val`` docs."""
    val: dict[str, list[Any]] = {}
    test: dict[str, list[Any]] = {}
    for dom, docs in held.items():
        keys = sorted({d.key.lower() for d in docs})
        random.Random(f"{seed}:val:{dom}").shuffle(keys)
        picked: set[str] = set()
        count = 0
        for k in keys:
            if count >= n_val:
                break
            picked.add(k)
            count += sum(d.key.lower() == k for d in docs)
        val[dom] = [d for d in docs if d.key.lower() in picked]
        test[dom] = [d for d in docs if d.key.lower() not in picked]
    return val, test


def check_no_leak(store: Any, retriever: Any, tests: Sequence[Any], collections: Sequence[str],
                  passages: int = 20) -> dict[str, int]:
    """Raise LeakError if a test text's own entry is stored or retrievable (full text as the query)."""
    from loramix.config import DocsConfig

    keys = {d.key.lower() for d in tests}
    stored = 0
    for name in collections:
        for ch in store.chunks(collection=name):
            stored += 1
            if ch.key.lower() in keys:
                raise LeakError(f"collection {name} holds chunk {ch.id} of test headword {ch.key!r}")
    cfg = DocsConfig(collections=list(collections), passages=passages, candidates=passages)
    checked = 0
    for d in tests:
        for p in retriever.rank(d.text, retriever.collections(cfg.collections), cfg)[:passages]:
            checked += 1
            a, b = norm(p.text), norm(d.text)
            if p.key.lower() == d.key.lower() or a in b or b in a:  # its headword, or a copy of (part of) it
                raise LeakError(f"test text {d.text[:60]!r} retrieves its own entry {p.collection}:{p.key}")
    return {"chunks_checked": stored, "retrieved_checked": checked}


def related_entries(test: Any, entries: Sequence[Any], common: set[str] = frozenset()) -> set[str]:  # type: ignore[assignment]
    """Keys of same-domain entries that cross-reference the test entry (see the module doc); headwords
    in ``common`` (ordinary words) never count."""
    words = set(norm(test.text).split())
    text = " " + norm(test.text) + " "
    head = norm(test.key)
    back = len(head.replace(" ", "")) >= MIN_HEADWORD and head not in common
    out = set()
    for e in entries:
        k = norm(e.key)
        if len(k.replace(" ", "")) < MIN_HEADWORD or k == head or k in common:
            continue
        if (" " in k and f" {k} " in text) or k in words or (back and f" {head} " in f" {norm(e.text)} "):
            out.add(e.key.lower())
    return out


def common_headwords(entries: Sequence[Any]) -> set[str]:
    """Headwords named in more than MAX_HEADWORD_SHARE of the entries (ordinary words, not references)."""
    counts: dict[str, int] = defaultdict(int)
    for e in entries:
        for w in set(norm(e.text).split()):
            counts[w] += 1
    limit = max(2, int(len(entries) * MAX_HEADWORD_SHARE))
    return {w for w, c in counts.items() if c > limit}


def recall_rows(eng: Any, domains: Sequence[str], cols: dict[str, list[Any]], queries: Sequence[str],
                owners: Sequence[tuple[str, Any]]) -> list[tuple[str, str, set[str], Any]]:
    """(domain, query, related entry keys, query vector) for each text with >= 1 related entry."""
    common = {dom: common_headwords(cols[dom]) for dom in domains}
    rows = [(dom, q, related_entries(doc, cols[dom], common[dom])) for q, (dom, doc) in zip(queries, owners, strict=True)]
    rows = [r for r in rows if r[2]]
    vecs = eng.retriever.encoder.encode([q for _, q, _ in rows]) if rows else []
    return [(dom, q, rel, v) for (dom, q, rel), v in zip(rows, vecs, strict=True)]


def recall_of(eng: Any, names: Sequence[str], rows: Sequence[tuple[str, str, set[str], Any]], cfg: Any,
              scorer: Any = None, tok: Any = None) -> tuple[list[float], list[float]]:
    """recall@5 and hit@5 per row under ``cfg`` (all collections searched; only the row's domain counts)."""
    col = eng.retriever.collections(list(names))
    recall, hit = [], []
    for dom, q, rel, v in rows:
        top = eng.retriever.rank(q, col, cfg, scorer=scorer, tokenizer=tok, qvec=v)[:5]
        got = len({p.key.lower() for p in top if p.collection == f"bench-{dom}"} & rel)
        recall.append(got / min(len(rel), 5))
        hit.append(float(got > 0))
    return recall, hit


# ----------------------------------------------------------------------------- the benchmark

def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import numpy as np
    import torch

    from loramix.app import Loramix
    from loramix.config import DocsConfig, RouteConfig, TrainConfig
    from loramix.documents import passage_prompt
    from loramix.evaluate.context import score_continuations
    from loramix.rag import pair_scorer, prefill, retrieve, train_aware
    from loramix.train.corpora import build_benchmark
    from loramix.train.router import split_texts

    t_start = time.time()
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    eng = Loramix(home=args.out / "home", base=args.base)
    timing: dict[str, float] = {}

    # 1. data, collections, leakage
    t0 = time.time()
    train, held = build_benchmark(domains, args.train_per_domain, args.test_per_domain + args.val_per_domain,
                                  seed=args.seed)
    val, test = split_validation(held, args.val_per_domain, args.seed)
    cols = build_collections(domains, held, args.collection_per_domain, args.seed)  # without val and test
    names = [f"bench-{d}" for d in domains]
    for dom, name in zip(domains, names, strict=True):
        rec = eng.docs.get(name) if name in eng.docs else None
        sig = (f"{args.seed}:{args.collection_per_domain}:{args.test_per_domain}:{args.val_per_domain}:"
               f"{args.train_per_domain}")
        if rec is not None and rec.source != sig:
            eng.remove_docs(name)
            rec = None
        if rec is None:
            log(f"collection {name}: embedding {len(cols[dom])} entries")
            eng.docs.add(name, [d.text for d in cols[dom]], eng.retriever.encoder, keys=[d.key for d in cols[dom]],
                         tags=[dom], source=sig, chunk_words=96, chunk_overlap=24)
    eng.retriever.sync()
    all_tests = [d for dom in domains for d in test[dom]]
    prev = json.loads(args.resume_from.read_text()) if args.resume_from else None
    if prev is not None:  # the same collections (their signature matched above): its check stands
        leak = {**prev["leakage"], "from": "the first pass (same collections)"}
    else:
        leak = check_no_leak(eng.docs, eng.retriever, [d for dom in domains for d in held[dom]], names)
    timing["data_s"] = time.time() - t0
    log(f"data: {len(all_tests)} tests, leakage check passed {leak}")


    # queries / targets
    queries, targets, owners = [], [], []
    for dom in domains:
        q, t = split_texts([d.text for d in test[dom]], 0.4, 128)
        kept = [d for d in test[dom] if len(d.text.split()) >= 2]
        queries += q
        targets += t
        owners += [(dom, d) for d in kept]
    tok = eng.base.tokenizer
    mm = eng.mixer

    # 3. recall: the fusion weight is chosen on the validation texts, every figure is on the test texts
    t0 = time.time()
    base_scorer = pair_scorer(eng, [])
    vq, _ = split_texts([d.text for dom in domains for d in val[dom] if len(d.text.split()) >= 2], 0.4, 128)
    vowners = [(dom, d) for dom in domains for d in val[dom] if len(d.text.split()) >= 2]
    val_rows = recall_rows(eng, domains, cols, vq, vowners)
    test_rows = recall_rows(eng, domains, cols, queries, owners)
    grid = [round(0.1 * i, 1) for i in range(10, -1, -1)]  # 1.0 first: ties go to the larger dense weight
    val_curve = {w: statistics.mean(recall_of(eng, names, val_rows, DocsConfig(collections=names, passages=5,
                                                                               fusion="mix", dense_weight=w))[0])
                 for w in grid}
    best_w = max(grid, key=lambda w: val_curve[w])  # max keeps the first of equals: the larger weight
    log(f"fusion weight on validation ({len(val_rows)} texts): {val_curve} -> dense_weight {best_w}")
    recall: dict[str, list[float]] = {}
    hit: dict[str, list[float]] = {}
    for m, c in () if prev is not None else (("dense", DocsConfig(collections=names, passages=5, fusion="dense")),
                 ("bm25", DocsConfig(collections=names, passages=5, fusion="bm25")),
                 ("rrf", DocsConfig(collections=names, passages=5, fusion="rrf")),
                 ("fused", DocsConfig(collections=names, passages=5, fusion="mix", dense_weight=best_w)),
                 ("reranked", DocsConfig(collections=names, passages=5, fusion="mix", dense_weight=best_w,
                                         rerank=True, rerank_top=args.rerank_top))):
        recall[m], hit[m] = recall_of(eng, names, test_rows, c, base_scorer if c.rerank else None, tok)
    if prev is not None:
        if prev.get("fusion", {}).get("dense_weight", best_w) != best_w:
            raise SystemExit("the fusion weight differs from the first pass; rerun without --resume-from")
        recall = {m: [prev[f"recall5_{m}"]] for m in ("dense", "bm25", "rrf", "fused", "reranked")}
        hit = {m: [] for m in recall}
    n_related = [len(r[2]) for r in test_rows]
    timing["recall_s"] = time.time() - t0
    log("recall@5: " + ", ".join(f"{m} {statistics.mean(v):.3f}" for m, v in recall.items() if v))

    # 4a. losses without adapters (passages from the tuned mix, no rerank)
    docs_cfg = DocsConfig(collections=names, passages=args.passages, budget=args.budget, fusion="mix",
                          dense_weight=best_w, rerank_top=args.rerank_top)
    t0 = time.time()
    found = [retrieve(eng, q, docs_cfg) for q in queries]
    with_p = [passage_prompt(tok, q, ps, args.budget, chat=False) for q, ps in zip(queries, found, strict=True)]
    without = [passage_prompt(tok, q, [], args.budget, chat=False) for q in queries]
    tgt = [tok(t, add_special_tokens=False)["input_ids"] for t in targets]
    empty: list[list[tuple[str, float]]] = [[] for _ in queries]
    losses: dict[str, dict[str, float]] = {}

    def score(settings: dict[str, tuple[list[Any], list[Any]]]) -> None:
        for name, (prompts, mixes) in settings.items():
            res = score_continuations(eng.mixer, [p.ids for p in prompts], tgt, mixes, batch_size=8)
            per: dict[str, list[float]] = defaultdict(list)
            for s, (d, _) in zip(res, owners, strict=True):
                per[d].append(s.loss)
            losses[name] = {d: statistics.mean(v) for d, v in per.items()}
            losses[name]["mean"] = statistics.mean(losses[name][d] for d in domains)
            log(f"loss {name}: {losses[name]['mean']:.4f}")

    if prev is not None:
        losses.update({"base": {"mean": prev["loss_base"]}, "docs": {"mean": prev["loss_docs"]}})
    else:
        score({"base": (without, empty), "docs": (with_p, empty)})
    timing["loss_base_docs_s"] = time.time() - t0

    # 5. caches: a stream with repeats and shorter variants of each query, served by the base model
    t0 = time.time()
    eng.retriever.hits = eng.retriever.misses = 0
    eng.retriever._cache.clear()
    eng.kv_cache.clear()
    kv = eng.kv_cache
    kv.lookups = kv.hits = kv.passage_hits = kv.tokens_reused = kv.tokens_prefilled = 0
    short, _ = split_texts([d.text for _, d in owners], 0.3, 128)
    n_cache = min(args.cache_queries, len(queries))
    stream = [x for q, s in zip(queries[:n_cache], short[:n_cache], strict=True) for x in (q, q, s)]
    stream = [] if prev is not None else stream
    hit_prompts = []
    for q in stream:
        mix: list[tuple[str, float]] = []
        pp = passage_prompt(tok, q, retrieve(eng, q, docs_cfg, mix), args.budget, chat=True)
        with mm.mixture([mix]), torch.inference_mode():
            pre = prefill(eng, pp.ids, pp.boundaries, mix)
        if pre.reused:
            hit_prompts.append((pp, mix))
    kv_stats, ret_stats = kv.stats(), eng.retriever.stats()["retrieval_cache"]
    # time cached vs full prefill on the prompts that hit, round-robin, logits compared
    cached_ms, full_ms, max_diff = [], [], 0.0
    for pp, mix in hit_prompts[:24]:
        with mm.mixture([mix]), torch.inference_mode():
            for _ in range(2):
                t1 = time.perf_counter()
                full = mm.model(input_ids=torch.tensor([pp.ids])).logits[0, -1]  # (V,)
                full_ms.append((time.perf_counter() - t1) * 1000)
                t1 = time.perf_counter()
                pre = prefill(eng, pp.ids, pp.boundaries, mix)
                cached_ms.append((time.perf_counter() - t1) * 1000)
                max_diff = max(max_diff, float((pre.logits[0, -1] - full).abs().max()))
    timing["cache_s"] = time.time() - t0
    load_at_timing = os.getloadavg()[0]  # the prefill timing is only as quiet as the machine was
    if prev is not None:
        kv_stats, ret_stats, max_diff = prev["kv_prefix_cache"], prev["retrieval_cache"], prev["prefill_logits_max_abs_diff"]
        full_ms, cached_ms = [prev["prefill_ms_full"]], [prev["prefill_ms_cached"]]
        load_at_timing = prev.get("load_avg_1m_after_prefill_timing", float("nan"))
        timing = {**{k: v for k, v in prev["timing"].items()}, **{f"resume_{k}": v for k, v in timing.items()}}

    partial = {"status": "partial: adapters not trained yet", "loss_base": losses["base"]["mean"],
               "loss_docs": losses["docs"]["mean"], **{f"recall5_{m}": statistics.mean(v) for m, v in recall.items() if v},
               "kv_prefix_cache": kv_stats, "retrieval_cache": ret_stats,
               "prefill_ms_full": statistics.mean(full_ms) if full_ms else None,
               "prefill_ms_cached": statistics.mean(cached_ms) if cached_ms else None,
               "prefill_logits_max_abs_diff": max_diff, "leakage": leak, "timing": timing,
               "fusion": {"kind": "mix", "dense_weight": best_w, "val_recall5": val_curve},
               "load_avg_1m_after_prefill_timing": round(load_at_timing, 2)}
    if prev is None:
        (args.out / "report.json").write_text(json.dumps(partial, indent=2))
    log(f"partial: {json.dumps(partial)}")

    # 2. adapters
    t0 = time.time()
    stop = {"eval_every": args.eval_every, "patience": args.patience, "min_delta": args.min_delta,
            "max_seconds": args.max_adapter_seconds}
    tcfg = TrainConfig(steps=args.steps, batch_size=8, seq_len=args.seq_len, lr=args.lr, seed=args.seed, **stop)
    acfg = TrainConfig(steps=args.aware_steps, batch_size=4, seq_len=args.seq_len, lr=args.lr, seed=args.seed, **stop)
    trained = {}
    for dom in domains:
        texts = [d.text for d in train[dom]]
        for kind in [k for k in ("plain", "aware") if k in args.kinds.split(",")]:
            name = f"{kind}-{dom}"
            if name in eng.library:
                continue
            t1 = time.time()
            if kind == "plain":
                rec, rep = eng.train_adapter(name, texts, tcfg, domain_tags=[dom, kind], progress=False)
            else:
                weights, report = train_aware(eng, texts, acfg, docs_cfg, False, name, keys=[d.key for d in train[dom]])
                rng = np.random.default_rng(args.seed)
                ex = [texts[int(i)] for i in rng.choice(len(texts), size=min(256, len(texts)), replace=False)]
                eng.add_weights(weights, name, domain_tags=[dom, kind], examples=ex, meta={"docs": names})
                rep = report.to_dict()
            trained[name] = {"before": rep["eval_loss_before"], "after": rep["eval_loss_after"],
                             "steps": rep["steps"], "best_step": rep["best_step"], "stop": rep["stop_reason"],
                             "eval_curve": [(int(st), round(float(x), 4)) for st, x in rep["eval_curve"]],
                             "seconds": round(time.time() - t1, 1)}
            log(f"trained {name}: eval {rep['eval_loss_before']:.3f} -> {rep['eval_loss_after']:.3f} "
                f"({rep['steps']} steps, best {rep['best_step']}, {rep['stop_reason']}, {time.time() - t1:.0f} s)")
    timing["adapters_s"] = time.time() - t0

    # 4b. losses with routed adapters
    t0 = time.time()
    plain, aware = RouteConfig(k=3, tags=["plain"]), RouteConfig(k=3, tags=["aware"])
    mix_plain = [r.mixture for r in eng.router.route_batch(queries, plain)]
    has_aware = "aware" in args.kinds.split(",")
    mix_aware = [r.mixture for r in eng.router.route_batch(queries, aware)] if has_aware else []
    top1_ok = [eng.library.get(m[0][0]).domain_tags[0] == d for m, (d, _) in zip(mix_plain, owners, strict=True)]
    score({"adapters": (without, mix_plain), "adapters_docs": (with_p, mix_plain),
           **({"aware_docs": (with_p, mix_aware)} if has_aware else {}),
           **({} if args.skip_aware_alone or not has_aware else {"aware": (without, mix_aware)})})
    timing["loss_adapters_s"] = time.time() - t0

    def mean(xs: Sequence[float]) -> float:
        return round(statistics.mean(xs), 4) if xs else float("nan")

    best_alone = min(losses["docs"]["mean"], losses["adapters"]["mean"])
    res: dict[str, Any] = {
        "loss_base": round(losses["base"]["mean"], 4), "loss_docs": round(losses["docs"]["mean"], 4),
        "loss_adapters": round(losses["adapters"]["mean"], 4),
        "loss_adapters_docs": round(losses["adapters_docs"]["mean"], 4),
        "loss_aware_docs": round(losses["aware_docs"]["mean"], 4) if "aware_docs" in losses else None, "loss_aware": round(losses["aware"]["mean"], 4) if "aware" in losses else None,
        "recall5_dense": mean(recall["dense"]), "recall5_bm25": mean(recall["bm25"]),
        "recall5_rrf": mean(recall["rrf"]), "recall5_fused": mean(recall["fused"]),
        "recall5_reranked": mean(recall["reranked"]), "fusion": {"kind": "mix", "dense_weight": best_w,
                                                                  "val_recall5": val_curve, "val_queries": len(val_rows)},
        "target_fused_ge_dense": mean(recall["fused"]) >= mean(recall["dense"]),
        "hit5": {m: mean(v) for m, v in hit.items() if v}, "recall_queries": len(test_rows),
        "related_per_query_median": statistics.median(n_related) if n_related else 0,
        "gain_adapters_docs_vs_best_alone": round(1 - losses["adapters_docs"]["mean"] / best_alone, 4),
        "gain_aware_docs_vs_best_alone": (round(1 - losses["aware_docs"]["mean"] / best_alone, 4)
                                          if "aware_docs" in losses else None),
        "target_5pct_met": losses["adapters_docs"]["mean"] <= 0.95 * best_alone,
        "target_rerank_met": mean(recall["reranked"]) > mean(recall["fused"]),
        "routing_top1_accuracy": mean([float(x) for x in top1_ok]),
        "retrieval_cache": ret_stats, "kv_prefix_cache": kv_stats,
        "prefill_ms_full": mean(full_ms), "prefill_ms_cached": mean(cached_ms),
        "prefill_saved_share": round(1 - statistics.mean(cached_ms) / statistics.mean(full_ms), 4) if full_ms else None,
        "prefill_logits_max_abs_diff": max_diff, "load_avg_1m_after_prefill_timing": round(load_at_timing, 2),
        "cpu_count": os.cpu_count(),
        "losses_per_domain": {k: {d: round(x, 4) for d, x in v.items()} for k, v in losses.items()},
        "adapters": trained, "leakage": leak,
        "resumed_from_first_pass": (["leakage", "recall", "loss_base", "loss_docs", "caches"] if prev is not None
                                    else []),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "n_test": len(queries), "domains": domains, "device": str(next(mm.model.parameters()).device),
        "torch_threads": torch.get_num_threads(), "timing": {k: round(v, 1) for k, v in timing.items()},
        "seconds": round(time.time() - t_start, 1),
    }
    (args.out / "report.json").write_text(json.dumps(res, indent=2))
    if args.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
