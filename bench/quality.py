#!/usr/bin/env python
"""Quality benchmark on real corpora: experts, routers judged by the loss they deliver, mixing, merging, refine.

    python bench/quality.py --out DIR [--quick] [--domains a,b,c] [--steps N] [--expert-seconds S]
                            [--train-per-domain N] [--val-per-domain N] [--test-per-domain N]

Stages (each timed; an optional one that cannot run is recorded as "skipped: <reason>"):

1. data      ``build_benchmark``: train / held-out split by headword, deduplicated across domains; the
             held-out texts are cut again by headword into a validation split (``--val-per-domain``) and
             a test split. Every choice (best router, router hyper-parameters, refine thresholds) is
             made on validation; every reported figure is on test.
2. experts   one adapter per domain, trained to a plateau of its own held-out loss (eval every 10
             steps, patience 3, at most ``--steps`` steps and ``--expert-seconds`` seconds), into
             ``DIR/library``, keyed by its training examples (condition a). ``DIR/library_desc`` holds
             the same weights keyed by a one-line description only (condition b, ``DESCRIPTIONS``).
             Both cached by fingerprint (domain, texts, TrainConfig, base).
3. routers   tfidf (floor), untrained (keys), label_free (perplexity-distilled head: (query,
             continuation) pairs from the training texts, no labels; early stopping, tau and the
             interpolation with the keys picked on held-out pairs; the verdict stored with the head),
             supervised (linear head over frozen MiniLM, cross-entropy, 300 labelled texts per domain
             cut like the queries, tuned on held-out texts), arrow (weights only; with a diagnostic of
             its prototypes). In condition b: untrained and label_free. Each router routes the val
             and test queries (first ``--query-chars`` characters of a held-out text) and the
             hand-written questions (``bench/questions.jsonl``); its top-1 and top-3 mixtures are
             scored on the full held-out texts (cached in ``DIR/scores.json``).
4. loss      base, oracle, uniform, and routed_top1 / routed_mix of the best router (lowest validation
             loss of its top-3 mixture).
5. merged    uniform merges (exact average, TIES).
6. refine    thresholds calibrated on validation prompts (a forced run scores every choice), applied on
             test; the routed-to-oracle loss gap recovered on the hard subset (first route wrong).
7. report    DIR/report.json, DIR/report.md, DIR/confusion.png, DIR/loss_bars.png.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loramix.evaluate.report import RERANK_OF, STRATEGY_OF
from quality_eval import (
    RouterRun,
    Scorer,
    arrow_diagnostics,
    macro,
    plot_arrow,
    query_target,
    split_val_test,
    top1_mix,
)
from quality_lib import DESCRIPTIONS, NOTES, PRESETS, QUICK_DOMAINS, SETTING_NOTES  # bench/ is sys.path[0]

ROUTE_CHUNK = 32
QUESTIONS = Path(__file__).resolve().parent / "questions.jsonl"
ENGINE_ROUTERS = STRATEGY_OF  # the report's routers that are engine strategies, with their strategy names
DESC_ROUTERS = ("untrained", "label_free", "likelihood", "label_free_likelihood")
SKIPPABLE = ("clusters", "merged", "refine")
console = Console(highlight=False)


class Skip(Exception):
    """An optional stage cannot run."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    f, q = PRESETS["full"], PRESETS["quick"]

    def dflt(key: str) -> str:
        return f" (default {f[key]}; --quick {q[key]})"

    p.add_argument("--out", required=True, type=Path, help="output folder (libraries, caches, report, plots)")
    p.add_argument("--quick", action="store_true", help=f"{len(QUICK_DOMAINS)} domains, smaller budgets")
    p.add_argument("--domains", help="comma-separated domains (default: all 18; quick: " + ",".join(QUICK_DOMAINS) + ")")
    p.add_argument("--steps", type=int, help="max training steps per expert" + dflt("steps"))
    p.add_argument("--expert-seconds", type=float, help="time budget per expert" + dflt("expert_seconds"))
    p.add_argument("--lr", type=float, default=2e-3, help="expert learning rate (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=64, help="expert training sequence length (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="expert training batch size (default %(default)s)")
    p.add_argument("--score-chars", type=int, default=0,
                   help="score each held-out text's first N characters (word boundary); 0: the whole text")
    p.add_argument("--train-per-domain", type=int, help="training texts per domain" + dflt("train_per_domain"))
    p.add_argument("--val-per-domain", type=int, help="validation texts per domain" + dflt("val_per_domain"))
    p.add_argument("--test-per-domain", type=int, help="test texts per domain" + dflt("test_per_domain"))
    p.add_argument("--router-pairs-per-domain", type=int, help="label_free (query, continuation) pairs per domain" + dflt("router_pairs_per_domain"))
    p.add_argument("--router-k", type=int, help="label_free candidates per query" + dflt("router_k"))
    p.add_argument("--router-steps", type=int, default=None, help="router head steps (default RouterTrainConfig)")
    p.add_argument("--target-words", type=int, default=32, help="label_free continuation length in words")
    p.add_argument("--refine-per-domain", type=int, help="val prompts per domain for refine calibration, 0: skip" + dflt("refine_per_domain"))
    p.add_argument("--query-chars", type=int, default=200, help="routing queries: first N characters of a text")
    p.add_argument("--base", default=None, help="base model folder (default: loramix's default base)")
    p.add_argument("--stop-after", choices=["data", "experts"], help="stop after this stage (to warm the caches)")
    p.add_argument("--skip", default="", help=f"comma-separated optional stages to leave out ({', '.join(SKIPPABLE)}); "
                                              "they are reported as skipped")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    bad = sorted(set(filter(None, args.skip.split(","))) - set(SKIPPABLE))
    if bad:
        p.error(f"--skip: unknown stage(s) {', '.join(bad)}; expected some of {', '.join(SKIPPABLE)}")
    preset = PRESETS["quick" if args.quick else "full"]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def _chunks(items: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _rel(path: Path) -> str:
    """A path as the report may name it: relative to the working directory, else a placeholder."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return "OUT"


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
        self.tcfg = TrainConfig(steps=args.steps, seed=args.seed, lr=args.lr, seq_len=args.seq_len, eval_every=10,
                                batch_size=args.batch_size,
                                patience=3, min_delta=0.005, max_seconds=args.expert_seconds)
        self.mix_cfg = MixConfig(capacity=max(64, len(self.domains) + 4))
        self.timing: dict[str, dict[str, Any]] = {}
        self.routing: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, RouterRun]] = {"a": {}, "b": {}}
        self.loss: dict[str, dict[str, Any]] = {}
        argv = ["--out", _rel(args.out)]
        rest = list(sys.argv[1:])
        if "--out" in rest:
            i = rest.index("--out")
            rest = rest[:i] + rest[i + 2:]
        self.report: dict[str, Any] = {"status": "running", "command": " ".join(["python bench/quality.py", *argv, *rest]),
                                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.engine: Any = None
        self.desc: Any = None

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
            console.print(f"[yellow]{name} skipped after an error:[/]\n{traceback.format_exc(limit=6)}")
        finally:
            rec["wall_s"] = round(time.perf_counter() - w0, 2)
            rec["cpu_s"] = round(time.process_time() - c0, 2)
            console.print(f"[dim]{name}: {rec['wall_s']:.1f} s wall, {rec['cpu_s']:.1f} s cpu ({rec['status']})")

    # --- 1. data ------------------------------------------------------------------------------
    def data(self) -> None:
        from loramix.evaluate.routing import truncate_query
        from loramix.train.corpora import build_benchmark

        with self.stage("data") as rec:
            a = self.args
            self.train, held = build_benchmark(self.domains, a.train_per_domain, a.val_per_domain + a.test_per_domain,
                                               seed=a.seed)
            self.val, self.test = {}, {}
            for d in self.domains:
                self.val[d], self.test[d] = split_val_test(held[d], a.val_per_domain, a.seed, d)
            empty = [d for d in self.domains if len(self.train[d]) < 8 or not self.test[d] or not self.val[d]]
            if empty:
                raise SystemExit(f"domains with too few texts: {empty}")
            self.sets: dict[str, dict[str, list[str]]] = {}
            for split, docs in (("val", self.val), ("test", self.test)):
                flat = [doc for d in self.domains for doc in docs[d]]
                cut = (lambda t: truncate_query(t, a.score_chars)) if a.score_chars else (lambda t: t)
                self.sets[split] = {"texts": [cut(doc.text) for doc in flat], "gold": [doc.domain for doc in flat],
                                    "queries": [truncate_query(doc.text, a.query_chars) for doc in flat]}
            qs = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
            qs = [q for q in qs if q["domain"] in self.domains]
            self.sets["questions"] = {"queries": [q["question"] for q in qs], "gold": [q["domain"] for q in qs],
                                      "texts": []}
            self.test_docs = [doc for d in self.domains for doc in self.test[d]]
            self.gold = self.sets["test"]["gold"]
            rec["train"] = {d: len(self.train[d]) for d in self.domains}
            rec["val"] = {d: len(self.val[d]) for d in self.domains}
            rec["test"] = {d: len(self.test[d]) for d in self.domains}
            rec["questions"] = len(qs)
            console.print(f"{len(self.domains)} domains; train {sum(rec['train'].values())}, val "
                          f"{sum(rec['val'].values())}, test {len(self.test_docs)} texts, {len(qs)} questions")

    # --- 2. experts ---------------------------------------------------------------------------
    def fingerprint(self, domain: str, texts: Sequence[str]) -> str:
        h = hashlib.sha256(json.dumps({"domain": domain, "train": asdict(self.tcfg), "base": self.base_path.name},
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
                    eng.remove_adapter(r.name)
            rec["trained"], rec["reused"], rec["experts"] = [], [], {}
            self.fp: dict[str, str] = {}
            for i, d in enumerate(self.domains, 1):
                texts = [doc.text for doc in self.train[d]]
                fp = self.fp[d] = self.fingerprint(d, texts)
                if d in lib:
                    old = lib.get(d)
                    if old.meta.get("source") == fp:
                        rec["reused"].append(d)
                        rec["experts"][d] = old.meta.get("train", {})
                        console.print(f"[{i}/{len(self.domains)}] {d}: reusing cached adapter")
                        continue
                    eng.remove_adapter(d)
                console.print(f"[{i}/{len(self.domains)}] training {d}: {len(texts)} texts, <= {self.tcfg.steps} steps, "
                              f"<= {self.tcfg.max_seconds} s")
                _, report = eng.train_adapter(d, texts, self.tcfg, description=f"{d} expert (quality benchmark)",
                                              domain_tags=[d], source=fp, progress=True)
                rec["trained"].append(d)
                rec["experts"][d] = {k: v for k, v in report.items() if k != "losses"}
                console.print(f"  eval loss {report['eval_loss_before']:.3f} -> {report['eval_loss_after']:.3f} in "
                              f"{report['steps']} steps, {report['seconds']:.0f} s ({report['stop_reason']})")
            eng.router.sync()
            self.ids = {d: lib.get(d).id for d in self.domains}
            self.name_of = {v: k for k, v in self.ids.items()}
            ex = rec["experts"]
            rec["stop_reasons"] = {d: ex[d].get("stop_reason") for d in self.domains}
            rec["steps"] = {d: ex[d].get("steps") for d in self.domains}
            rec["eval_loss_after"] = {d: ex[d].get("eval_loss_after") for d in self.domains}
            self.scorer = Scorer(self.out / "scores.json", lambda: self.engine.mixer, self.ids,
                                 {d: self.fp[d] for d in self.domains})

    def desc_library(self) -> None:
        """Condition b: the same weights in a second library, keyed by a one-line description only."""
        from loramix.app import Loramix

        with self.stage("desc_library") as rec:
            self.desc = eng = Loramix(self.out / "library_desc", self.args.base, mix=self.mix_cfg)
            lib = eng.library
            for r in lib.list():
                if r.name not in self.domains or r.meta.get("source") != self.fp.get(r.name):
                    eng.remove_adapter(r.name)
            for d in self.domains:
                if d not in lib:
                    eng.add_weights(self.engine.library.load(self.ids[d]), d, description=DESCRIPTIONS[d],
                                    meta={"source": self.fp[d]})
            eng.router.sync()
            self.desc_name_of = {lib.get(d).id: d for d in self.domains}
            rec["descriptions"] = {d: DESCRIPTIONS[d] for d in self.domains}

    # --- 3. routers ---------------------------------------------------------------------------
    @staticmethod
    def route_cfg(router: str) -> Any:
        """The RouteConfig of an engine router of the report (top-3)."""
        from loramix.config import RouteConfig

        return RouteConfig(k=3, strategy=ENGINE_ROUTERS[router], rerank=RERANK_OF.get(router, "none"))

    def _route(self, eng: Any, name_of: dict[str, str], router: str) -> RouterRun:
        run = RouterRun()
        t0 = time.perf_counter()
        cfg = self.route_cfg(router)
        strategy = f"{cfg.strategy}, rerank {cfg.rerank}"
        for split in ("val", "test", "questions"):
            qs = self.sets[split]["queries"]
            routes: list[Any] = []
            for chunk in _chunks(qs, ROUTE_CHUNK):
                routes += eng.router.route_batch(list(chunk), cfg)
            run.ranked[split] = [[name_of.get(a.id, a.name) for a in r.adapters] for r in routes]
            run.mix3[split] = [[(name_of.get(a.id, a.name), a.weight) for a in r.adapters] for r in routes]
        run.seconds = time.perf_counter() - t0
        console.print(f"routed {router} ({strategy}) in {run.seconds:.1f} s")
        return run

    def _judge(self, cond: str, router: str, run: RouterRun, rec: dict[str, Any], **extra: Any) -> None:
        """Accuracy on val/test/questions and the loss of the top-1 and top-3 mixtures on val and test."""
        from loramix.evaluate.routing import routing_accuracy

        res: dict[str, Any] = {**extra, "seconds": round(run.seconds, 2)}
        for split in ("val", "test"):
            gold = self.sets[split]["gold"]
            acc = routing_accuracy(run.ranked[split], gold, (1, 3))
            texts = self.sets[split]["texts"]
            with _progress() as bar:
                task = bar.add_task(f"score {cond}:{router}:{split}", total=2 * len(texts))
                l1 = self.scorer.score(texts, top1_mix(run.ranked[split]), progress=lambda n, b=bar, t=task: b.advance(t, n))
                l3 = self.scorer.score(texts, run.mix3[split], progress=lambda n, b=bar, t=task: b.advance(t, n))
            loss = {"top1": macro(l1, gold, self.domains)["mean"], "top3": macro(l3, gold, self.domains)["mean"]}
            if split == "test":
                res.update(top1=acc["top1"], top3=acc["top3"], n=acc["n"], loss=loss)
                res["loss_detail"] = {"top1": macro(l1, gold, self.domains), "top3": macro(l3, gold, self.domains)}
            else:
                res["val"] = {"top1": acc["top1"], "top3": acc["top3"], "loss": loss}
        qg = self.sets["questions"]["gold"]
        res["questions_top1"] = routing_accuracy(run.ranked["questions"], qg, (1,))["top1"] if qg else None
        self.runs[cond][router] = run
        if cond == "a":
            self.routing[router] = res
        else:
            self.report.setdefault("routing_desc_only", {})[router] = res
        rec.update(top1=res["top1"], top3=res["top3"], loss=res["loss"], questions=res["questions_top1"])
        console.print(f"({cond}) {router}: top-1 {res['top1']:.3f} top-3 {res['top3']:.3f}; loss top-1 "
                      f"{loss_fmt(res['loss']['top1'])} top-3 {loss_fmt(res['loss']['top3'])}; questions "
                      f"{loss_fmt(res['questions_top1'])}")

    def route_tfidf(self) -> None:
        from loramix.evaluate.routing import TfidfCentroidRouter

        with self.stage("route:tfidf", optional=True) as rec:
            docs = [doc for d in self.domains for doc in self.train[d]]
            t0 = time.perf_counter()
            tf = TfidfCentroidRouter().fit([doc.text for doc in docs], [doc.domain for doc in docs])
            run = RouterRun()
            for split in ("val", "test", "questions"):
                run.ranked[split] = tf.rank(self.sets[split]["queries"], k=3)
                run.mix3[split] = [[(n, 1.0 / len(r)) for n in r] for r in run.ranked[split]]
            run.seconds = time.perf_counter() - t0
            self._judge("a", "tfidf", run, rec, note="top-3 mixture: equal weights")

    def route_untrained(self) -> None:
        with self.stage("route:untrained", optional=True) as rec:
            self._judge("a", "untrained", self._route(self.engine, self.name_of, "untrained"), rec,
                        strategy="semantic")
        with self.stage("route_b:untrained", optional=True) as rec:
            self._judge("b", "untrained", self._route(self.desc, self.desc_name_of, "untrained"), rec,
                        strategy="semantic")

    def route_supervised(self) -> None:
        from loramix.config import RouterTrainConfig
        from loramix.evaluate.routing import truncate_query
        from loramix.train.router import train_supervised_router

        with self.stage("route:supervised", optional=True) as rec:
            docs = [doc for d in self.domains for doc in self.train[d]]
            cfg = RouterTrainConfig(seed=self.args.seed, **({"steps": self.args.router_steps} if self.args.router_steps else {}))
            rep = train_supervised_router(self.engine, [truncate_query(doc.text, self.args.query_chars) for doc in docs],
                                          [doc.domain for doc in docs], cfg, progress=True)
            rec["train"] = {k: v for k, v in rep.to_dict().items() if k != "path"}
            self._judge("a", "supervised", self._route(self.engine, self.name_of, "supervised"), rec,
                        strategy="supervised", train={k: v for k, v in rep.to_dict().items() if k != "path"})

    def _pairs(self) -> tuple[list[str], list[str]]:
        """Unlabelled (query, continuation) pairs from texts no expert trained on: the domains' other texts,
        sharing neither a text nor a headword with any training, validation or test text."""
        import random

        from loramix.train.corpora import load_domain

        a = self.args
        used = [doc for split in (self.train, self.val, self.test) for d in self.domains for doc in split[d]]
        seen_keys = {doc.key.lower() for doc in used}
        seen_texts = {" ".join(doc.text.lower().split()) for doc in used}
        qs, ts = [], []
        self.pair_domains: list[str] = []  # kept for diagnostics only; never given to the router
        for d in self.domains:  # domain-balanced sample of unseen texts; the labels are not passed on
            pool = [doc for doc in load_domain(d) if doc.key.lower() not in seen_keys
                    and " ".join(doc.text.lower().split()) not in seen_texts]
            random.Random(f"pairs:{a.seed}:{d}").shuffle(pool)
            n = 0
            for doc in pool:
                if n >= a.router_pairs_per_domain:
                    break
                qt = query_target(doc.text, a.query_chars, a.target_words)
                if qt and len(qt[1].split()) >= 4:
                    qs.append(qt[0])
                    ts.append(qt[1])
                    self.pair_domains.append(d)
                    n += 1
        return qs, ts

    def route_label_free(self) -> None:
        from loramix.config import RouterTrainConfig
        from loramix.route.trained import default_rerank, default_strategy, router_dir
        from loramix.train.router import LOSS_CACHE, train_router

        queries, targets = self._pairs()
        cfg = RouterTrainConfig(k=max(2, min(self.args.router_k, len(self.domains))), seed=self.args.seed,
                                max_len=192, score_query=True, **({"steps": self.args.router_steps} if self.args.router_steps else {}))
        self.report["default_router"] = "untrained"
        for cond, eng, name_of in (("a", self.engine, self.name_of), ("b", self.desc, self.desc_name_of)):
            with self.stage(f"route{'' if cond == 'a' else '_b'}:label_free", optional=True) as rec:
                if cond == "b":  # same weights, same rows: share the loss cache
                    src = router_dir(self.engine.library) / LOSS_CACHE
                    dst = router_dir(eng.library) / LOSS_CACHE
                    if src.is_file():
                        shutil.copyfile(src, dst)
                rep = train_router(eng, queries, targets, cfg, progress=True)
                info = {k: v for k, v in rep.to_dict().items() if k != "path"}
                rec["train"] = info
                rec["pairs"] = len(queries)
                # what `loramix route` uses: the default strategy, re-ranked by the language model (rerank "auto")
                default = {"trained": "label_free_likelihood"}.get(default_strategy(eng.library), "likelihood")
                if default_rerank(eng.library) == "none":  # its held-out verdict says the re-ranking hurts
                    default = {"label_free_likelihood": "label_free", "likelihood": "untrained"}[default]
                key = "default_router" if cond == "a" else "default_router_desc_only"
                self.report[key] = default
                self._judge(cond, "label_free", self._route(eng, name_of, "label_free"), rec,
                            strategy="trained", train=info, pairs=len(queries))
                console.print(f"({cond}) verdict: beats keys on held-out pairs = {rep.validation.get('beats_keys')} "
                              f"(mix {rep.validation.get('mix')}); default router: {default}")

    def route_likelihood(self) -> None:
        """The keys' top-8 re-ranked by each adapter's likelihood of the query (no labels, no training); in
        condition b also over the trained head's ranking, when the head exists."""
        from loramix.route.trained import load_head

        for cond, eng, name_of in (("a", self.engine, self.name_of), ("b", self.desc, self.desc_name_of)):
            routers = ["likelihood"]
            if cond == "b" and load_head(eng.library) is not None:
                routers.append("label_free_likelihood")
            for r in routers:
                with self.stage(f"route{'' if cond == 'a' else '_b'}:{r}", optional=True) as rec:
                    cfg = self.route_cfg(r)
                    self._judge(cond, r, self._route(eng, name_of, r), rec, strategy=cfg.strategy,
                                rerank=cfg.rerank, rerank_k=cfg.rerank_k, rerank_prior=cfg.rerank_prior)

    def route_arrow(self) -> None:
        with self.stage("route:arrow", optional=True) as rec:
            diag = arrow_diagnostics({d: self.engine.library.load(self.ids[d]) for d in self.domains})
            self.report["arrow_diagnostics"] = diag
            console.print(f"arrow diagnostics: {diag}")
            self._judge("a", "arrow", self._route(self.engine, self.name_of, "arrow"), rec, strategy="arrow",
                        diagnostics=diag)

    def clusters(self) -> None:
        from loramix.evaluate.routing import majority_labels, map_ranking, rank_by_scores, routing_accuracy
        from loramix.train.experts import cluster_texts, segment_ari

        self.report["clusters"] = {"skipped": "did not run"}
        with self.stage("clusters", optional=True) as rec:
            docs = [doc for d in self.domains for doc in self.train[d]]
            texts, labels = [doc.text for doc in docs], [doc.domain for doc in docs]
            n = len(self.domains)
            res: dict[str, Any] = {"clusters": n, "texts": len(texts)}
            seg, cents = cluster_texts(texts, n, self.engine.router.encoder, self.args.seed)
            res["ari"] = segment_ari(seg, labels)
            keys = cents / ((cents**2).sum(axis=1, keepdims=True) ** 0.5 + 1e-12)
            qvecs = self.engine.router.encoder.encode(self.sets["test"]["queries"])
            mapping = majority_labels(seg.tolist(), labels)
            res["routing"] = "keys only: segment-mean keys (what the router would store), no cluster experts trained"
            res |= routing_accuracy(map_ranking(rank_by_scores(qvecs @ keys.T, list(range(n))), mapping), self.gold)
            res["majority"] = {str(c): lb for c, lb in sorted(mapping.items())}
            res["unmapped_domains"] = sorted(set(self.domains) - set(res["majority"].values()))
            self.report["clusters"] = res
            rec.update({k: res.get(k) for k in ("ari", "top1", "top3")})

    # --- 4./5. loss ---------------------------------------------------------------------------
    def _record(self, setting: str, losses: list[float]) -> None:
        self.loss[setting] = macro(losses, self.gold, self.domains)
        console.print(f"{setting}: mean loss {self.loss[setting]['mean']:.4f}")

    def losses(self) -> None:
        from loramix.evaluate.report import skipped

        with self.stage("loss") as rec:
            texts, n = self.sets["test"]["texts"], len(self.domains)
            cands = {r: self.routing[r] for r in ENGINE_ROUTERS if r in self.runs["a"]}
            best = min(cands, key=lambda r: (cands[r]["val"]["loss"]["top3"], -cands[r]["val"]["top1"])) if cands else None
            self.report["best_router"] = best
            self.report["best_router_rule"] = "lowest validation loss of the top-3 mixture (ties: higher val top-1)"
            fixed = {"base": [[] for _ in texts], "oracle": [[(g, 1.0)] for g in self.gold],
                     "uniform": [[(d, 1.0 / n) for d in self.domains] for _ in texts]}
            for s, mixes in fixed.items():
                with _progress() as bar:
                    task = bar.add_task(f"score {s}", total=len(texts))
                    self._record(s, self.scorer.score(texts, mixes, progress=lambda k, b=bar, t=task: b.advance(t, k)))
            if best is None:
                for s in ("routed_top1", "routed_mix"):
                    self.loss[s] = skipped("no engine router ran")
            else:
                run = self.runs["a"][best]
                self._record("routed_top1", self.scorer.score(texts, top1_mix(run.ranked["test"])))
                self._record("routed_mix", self.scorer.score(texts, run.mix3["test"]))
            lbr: dict[str, Any] = {s: {"top1": self.loss[s]["mean"], "top3": self.loss[s]["mean"]} for s in ("base", "oracle")}
            for r, e in self.routing.items():
                if e.get("loss"):
                    lbr[r] = dict(e["loss"])
            self.report["loss_by_router"] = lbr
            rec["scored_rows"] = self.scorer.scored

    def merged(self) -> None:
        from loramix.base import load_base
        from loramix.config import MixConfig
        from loramix.evaluate.report import skipped
        from loramix.evaluate.score import score_texts
        from loramix.mix import MixedModel, merge

        for s in ("merged_linear", "merged_ties"):
            self.loss[s] = skipped("merge stage did not finish")
        with self.stage("merged", optional=True) as rec:
            lib, n = self.engine.library, len(self.domains)
            weights = [lib.load(self.ids[d]) for d in self.domains]
            coeffs = [1.0 / n] * n
            ranks = sum(w.rank for w in weights)
            merged = {"merged_linear": merge(weights, coeffs, "cat"),
                      "merged_ties": merge(weights, coeffs, "ties_svd", density=0.5, svd_rank=ranks, seed=self.args.seed)}
            rec["ranks"] = {k: v.rank for k, v in merged.items()}
            mm = MixedModel(load_base(self.args.base), merged.__getitem__,
                            MixConfig(capacity=4, max_rank=max(w.rank for w in merged.values())))
            texts = self.sets["test"]["texts"]
            for name in merged:
                self._record(name, [s.loss for s in score_texts(mm, texts, [[(name, 1.0)]] * len(texts))])
            del mm

    # --- 6. refine ----------------------------------------------------------------------------
    def refine(self) -> None:
        from loramix.config import RefineConfig
        from loramix.evaluate.score import score_texts
        from loramix.refine import apply_thresholds, calibrate, refine_eval, summarize
        from loramix.train.router import split_texts

        self.report["refine"] = {"skipped": "did not run"}
        with self.stage("refine", optional=True) as rec:
            if self.args.refine_per_domain <= 0:
                raise Skip("--refine-per-domain 0")
            best = self.report.get("best_router")
            if best not in ENGINE_ROUTERS:
                raise Skip("no engine router ran")
            rcfg = self.route_cfg(best)
            force = RefineConfig(enabled=True, action="auto")

            def prompts_of(docs: list[Any]) -> tuple[list[str], list[str], list[str]]:
                ps, ts = split_texts([doc.text for doc in docs], target_words=self.args.target_words)
                return ps, ts, [doc.domain for doc in docs]  # split_texts keeps every text of >= 2 words

            vdocs = [doc for d in self.domains for doc in self.val[d][: self.args.refine_per_domain]]
            vp, vt, _ = prompts_of(vdocs)
            cal = calibrate(refine_eval(self.engine, vp, vt, rcfg, force, force=True)["rows"])
            rec["calibrated"] = {k: cal[k] for k in ("max_prompt_loss", "max_entropy")}
            # test: every prompt whose first route is wrong (hard) and a few others per domain
            tp, tt, tg = prompts_of(self.test_docs)
            first = self.engine.router.route_batch(tp, rcfg)
            wrong = [not r.adapters or self.name_of[r.adapters[0].id] != g for r, g in zip(first, tg, strict=True)]
            per: dict[str, int] = {}
            pick = []
            for i, g in enumerate(tg):
                if wrong[i] or per.get(g, 0) < self.args.refine_per_domain:
                    pick.append(i)
                    per[g] = per.get(g, 0) + (not wrong[i])
            p, t, g = [tp[i] for i in pick], [tt[i] for i in pick], [tg[i] for i in pick]
            hard = [wrong[i] for i in pick]
            rows = apply_thresholds(refine_eval(self.engine, p, t, rcfg, force, force=True)["rows"],
                                    cal["max_prompt_loss"], cal["max_entropy"])
            with self.engine._lock:
                oracle = [s.loss for s in score_texts(self.engine.mixer, p, [[(self.ids[x], 1.0)] for x in g], targets=t)]
            hard_rows = [r for r, h in zip(rows, hard, strict=True) if h]
            rest_rows = [r for r, h in zip(rows, hard, strict=True) if not h]
            gap = sum(r["loss_without"] - o for r, o, h in zip(rows, oracle, hard, strict=True) if h)
            got = sum(r["loss_without"] - r["loss_with"] for r in hard_rows)
            rest_w = sum(r["loss_without"] for r in rest_rows)
            rest_change = (sum(r["loss_with"] for r in rest_rows) - rest_w) / rest_w if rest_w else None
            self.report["refine"] = {
                "router": best, "calibrated_on": f"{len(vp)} validation prompts (forced run, every choice scored)",
                **{k: cal[k] for k in ("max_prompt_loss", "max_entropy")},
                "val": {k: v for k, v in cal.items() if k not in ("max_prompt_loss", "max_entropy")},
                **summarize(rows),
                "hard": {**summarize(hard_rows), "oracle": sum(o for o, h in zip(oracle, hard, strict=True) if h) / max(len(hard_rows), 1),
                         "gap": gap, "recovered": got, "recovered_share": got / gap if gap > 0 else None},
                "rest": {**summarize(rest_rows), "relative_change": rest_change},
            }
            rec.update(n=len(rows), hard=len(hard_rows))
            share = self.report["refine"]["hard"]["recovered_share"]
            console.print(f"refine: hard {len(hard_rows)} prompts, recovered share {share}; rest change {rest_change}")

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
        self.report["loss"] = {s: self.loss[s] for s in [*SETTINGS, *sorted(set(self.loss) - set(SETTINGS))]}
        self.report["routing"] = {r: self.routing[r] for r in [*ROUTERS, *sorted(set(self.routing) - set(ROUTERS))]}
        self.report["questions"] = {r: e.get("questions_top1") for r, e in self.routing.items()}
        self.report["questions_desc_only"] = {r: e.get("questions_top1")
                                              for r, e in self.report.get("routing_desc_only", {}).items()}
        self.report.setdefault("routing_desc_only", {})
        self.report.setdefault("default_router", None)
        self.report["targets"] = evaluate_targets(self.report["loss"], self.report["routing"], self.report)
        total = sum(t.get("wall_s", 0) for t in self.timing.values())
        self.report["timing"] = {**self.timing, "total": {"wall_s": round(total, 1), "status": "sum of stages"}}
        self.report["config"] = self.config()
        self.report["status"] = "failed" if error else "complete"
        if error:
            self.report["error"] = error
        self.report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.report["notes"] = list(NOTES)
        u, m = self.loss["uniform"].get("mean"), self.loss["merged_linear"].get("mean")
        if u is not None and m is not None:
            self.report["sanity"] = {"uniform_minus_merged_linear": u - m, "ok": abs(u - m) < 1e-3}
            self.report["notes"].append(f"Sanity: uniform and merged_linear are the same model (the mean of the "
                                        f"deltas), and their mean losses differ by {u - m:+.2e}.")
        plots: dict[str, str] = {}
        best = self.report.get("best_router")
        try:
            if best in self.runs["a"]:
                pred = [r[0] if r else None for r in self.runs["a"][best].ranked["test"]]
                mat = confusion_matrix(pred, self.gold, self.domains)
                self.report["confusion"] = {"router": best, "labels": self.domains, "matrix": mat.tolist()}
                plot_confusion(mat, self.domains, self.out / "confusion.png", f"routing confusion: {best} (top-1)")
                plots[f"Routing confusion ({best})"] = "confusion.png"
            diag = self.report.get("arrow_diagnostics") or {}
            if diag.get("pair_cos"):
                plot_arrow(diag, self.out / "arrow_prototypes.png")
                plots["Arrow prototypes: mean |cos| between experts"] = "arrow_prototypes.png"
            if any(self.loss[s].get("mean") is not None for s in self.loss):
                plot_loss_bars(self.report["loss"], self.domains, self.out / "loss_bars.png")
                plots["Loss per domain and setting"] = "loss_bars.png"
        except Exception:
            console.print(f"[red]plotting failed:[/]\n{traceback.format_exc(limit=3)}")
        write_report_json(self.out / "report.json", self.report, strict=error is None)
        (self.out / "report.md").write_text(render_markdown(self.report, plots), encoding="utf-8")
        console.print(f"wrote {self.out / 'report.json'} and {self.out / 'report.md'}")

    def config(self) -> dict[str, Any]:
        from loramix.config import RouteConfig

        a = self.args
        preset = PRESETS["quick" if a.quick else "full"]
        reduced = bool(a.domains or a.score_chars) or any(getattr(a, k) != v for k, v in preset.items())
        mode = ("quick" if a.quick else "full") + (" (reduced: options changed)" if reduced else "")
        return {"mode": mode, "domains": self.domains, "seed": a.seed, "score_chars": a.score_chars,
                "train_per_domain": a.train_per_domain, "val_per_domain": a.val_per_domain,
                "test_per_domain": a.test_per_domain, "n_test": len(getattr(self, "test_docs", [])),
                "n_val": len(getattr(self, "sets", {}).get("val", {}).get("gold", [])),
                "query_chars": a.query_chars, "train": asdict(self.tcfg), "mix": asdict(self.mix_cfg),
                "route": {"k": 3, "weights": "softmax", "temperature": RouteConfig().temperature},
                "router_pairs_per_domain": a.router_pairs_per_domain, "router_k": a.router_k,
                "router_steps": a.router_steps, "target_words": a.target_words,
                "refine_per_domain": a.refine_per_domain, "device": "cpu (torch threads: "
                f"{__import__('torch').get_num_threads()}, {os.cpu_count()} cores)",
                "base": getattr(self, "base_path", Path(a.base or "default")).name,
                "library": "OUT/library", "library_desc": "OUT/library_desc", "settings": SETTING_NOTES}

    def run(self) -> int:
        t0 = time.perf_counter()
        error = None
        try:
            self.data()
            if self.args.stop_after == "data":
                return 0
            self.experts()
            if self.args.stop_after == "experts":
                return 0
            self.desc_library()
            skip = set(filter(None, self.args.skip.split(",")))
            for step in (self.route_tfidf, self.route_untrained, self.route_supervised, self.route_label_free,
                         self.route_likelihood, self.route_arrow, self.clusters, self.losses, self.merged, self.refine):
                if step.__name__ in skip:
                    self.timing[step.__name__] = {"status": "skipped: --skip", "wall_s": 0.0, "cpu_s": 0.0}
                    if step.__name__ in ("clusters", "refine"):
                        self.report[step.__name__] = {"skipped": "--skip"}
                    continue
                step()
        except (Exception, KeyboardInterrupt) as e:
            error = f"{type(e).__name__}: {e}"
            console.print(f"[red]benchmark failed:[/]\n{traceback.format_exc()}")
        finally:
            if self.args.stop_after is None or error:
                self.write(error)
        console.rule(f"done in {time.perf_counter() - t0:.0f} s")
        if self.args.stop_after is None:
            self.summary()
        return 1 if error else 0

    def summary(self) -> None:
        from rich.table import Table

        t = Table("router", "top-1", "top-3", "loss top-1", "loss top-3", "questions")
        for cond, table in (("a", self.report["routing"]), ("b", self.report.get("routing_desc_only", {}))):
            for r, e in table.items():
                loss = e.get("loss") or {}
                t.add_row(f"{cond}:{r}", loss_fmt(e.get("top1")), loss_fmt(e.get("top3")), loss_fmt(loss.get("top1")),
                          loss_fmt(loss.get("top3")), loss_fmt(e.get("questions_top1")))
        console.print(t)
        console.print(f"best router (val): {self.report.get('best_router')}; default router: "
                      f"{self.report.get('default_router')}")
        for name, tg in self.report["targets"].items():
            console.print(f"target {name}: {tg['value']} -> {tg['pass']}")


def loss_fmt(x: Any) -> str:
    return "–" if x is None else f"{x:.3f}"


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    return Bench(args).run()


if __name__ == "__main__":
    raise SystemExit(main())
