#!/usr/bin/env python
"""Quality benchmark on real corpora: experts, routers, mixing and merging, measured on held-out text.

    python bench/quality.py --out DIR [--quick] [--steps N] [--train-per-domain N] [--test-per-domain N]
                            [--domains a,b,c] [--cluster-train] [--refine-per-domain N]

Stages (each timed; an optional one that cannot run is recorded as "skipped: <reason>"):

1. data      ``build_benchmark(domains, train, test, seed)``: split by headword, deduplicated across domains.
2. experts   one adapter per domain, named after it, trained into ``DIR/library`` and keyed by its training
             examples. Cached: an adapter whose name exists with the same fingerprint (domain, training
             texts, TrainConfig, base) in ``meta.source`` is reused; a stale one is retrained. Adapters that
             are not benchmark domains are removed (they would be routed to).
3. routing   held-out texts cut to their first ``--query-chars`` (200) characters at a word boundary are
             the queries (a query, not the document); gold = the text's domain. Routers: ``tfidf``
             (nearest TF-IDF centroid of the training texts), ``untrained`` (strategy semantic, keys =
             mean example embedding), ``supervised`` (``train_supervised_router`` on training texts cut
             the same way, labelled by domain), ``label_free`` (``train_router`` on training texts split
             into query/continuation, no labels), ``arrow`` (weights only), and ``clusters`` (k-means
             segments of the training texts: ARI vs the domains; routing to segment keys mapped to each
             segment's majority domain).
4. loss      mean token NLL of the full held-out texts under base, oracle, routed_top1 and routed_mix
             (best engine router by top-1; top-3 softmax mixture) and uniform (all adapters in one row).
5. merged    all adapters merged with weights 1/N: merged_linear = exact average of the deltas (method
             "cat"; PEFT's factor-wise "linear" has cross terms and is reported as merged_linear_peft),
             merged_ties = TIES (density 0.5) on the dense deltas, SVD back to rank sum(ranks) ("ties_svd").
6. refine    ``loramix.refine.refine_eval`` on a few held-out (query, continuation) pairs.
7. report    DIR/report.json, DIR/report.md, DIR/confusion.png, DIR/loss_bars.png.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from quality_lib import NOTES, PRESETS, QUICK_DOMAINS, SETTING_NOTES  # bench/ is sys.path[0]

ROUTE_CHUNK = 32  # queries per route_batch call (arrow runs the base model on a whole batch at once)
SCORE_CHUNK = 48  # texts per score_texts call (progress granularity)
console = Console(highlight=False)


class Skip(Exception):
    """An optional stage cannot run (e.g. a module that has not landed)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    f, q = PRESETS["full"], PRESETS["quick"]

    def dflt(key: str) -> str:
        return f" (default {f[key]}; --quick {q[key]})"

    p.add_argument("--out", required=True, type=Path, help="output folder (library, report, plots)")
    p.add_argument("--quick", action="store_true", help=f"{len(QUICK_DOMAINS)} domains, fewer steps and texts")
    p.add_argument("--domains", help="comma-separated domains (default: all 18; quick: " + ",".join(QUICK_DOMAINS) + ")")
    p.add_argument("--steps", type=int, help="training steps per expert" + dflt("steps"))
    p.add_argument("--lr", type=float, default=1e-3, help="expert learning rate (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=96,
                   help="expert training sequence length in tokens (default %(default)s)")
    p.add_argument("--train-per-domain", type=int, help="training texts per domain" + dflt("train_per_domain"))
    p.add_argument("--test-per-domain", type=int, help="held-out texts per domain" + dflt("test_per_domain"))
    p.add_argument("--router-pairs-per-domain", type=int, help="(query, continuation) pairs per domain for label_free" + dflt("router_pairs_per_domain"))
    p.add_argument("--router-k", type=int, help="candidates per query when training label_free" + dflt("router_k"))
    p.add_argument("--router-steps", type=int, default=None, help="router head steps (default RouterTrainConfig)")
    p.add_argument("--refine-per-domain", type=int, help="held-out prompts per domain for refine, 0: skip" + dflt("refine_per_domain"))
    p.add_argument("--cluster-train", action="store_true",
                   help="also train one expert per k-means segment (DIR/clusters, as many steps as the experts)")
    p.add_argument("--query-chars", type=int, default=200, help="routing queries: first N characters of a text")
    p.add_argument("--base", default=None, help="base model folder (default: loramix's default base)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


def _chunks(items: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from loramix.config import MixConfig, TrainConfig
        from loramix.train.corpora import DOMAINS

        self.args = args
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        names = args.domains.split(",") if args.domains else (QUICK_DOMAINS if args.quick else list(DOMAINS))
        self.domains = [d.strip() for d in names if d.strip()]
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown or len(self.domains) < 2:
            raise SystemExit(f"--domains: need at least 2 of {', '.join(DOMAINS)}; unknown: {unknown}")
        self.tcfg = TrainConfig(steps=args.steps, seed=args.seed, lr=args.lr, seq_len=args.seq_len)
        self.mix_cfg = MixConfig(capacity=max(64, len(self.domains) + 4))
        self.timing: dict[str, dict[str, Any]] = {}
        self.routing: dict[str, dict[str, Any]] = {}
        self.routes: dict[str, list[Any]] = {}  # engine router -> Route per query
        self.loss: dict[str, dict[str, Any]] = {}
        self.report: dict[str, Any] = {"status": "running", "command": "python " + " ".join(sys.argv),
                                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.engine: Any = None

    # --- stage bookkeeping --------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str, optional: bool = False) -> Iterator[dict[str, Any]]:
        console.rule(f"[bold cyan]{name}")
        rec: dict[str, Any] = {"status": "ok"}
        self.timing[name] = rec
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            yield rec
        except Skip as e:
            rec["status"] = f"skipped: {e}"
            console.print(f"[yellow]{name} skipped: {e}")
        except Exception as e:
            if not optional:
                rec["status"] = f"failed: {type(e).__name__}: {e}"
                raise
            rec["status"] = f"skipped: {type(e).__name__}: {e}"
            console.print(f"[yellow]{name} skipped after an error:[/]\n{traceback.format_exc(limit=4)}")
        finally:
            rec["wall_s"] = round(time.perf_counter() - w0, 2)
            rec["cpu_s"] = round(time.process_time() - c0, 2)
            console.print(f"[dim]{name}: {rec['wall_s']:.1f} s wall, {rec['cpu_s']:.1f} s cpu ({rec['status']})")

    @staticmethod
    def need(module: str, *names: str) -> Any:
        """Import ``names`` from ``module`` or Skip with the reason."""
        import importlib

        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            raise Skip(f"{module} is not available ({e})") from None
        missing = [n for n in names if not hasattr(mod, n)]
        if missing:
            raise Skip(f"{module} has no {', '.join(missing)}")
        return [getattr(mod, n) for n in names] if len(names) > 1 else getattr(mod, names[0])

    # --- 1. data ------------------------------------------------------------------------------
    def data(self) -> None:
        from loramix.evaluate.routing import truncate_query
        from loramix.train.corpora import build_benchmark

        with self.stage("data") as rec:
            a = self.args
            self.train, self.test = build_benchmark(self.domains, a.train_per_domain, a.test_per_domain, seed=a.seed)
            empty = [d for d in self.domains if len(self.train[d]) < 8 or not self.test[d]]
            if empty:
                raise SystemExit(f"domains with too few texts: {empty}")
            self.test_docs = [doc for d in self.domains for doc in self.test[d]]
            self.queries = [truncate_query(doc.text, a.query_chars) for doc in self.test_docs]
            self.gold = [doc.domain for doc in self.test_docs]
            rec["train"] = {d: len(self.train[d]) for d in self.domains}
            rec["test"] = {d: len(self.test[d]) for d in self.domains}
            console.print(f"{len(self.domains)} domains; train {sum(rec['train'].values())} texts, "
                          f"test {len(self.test_docs)} texts")

    # --- 2. experts ---------------------------------------------------------------------------
    def fingerprint(self, domain: str, texts: Sequence[str]) -> str:
        h = hashlib.sha256(json.dumps({"domain": domain, "train": asdict(self.tcfg), "base": str(self.base_path)},
                                      sort_keys=True).encode())
        for t in texts:
            h.update(t.encode() + b"\0")
        return f"quality-bench:{domain}:{h.hexdigest()[:16]}"

    def experts(self) -> None:
        from loramix.app import Loramix

        with self.stage("experts") as rec:
            self.engine = eng = Loramix(self.out / "library", self.args.base, mix=self.mix_cfg)
            self.base_path = eng.base_path()
            lib = eng.library
            for r in lib.list():
                if r.name not in self.domains:
                    console.print(f"[yellow]removing adapter {r.name!r}: not a benchmark domain of this run")
                    eng.remove_adapter(r.name)
            rec["trained"], rec["reused"], rec["experts"] = [], [], {}
            for i, d in enumerate(self.domains, 1):
                texts = [doc.text for doc in self.train[d]]
                fp = self.fingerprint(d, texts)
                if d in lib:
                    old = lib.get(d)
                    if old.meta.get("source") == fp:
                        rec["reused"].append(d)
                        rec["experts"][d] = old.meta.get("train", {})
                        console.print(f"[{i}/{len(self.domains)}] {d}: reusing cached adapter ({fp})")
                        continue
                    console.print(f"[yellow]{d}: cached adapter has another config; retraining")
                    eng.remove_adapter(d)
                console.print(f"[{i}/{len(self.domains)}] training {d}: {len(texts)} texts, {self.tcfg.steps} steps")
                _, report = eng.train_adapter(d, texts, self.tcfg, description=f"{d} expert (quality benchmark)",
                                              domain_tags=[d], source=fp, progress=True)
                rec["trained"].append(d)
                rec["experts"][d] = {k: v for k, v in report.items() if k != "losses"}
                console.print(f"  eval loss {report['eval_loss_before']:.3f} -> {report['eval_loss_after']:.3f} "
                              f"in {report['seconds']:.0f} s")
            eng.router.sync()
            self.ids = {d: lib.get(d).id for d in self.domains}
            self.name_of = {v: k for k, v in self.ids.items()}
            n_steps = len(rec["trained"]) * self.tcfg.steps
            if n_steps:
                rec["s_per_step"] = round(sum(rec["experts"][d]["seconds"] for d in rec["trained"]) / n_steps, 3)

    # --- 3. routing ---------------------------------------------------------------------------
    def _route_all(self, strategy: str, label: str) -> list[Any]:
        from loramix.config import RouteConfig

        cfg = RouteConfig(k=3, strategy=strategy)
        out: list[Any] = []
        with _progress() as bar:
            task = bar.add_task(f"route {label}", total=len(self.queries))
            for chunk in _chunks(self.queries, ROUTE_CHUNK):
                out += self.engine.router.route_batch(list(chunk), cfg)
                bar.advance(task, len(chunk))
        return out

    def _measure(self, router: str, ranked: list[list[str]], rec: dict[str, Any], **extra: Any) -> None:
        from loramix.evaluate.routing import routing_accuracy

        acc = routing_accuracy(ranked, self.gold, (1, 3))
        self.routing[router] = {**acc, **extra}
        rec.update(top1=acc["top1"], top3=acc["top3"])
        console.print(f"{router}: top-1 {acc['top1']:.3f}, top-3 {acc['top3']:.3f}")

    def _engine_router(self, router: str, strategy: str, rec: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        routes = self._route_all(strategy, router)
        self.routes[router] = routes
        ranked = [[self.name_of.get(a.id, a.name) for a in r.adapters] for r in routes]
        self._measure(router, ranked, rec, strategy=strategy, seconds=round(time.perf_counter() - t0, 2))

    def route_tfidf(self) -> None:
        from loramix.evaluate.routing import TfidfCentroidRouter

        with self.stage("route:tfidf", optional=True) as rec:
            docs = [doc for d in self.domains for doc in self.train[d]]
            t0 = time.perf_counter()
            tf = TfidfCentroidRouter().fit([doc.text for doc in docs], [doc.domain for doc in docs])
            self._measure("tfidf", tf.rank(self.queries, k=3), rec, seconds=round(time.perf_counter() - t0, 2))

    def route_untrained(self) -> None:
        with self.stage("route:untrained", optional=True) as rec:
            self._engine_router("untrained", "semantic", rec)

    def route_supervised(self) -> None:
        from loramix.evaluate.routing import truncate_query

        with self.stage("route:supervised", optional=True) as rec:
            train = self.need("loramix.train.router", "train_supervised_router")
            RouterTrainConfig = self.need("loramix.config", "RouterTrainConfig")
            docs = [doc for d in self.domains for doc in self.train[d]]
            cfg = RouterTrainConfig(seed=self.args.seed, **({"steps": self.args.router_steps} if self.args.router_steps else {}))
            rep = train(self.engine, [truncate_query(doc.text, self.args.query_chars) for doc in docs],
                        [doc.domain for doc in docs], cfg, progress=True)
            rec["train"] = rep.to_dict() if hasattr(rep, "to_dict") else str(rep)
            self._engine_router("supervised", "supervised", rec)

    def route_label_free(self) -> None:
        with self.stage("route:label_free", optional=True) as rec:
            train, split = self.need("loramix.train.router", "train_router", "split_texts")
            RouterTrainConfig = self.need("loramix.config", "RouterTrainConfig")
            n = self.args.router_pairs_per_domain
            texts = [doc.text for d in self.domains for doc in self.train[d][:n]]  # domain-balanced, labels unused
            queries, targets = split(texts)
            cfg = RouterTrainConfig(k=max(2, min(self.args.router_k, len(self.domains))), seed=self.args.seed,
                                    **({"steps": self.args.router_steps} if self.args.router_steps else {}))
            rep = train(self.engine, queries, targets, cfg, progress=True)
            rec["train"] = rep.to_dict() if hasattr(rep, "to_dict") else str(rep)
            rec["pairs"] = len(queries)
            self._engine_router("label_free", "trained", rec)

    def route_arrow(self) -> None:
        with self.stage("route:arrow", optional=True) as rec:
            self.need("loramix.route.arrow", "arrow")
            self._engine_router("arrow", "arrow", rec)

    def clusters(self) -> None:
        from loramix.evaluate.routing import map_ranking, rank_by_scores, routing_accuracy

        self.report["clusters"] = {"skipped": "did not run"}
        with self.stage("clusters", optional=True) as rec:
            cluster_texts, segment_ari = self.need("loramix.train.experts", "cluster_texts", "segment_ari")
            docs = [doc for d in self.domains for doc in self.train[d]]
            texts, labels = [doc.text for doc in docs], [doc.domain for doc in docs]
            n = len(self.domains)
            res: dict[str, Any] = {"clusters": n, "texts": len(texts)}
            if self.args.cluster_train:
                res |= self._cluster_experts(texts, labels)
            else:
                from loramix.evaluate.routing import majority_labels

                seg, cents = cluster_texts(texts, n, self.engine.router.encoder, self.args.seed)
                res["ari"] = segment_ari(seg, labels)
                # a cluster expert's routing key is the mean embedding of its segment = the k-means centroid
                keys = cents / ((cents**2).sum(axis=1, keepdims=True) ** 0.5 + 1e-12)
                qvecs = self.engine.router.encoder.encode(self.queries)
                ranked = rank_by_scores(qvecs @ keys.T, list(range(n)))
                mapping = majority_labels(seg.tolist(), labels)
                res["routing"] = "keys only: segment-mean keys (what the router would store), no cluster experts trained"
                res |= routing_accuracy(map_ranking(ranked, mapping), self.gold)
                res["majority"] = {str(c): lb for c, lb in sorted(mapping.items())}
            res["unmapped_domains"] = sorted(set(self.domains) - set(res.get("majority", {}).values()))
            self.report["clusters"] = res
            rec.update({k: res.get(k) for k in ("ari", "top1", "top3")})
            console.print(f"clusters: ARI {res['ari']:.3f}, mapped top-1 {res.get('top1', float('nan')):.3f}")

    def _cluster_experts(self, texts: list[str], labels: list[str]) -> dict[str, Any]:
        """Train one expert per k-means segment (train_experts) in DIR/clusters and route to them."""
        from collections import Counter

        from loramix.app import Loramix
        from loramix.config import RouteConfig
        from loramix.evaluate.report import loss_table
        from loramix.evaluate.routing import map_ranking, routing_accuracy
        from loramix.evaluate.score import score_texts

        train_experts = self.need("loramix.train.experts", "train_experts")
        home = self.out / "clusters"
        shutil.rmtree(home, ignore_errors=True)  # segment names are fixed: retrain from scratch
        ce = Loramix(home, self.args.base, mix=self.mix_cfg)
        rep = train_experts(ce, texts, len(self.domains), self.tcfg, prefix="cluster", seed=self.args.seed,
                            true_labels=labels, source="quality-bench clusters", progress=True, log=console.print)
        mapping = {s["name"]: Counter(s["labels"]).most_common(1)[0][0] for s in rep["segments"] if s.get("labels")}
        routes: list[Any] = []
        for chunk in _chunks(self.queries, ROUTE_CHUNK):
            routes += ce.router.route_batch(list(chunk), RouteConfig(k=3, strategy="semantic"))
        ranked = map_ranking([[a.name for a in r.adapters] for r in routes], mapping)
        scores = score_texts(ce.mixer, [d.text for d in self.test_docs], [r.mixture for r in routes])
        per: dict[str, list[float]] = {}
        for doc, s in zip(self.test_docs, scores, strict=True):
            per.setdefault(doc.domain, []).append(s.loss)
        self.loss["clusters_mix"] = loss_table(per, self.domains)
        return {"ari": rep["ari"], "routing": "semantic routing to trained cluster experts", "majority": mapping,
                **routing_accuracy(ranked, self.gold), "skipped_segments": len(rep["skipped"])}

    # --- 4./5. loss ---------------------------------------------------------------------------
    def _score(self, mm: Any, label: str, mixtures: list[Any]) -> list[float]:
        from loramix.evaluate.score import score_texts

        texts = [doc.text for doc in self.test_docs]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = [float("nan")] * len(texts)
        t0 = time.perf_counter()
        with _progress() as bar:
            task = bar.add_task(f"score {label}", total=len(texts))
            for chunk in _chunks(order, SCORE_CHUNK):
                for i, s in zip(chunk, score_texts(mm, [texts[i] for i in chunk], [mixtures[i] for i in chunk]),
                                strict=True):
                    out[i] = s.loss
                bar.advance(task, len(chunk))
        self.report.setdefault("score_seconds", {})[label] = round(time.perf_counter() - t0, 2)
        return out

    def _record_loss(self, setting: str, losses: list[float]) -> None:
        from loramix.evaluate.report import loss_table

        per: dict[str, list[float]] = {}
        for doc, x in zip(self.test_docs, losses, strict=True):
            per.setdefault(doc.domain, []).append(x)
        self.loss[setting] = loss_table(per, self.domains)
        console.print(f"{setting}: mean loss {self.loss[setting]['mean']:.4f}")

    def losses(self) -> None:
        from loramix.evaluate.report import best_router, skipped

        with self.stage("loss") as rec:
            best = best_router(self.routing)
            self.report["best_router"] = best
            n = len(self.domains)
            mixtures: dict[str, list[Any]] = {
                "base": [[] for _ in self.test_docs],
                "oracle": [[(self.ids[doc.domain], 1.0)] for doc in self.test_docs],
                "uniform": [[(self.ids[d], 1.0 / n) for d in self.domains] for _ in self.test_docs],
            }
            if best is not None:
                routes = self.routes[best]
                mixtures["routed_top1"] = [[(r.adapters[0].id, 1.0)] if r.adapters else [] for r in routes]
                mixtures["routed_mix"] = [r.mixture for r in routes]
            else:
                for s in ("routed_top1", "routed_mix"):
                    self.loss[s] = skipped("no engine router ran")
            mm = self.engine.mixer
            for setting in ("base", "oracle", "routed_top1", "routed_mix", "uniform"):
                if setting in mixtures:
                    self._record_loss(setting, self._score(mm, setting, mixtures[setting]))
            rec["rows"] = len(self.test_docs) * len(mixtures)

    def merged(self) -> None:
        from loramix.base import load_base
        from loramix.config import MixConfig
        from loramix.evaluate.report import skipped
        from loramix.mix import MixedModel, merge

        for s in ("merged_linear", "merged_ties"):
            self.loss[s] = skipped("merge stage did not finish")
        with self.stage("merged", optional=True) as rec:
            lib, n = self.engine.library, len(self.domains)
            weights = [lib.load(self.ids[d]) for d in self.domains]
            coeffs = [1.0 / n] * n
            ranks = sum(w.rank for w in weights)
            t0 = time.perf_counter()
            merged = {"merged_linear": merge(weights, coeffs, "cat"),
                      "merged_ties": merge(weights, coeffs, "ties_svd", density=0.5, svd_rank=ranks, seed=self.args.seed),
                      "merged_linear_peft": merge(weights, coeffs, "linear")}
            rec["merge_seconds"] = round(time.perf_counter() - t0, 2)
            rec["ranks"] = {k: v.rank for k, v in merged.items()}
            mm = MixedModel(load_base(self.args.base), merged.__getitem__,
                            MixConfig(capacity=4, max_rank=max(w.rank for w in merged.values())))
            for name in merged:
                self._record_loss(name, self._score(mm, name, [[(name, 1.0)]] * len(self.test_docs)))
            del mm

    # --- 6. refine ----------------------------------------------------------------------------
    def refine(self) -> None:
        self.report["refine"] = {"skipped": "did not run"}
        with self.stage("refine", optional=True) as rec:
            if self.args.refine_per_domain <= 0:
                raise Skip("--refine-per-domain 0")
            refine_eval = self.need("loramix.refine", "refine_eval")
            split = self.need("loramix.train.router", "split_texts")
            from loramix.config import RefineConfig, RouteConfig
            from loramix.evaluate.report import STRATEGY_OF

            best = self.report.get("best_router")
            if best is None:
                raise Skip("no engine router ran")
            texts = [doc.text for d in self.domains for doc in self.test[d][: self.args.refine_per_domain]]
            prompts, targets = split(texts)
            res = refine_eval(self.engine, prompts, targets, RouteConfig(k=3, strategy=STRATEGY_OF[best]),
                              RefineConfig(enabled=True))
            keep = ("n", "triggered", "changed", "loss_without", "loss_with", "delta", "improved", "worsened", "chosen")
            self.report["refine"] = {"router": best, "config": asdict(RefineConfig(enabled=True)),
                                     **{k: res.get(k) for k in keep}}
            rec.update({k: res.get(k) for k in ("n", "delta")})
            console.print(f"refine: loss {res['loss_without']:.4f} -> {res['loss_with']:.4f} "
                          f"({res['changed']}/{res['n']} changed)")

    # --- 7. report ----------------------------------------------------------------------------
    def write(self, error: str | None = None) -> None:
        from loramix.evaluate.report import (
            ROUTERS,
            SETTINGS,
            evaluate_targets,
            plot_confusion,
            plot_loss_bars,
            render_markdown,
            skipped,
            write_report_json,
        )
        from loramix.evaluate.routing import confusion_matrix

        for s in SETTINGS:
            self.loss.setdefault(s, skipped("stage did not run"))
        for r in ROUTERS:
            reason = next((t["status"] for k, t in self.timing.items() if k == f"route:{r}" and t["status"] != "ok"),
                          "stage did not run")
            self.routing.setdefault(r, skipped(reason, ("top1", "top3")))
        order = [*SETTINGS, *sorted(set(self.loss) - set(SETTINGS))]
        self.report["loss"] = {s: self.loss[s] for s in order}
        self.report["routing"] = {r: self.routing[r] for r in [*ROUTERS, *sorted(set(self.routing) - set(ROUTERS))]}
        self.report["targets"] = evaluate_targets(self.report["loss"], self.report["routing"])
        total = sum(t.get("wall_s", 0) for t in self.timing.values())
        self.report["timing"] = {**self.timing, "total": {"wall_s": round(total, 1), "status": "sum of stages"}}
        self.report["config"] = self.config()
        self.report["status"] = "failed" if error else "complete"
        if error:
            self.report["error"] = error
        self.report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.report["notes"] = list(NOTES)
        u, m = self.loss["uniform"].get("mean"), self.loss["merged_linear"].get("mean")
        if u is not None and m is not None:  # 1/N of every adapter in one row == the averaged delta
            self.report["sanity"] = {"uniform_minus_merged_linear": u - m, "ok": abs(u - m) < 1e-3}
            self.report["notes"].append(f"Sanity: uniform and merged_linear are the same model (the mean of the "
                                        f"deltas), and their mean losses differ by {u - m:+.2e}.")
        plots: dict[str, str] = {}
        best = self.report.get("best_router")
        try:
            if best in self.routes and hasattr(self, "name_of"):
                pred = [self.name_of.get(r.adapters[0].id) if r.adapters else None for r in self.routes[best]]
                m = confusion_matrix(pred, self.gold, self.domains)
                self.report["confusion"] = {"router": best, "labels": self.domains, "matrix": m.tolist()}
                plot_confusion(m, self.domains, self.out / "confusion.png", f"routing confusion: {best} (top-1)")
                plots[f"Routing confusion ({best})"] = "confusion.png"
            if any(self.loss[s].get("mean") is not None for s in self.loss):
                plot_loss_bars(self.report["loss"], self.domains, self.out / "loss_bars.png")
                plots["Loss per domain and setting"] = "loss_bars.png"
        except Exception:  # a plot must not lose the numbers
            console.print(f"[red]plotting failed:[/]\n{traceback.format_exc(limit=3)}")
        write_report_json(self.out / "report.json", self.report, strict=error is None)
        (self.out / "report.md").write_text(render_markdown(self.report, plots), encoding="utf-8")
        console.print(f"wrote {self.out / 'report.json'} and {self.out / 'report.md'}")

    def config(self) -> dict[str, Any]:
        from loramix.config import RouteConfig

        a = self.args
        return {"mode": "quick" if a.quick else "full", "domains": self.domains, "seed": a.seed,
                "train_per_domain": a.train_per_domain, "test_per_domain": a.test_per_domain,
                "n_test": len(getattr(self, "test_docs", [])), "query_chars": a.query_chars,
                "train": asdict(self.tcfg), "mix": asdict(self.mix_cfg),
                "route": {"k": 3, "weights": "softmax", "temperature": RouteConfig().temperature},
                "router_pairs_per_domain": a.router_pairs_per_domain, "router_k": a.router_k,
                "router_steps": a.router_steps, "refine_per_domain": a.refine_per_domain,
                "cluster_train": a.cluster_train, "base": str(getattr(self, "base_path", a.base or "default")),
                "library": str(self.out / "library"), "settings": SETTING_NOTES}

    def run(self) -> int:
        t0 = time.perf_counter()
        error = None
        try:
            self.data()
            self.experts()
            for step in (self.route_tfidf, self.route_untrained, self.route_supervised, self.route_label_free,
                         self.route_arrow, self.clusters, self.losses, self.merged, self.refine):
                step()
        except (Exception, KeyboardInterrupt) as e:
            error = f"{type(e).__name__}: {e}"
            console.print(f"[red]benchmark failed:[/]\n{traceback.format_exc()}")
        finally:
            self.write(error)
        console.rule(f"done in {time.perf_counter() - t0:.0f} s")
        self.summary()
        return 1 if error else 0

    def summary(self) -> None:
        from rich.table import Table

        t = Table("setting", "mean loss")
        for s, e in self.report["loss"].items():
            t.add_row(s, "–" if e.get("mean") is None else f"{e['mean']:.4f}")
        console.print(t)
        t = Table("router", "top-1", "top-3")
        for r, e in self.report["routing"].items():
            t.add_row(r, *("–" if e.get(k) is None else f"{e[k]:.3f}" for k in ("top1", "top3")))
        console.print(t)
        for name, tg in self.report["targets"].items():
            console.print(f"target {name}: {tg['value']} -> {tg['pass']}")


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # run() then still writes the partial report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    return Bench(args).run()


if __name__ == "__main__":
    raise SystemExit(main())
