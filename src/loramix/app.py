"""The engine: one object tying the library, the router and the mixer together.

The CLI (and later the HTTP layer) talks only to :class:`Loramix`, so each can be tested against it.
Heavy parts load lazily: routing never loads the base model, listing never loads the encoder.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from loramix.base import BaseModel, base_linear_shapes, load_base, maybe_autocast, resolve_base_path
from loramix.config import (
    MAX_WEIGHT,
    DocsConfig,
    GenerateConfig,
    MixConfig,
    RefineConfig,
    RouteConfig,
    ScoreConfig,
    TrainConfig,
    home_dir,
)
from loramix.errors import ConfigError, short
from loramix.lora import LoraWeights
from loramix.store import AdapterRecord, Library
from loramix.store.faults import fault
from loramix.store.peft_io import check_folder
from loramix.store.records import check_name

if TYPE_CHECKING:  # keeps start-up light
    from loramix.documents import CollectionRecord, DocStore, Passage, PrefixKVCache, Retriever
    from loramix.mix import MixedModel
    from loramix.route import Route, Router
    from loramix.store.tiers import AdapterCache

RERANK_CHARS = 1024  # the likelihood re-ranking scores at most the query's first characters ...
RERANK_TOKENS = 256  # ... and tokens (longer text is cut into windows of this many)


@dataclass
class Answer:
    """A generated answer with the mixture that produced it."""

    text: str
    adapters: list[dict[str, Any]]
    route_ms: float
    generate_ms: float
    tokens: int
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "adapters": self.adapters, "route_ms": round(self.route_ms, 2),
                "generate_ms": round(self.generate_ms, 1), "tokens": self.tokens, **self.info}


def check_weight(w: object, what: str) -> float:
    """A mixture or merge weight: a finite number of magnitude at most MAX_WEIGHT (negative subtracts)."""
    try:
        f = float(w)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        f = math.nan
    if isinstance(w, bool) or not math.isfinite(f) or abs(f) > MAX_WEIGHT:
        raise ConfigError(f"{what} is {short(repr(w))}; expected a finite number between -{MAX_WEIGHT:g} and "
                          f"{MAX_WEIGHT:g}")
    return f


def check_text(text: object, what: str) -> str:
    """A non-blank string (a query, or a text to score)."""
    if not isinstance(text, str):
        raise ConfigError(f"{what} is a {type(text).__name__}; expected a string")
    if not text.strip():
        raise ConfigError(f"{what} is empty; expected some text")
    return text


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """``"name:0.7,other:0.3"`` (weights default to equal shares) -> [(name, weight), ...]."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ConfigError(f"empty adapter list {short(repr(spec))}; expected 'name:weight,name:weight'")
    out: list[tuple[str, float]] = []
    for item in items:
        name, _, w = item.partition(":")
        try:
            weight = float(w) if w else 1.0 / len(items)
        except ValueError:
            raise ConfigError(f"bad weight {short(repr(w))} for adapter {short(repr(name))}; expected a number as in "
                              "'name:0.5'") from None
        out.append((name, check_weight(weight, f"the weight of adapter {short(repr(name))}")))
    return out


class Loramix:
    """The library, router and mixer of one ``home`` and one base model."""

    def __init__(self, home: str | Path | None = None, base: str | Path | None = None, mix: MixConfig | None = None):
        self.home = home_dir(home)
        self._base_arg = base
        self.mix_cfg = mix or MixConfig()
        self._lib: Library | None = None
        self._router: Router | None = None
        self._base: BaseModel | None = None
        self._mixer: MixedModel | None = None
        self._tier: AdapterCache | None = None
        self._docs: DocStore | None = None
        self._retriever: Retriever | None = None
        self._kv: PrefixKVCache | None = None
        self._lock = threading.RLock()  # one forward pass at a time through the shared mixer
        self.extra_weights: dict[str, LoraWeights] = {}  # in-memory adapters (not in the library), by id

    # --- lazily built parts -------------------------------------------------------------------
    @property
    def library(self) -> Library:
        if self._lib is None:
            self._lib = Library(self.home)
        return self._lib

    @property
    def router(self) -> Router:
        if self._router is None:
            from loramix.route import Router
            from loramix.route.plugins import load_plugins

            load_plugins()
            self._router = Router(self.library)
            from loramix.route.arrow import attach_base

            attach_base(self._router, lambda: self.base, self._lock)  # arrow routes on the base's hidden states
            self._router.likelihood = self.query_nll  # rerank="likelihood" scores with the mixer
        return self._router

    @property
    def base(self) -> BaseModel:
        if self._base is None:
            self._base = load_base(self._base_arg)
        return self._base

    @property
    def mixer(self) -> MixedModel:
        if self._mixer is None:
            from loramix.mix import MixedModel

            self._mixer = MixedModel(self.base, self.load_weights, self.mix_cfg)
        return self._mixer

    @property
    def lock(self) -> threading.RLock:
        """Held around every use of the shared model (a scheduler shares it)."""
        return self._lock

    @property
    def tier(self) -> AdapterCache:
        """The in-memory adapter tier between the mixer's slots and the library's packs."""
        if self._tier is None:
            from loramix.store.tiers import AdapterCache

            self._tier = AdapterCache(self.library, self.mix_cfg.memory_bytes)
        return self._tier

    def load_weights(self, adapter_id: str) -> LoraWeights:
        """The mixer's loader: an in-memory adapter (a cached merge, a runtime LoRA) or a library one
        (through the memory tier)."""
        w = self.extra_weights.get(adapter_id)
        return w if w is not None else self.tier(adapter_id)

    def stats(self) -> dict[str, Any]:
        """Live counters of the parts built so far: slots (mixer), the in-memory adapter tier, the routing
        cache, the retrieval cache and the passage KV prefix cache."""
        out: dict[str, Any] = {"time": time.time()}
        if self._mixer is not None:
            out["slots"] = self._mixer.stats() | {"loaded_ids": len(self._mixer.loaded)}
        if self._tier is not None:
            out["memory_tier"] = self._tier.stats()
        if self._router is not None:
            out["route_cache"] = self._router.cache.stats()
        if self._kv is not None:
            out["kv_prefix_cache"] = self._kv.stats()
        if self._retriever is not None:
            out.update(self._retriever.stats())
        return out

    def write_stats(self) -> Path:
        """Snapshot :meth:`stats` to ``meta/stats/engine.json`` (shown by ``loramix stats``)."""
        path = self.library.meta_path("stats") / "engine.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.stats(), default=str))
        tmp.replace(path)
        return path

    @property
    def docs(self) -> DocStore:
        """The document collections of this home (``home/docs.sqlite``)."""
        if self._docs is None:
            from loramix.documents import DocStore

            self._docs = DocStore(self.home)
        return self._docs

    @property
    def retriever(self) -> Retriever:
        if self._retriever is None:
            from loramix.documents import Retriever

            self._retriever = Retriever(self.docs)
        return self._retriever

    @property
    def kv_cache(self) -> PrefixKVCache:
        """Prefill of recurring passage prefixes (see loramix.documents.kvcache)."""
        if self._kv is None:
            from loramix.documents import PrefixKVCache

            self._kv = PrefixKVCache()
        return self._kv

    def base_path(self) -> Path:
        return resolve_base_path(self._base_arg)

    # --- adapters -----------------------------------------------------------------------------
    def add_adapter(self, path: str | Path, name: str, description: str = "", domain_tags: Sequence[str] = (),
                    skill_tags: Sequence[str] = (), examples: Sequence[str] | None = None,
                    owner: str | None = None, public: bool = False) -> AdapterRecord:
        """Import a PEFT LoRA folder, validated against the base model's shapes, and key it.

        ``owner``: the tenant it belongs to (None: the shared library); ``public``: visible to all tenants.
        """
        check_name(name)  # the cheap checks first: loading the base model's config takes seconds
        check_folder(path)
        lib = self.library
        lib.base_shapes = base_linear_shapes(self._base_arg)
        rec = lib.add(path, name, description=description, domain_tags=domain_tags, skill_tags=skill_tags,
                      examples=list(examples) if examples else None, owner=owner, public=public)
        fault("add.after_commit")  # a crash here leaves the adapter unkeyed: the next engine start keys it
        self.router.compute_key(rec.id)
        return self.library.get(rec.id)

    def add_weights(self, weights: LoraWeights, name: str, **kw: Any) -> AdapterRecord:
        rec = self.library.add_weights(weights, name, **kw)
        fault("add.after_commit")
        self.router.compute_key(rec.id)
        return self.library.get(rec.id)

    def remove_adapter(self, name: str, tenant: str | None = None) -> None:
        rec = self.library.get(name, tenant=tenant)
        self.library.remove(rec.id, tenant=tenant)
        if self._mixer is not None:
            self._mixer.evict(rec.id)
        if self._tier is not None:
            self._tier.forget(rec.id)

    def merge(self, names: Sequence[str], weights: Sequence[float], method: str, new_name: str,
              description: str = "", seed: int | None = 0, **kw: Any) -> AdapterRecord:
        """Merge library adapters into a new ordinary library adapter (key from the union of examples)."""
        from loramix.mix import merge

        weights = [check_weight(w, f"merge weight {i}") for i, w in enumerate(weights)]
        recs = [self.library.get(n) for n in names]
        merged = merge([self.library.load(r.id) for r in recs], list(weights), method, seed=seed, **kw)
        examples = [e for r in recs for e in self.library.examples(r.id)][:256]
        tags = sorted({t for r in recs for t in r.domain_tags})
        desc = description or "merge of " + ", ".join(r.name for r in recs) + f" ({method})"
        fault("merge.before_add")
        return self.add_weights(merged, new_name, description=desc, domain_tags=tags, examples=examples or None,
                                meta={"merged_from": [r.name for r in recs], "weights": list(weights), "method": method})

    # --- documents ----------------------------------------------------------------------------
    def add_docs(self, name: str, source: str | None = None, texts: Sequence[str] | None = None,
                 keys: Sequence[str] | None = None, tags: Sequence[str] = (), cfg: DocsConfig | None = None,
                 limit: int | None = None, owner: str | None = None, public: bool = False) -> CollectionRecord:
        """Add a collection from a ``source`` (file or corpus, as ``--data``) or from ``texts``; ``owner`` (a
        tenant; None = shared with every tenant) and ``public`` as for adapters."""
        from loramix.documents import read_source

        cfg = cfg or DocsConfig()
        if (source is None) == (texts is None):
            raise ConfigError("give exactly one of source or texts")
        if source is not None:
            texts, keys = read_source(source, limit)
        return self.docs.add(name, list(texts or []), self.retriever.encoder, keys=keys, tags=tags,
                             source=source or "", chunk_words=cfg.chunk_words, chunk_overlap=cfg.chunk_overlap,
                             owner=owner, public=public)

    def remove_docs(self, name: str) -> CollectionRecord:
        return self.docs.remove(name)

    def retrieve(self, query: str, docs: DocsConfig, adapters: Sequence[tuple[str, float]] | None = None,
                 route: RouteConfig | None = None) -> list[Passage]:
        """Passages for a query (the mixture matters only to the LM reranker and to ``auto`` collections)."""
        from loramix.rag import retrieve

        mixture, _, _ = self._mixture_for(query, adapters, route)
        return retrieve(self, query, docs, mixture)

    def ask_batch(self, prompts: Sequence[str], docs: DocsConfig, route: RouteConfig | None = None,
                  gen: GenerateConfig | None = None) -> list[Answer]:
        """Greedy answers for many prompts in one batch, each row with its own passages and mixture."""
        from loramix.rag import ask_docs_batch

        return ask_docs_batch(self, prompts, route, gen or GenerateConfig(), docs)

    # --- routing ------------------------------------------------------------------------------
    def route(self, query: str, cfg: RouteConfig | None = None, tenant: str | None = None) -> Route:
        """The route among the adapters ``tenant`` may see (None: all of them)."""
        return self.router.route(check_text(query, "the query"), cfg or RouteConfig(), tenant=tenant)

    def resolve(self, mixture: Sequence[tuple[str, float]],
                tenant: str | None = None) -> list[tuple[AdapterRecord, float]]:
        """Names or ids -> records, with a clear error for an unknown one (or one ``tenant`` may not see)
        or a bad weight."""
        return [(self.library.get(n, tenant=tenant), check_weight(w, f"the weight of adapter {short(repr(n))}"))
                for n, w in mixture]

    def _mixture_for(self, query: str, adapters: Sequence[tuple[str, float]] | None,
                     route: RouteConfig | None) -> tuple[list[tuple[str, float]], list[dict[str, Any]], float]:
        if adapters is not None:
            recs = self.resolve(adapters)
            return ([(r.id, w) for r, w in recs], [{"name": r.name, "id": r.id, "weight": w} for r, w in recs], 0.0)
        if route is None:
            return [], [], 0.0
        r = self.route(query, route)
        return r.mixture, r.to_dict()["adapters"], r.latency_ms

    # --- scoring ------------------------------------------------------------------------------
    def query_nll(self, queries: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Per query, the summed NLL of the query (its first ``RERANK_CHARS`` characters) under each
        candidate adapter alone: one batched pass of the mixer (the router's likelihood re-ranking)."""
        from loramix.evaluate.routing import truncate_query
        from loramix.evaluate.score import score_texts

        texts, mixes = [], []
        for q, cands in zip(queries, candidates, strict=True):
            q = truncate_query(q, RERANK_CHARS)
            texts += [q] * len(cands)
            mixes += [[(a, 1.0)] for a in cands]
        with self._lock:
            scores = score_texts(self.mixer, texts, mixes, max_len=RERANK_TOKENS)
        out, i = [], 0
        for cands in candidates:
            out.append(np.array([s.nll for s in scores[i:i + len(cands)]], dtype=np.float64))  # (K,)
            i += len(cands)
        return out

    def score(self, text: str, adapters: Sequence[tuple[str, float]] | None = None,
              route: RouteConfig | None = None, cfg: ScoreConfig | None = None, docs: DocsConfig | None = None,
              prompt: str | None = None) -> dict[str, Any]:
        """Mean token NLL of ``text`` under a given mixture, a routed one, or the base model.

        Refused (ConfigError): a blank text, one with fewer than 2 tokens (the first token is only
        context, so nothing would be scored), and one over ``cfg.max_tokens`` tokens.
        With ``docs``, after retrieved passages (query: ``prompt``, of which ``text`` is the continuation,
        else ``text``); see loramix.rag.score_docs.
        """
        cfg = cfg or ScoreConfig()
        if docs is not None and docs.collections:
            from loramix.rag import score_docs

            self._check_score_text(text, cfg)
            return score_docs(self, text, adapters, route, docs, prompt)
        self._check_score_text(text, cfg)
        mixture, shown, _ = self._mixture_for(text, adapters, route)
        return {**self.score_mixture(text, mixture, cfg), "adapters": shown}

    def _check_score_text(self, text: str, cfg: ScoreConfig) -> int:
        check_text(text, "the text to score")
        if len(text) > cfg.max_chars:
            raise ConfigError(f"the text to score has {len(text):,} characters, over the limit of {cfg.max_chars:,} "
                              f"characters (16 x ScoreConfig.max_tokens = {cfg.max_tokens:,} tokens); expected a "
                              "shorter text")
        n_tokens = len(self.base.tokenizer(text, add_special_tokens=False)["input_ids"])
        if n_tokens > cfg.max_tokens:
            raise ConfigError(f"the text to score has {n_tokens:,} tokens, over the limit of {cfg.max_tokens:,} tokens "
                              "(ScoreConfig.max_tokens); expected a shorter text")
        return n_tokens

    def score_mixture(self, text: str, mixture: Sequence[tuple[str, float]],
                      cfg: ScoreConfig | None = None) -> dict[str, Any]:
        """``{"loss", "tokens"}`` of ``text`` under a mixture of adapter ids (library or in-memory ones),
        with the same checks as :meth:`score`."""
        from loramix.evaluate.score import score_texts

        cfg = cfg or ScoreConfig()
        n_tokens = self._check_score_text(text, cfg)
        with self._lock:
            s = score_texts(self.mixer, [text], [list(mixture)], max_len=cfg.max_len, logits_mib=cfg.logits_mib)[0]
        if s.tokens == 0:
            raise ConfigError(f"nothing to score: the text has {n_tokens} token(s) and the first is only context; "
                              "expected at least 2 tokens")
        if not math.isfinite(s.loss):
            raise ConfigError(f"the loss came out {s.loss}; the mixture's weights or adapters make the model's "
                              "output non-finite")
        return {"loss": s.loss, "tokens": s.tokens}

    # --- generation ---------------------------------------------------------------------------
    def chat_ids(self, prompt: str) -> torch.Tensor:
        tok = self.base.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
        return ids  # (1, T)

    def ask(self, prompt: str, adapters: Sequence[tuple[str, float]] | None = None, route: RouteConfig | None = None,
            gen: GenerateConfig | None = None, on_text: Callable[[str], None] | None = None,
            refine: RefineConfig | None = None, docs: DocsConfig | None = None) -> Answer:
        """Route (or take the given mixture), mix and generate; ``on_text`` receives the text as it streams.

        With ``refine`` enabled, a routed mixture that looks poor is replaced first (see loramix.refine).
        With ``docs``, retrieved passages go into the prompt and the answer lists them (loramix.rag).
        """
        from transformers import TextStreamer

        gen = gen or GenerateConfig()
        if docs is not None and docs.collections:
            from loramix.rag import ask_docs

            return ask_docs(self, prompt, adapters, route, gen, docs, on_text)
        mixture, shown, route_ms = self._mixture_for(prompt, adapters, route if adapters is None else None)
        tok = self.base.tokenizer
        ids = self.chat_ids(prompt)
        refined = None
        if refine is not None and refine.enabled and adapters is None and route is not None:
            from loramix.refine import refine_for_ask

            refined = refine_for_ask(self, prompt, ids, mixture, shown, route, refine)
            mixture, shown = refined.mixture, refined.shown

        class _Stream(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if on_text is not None and text:
                    on_text(text)

        t0 = time.perf_counter()
        with self._lock:
            mm = self.mixer
            with mm.mixture([mixture]), torch.inference_mode(), maybe_autocast(self.mix_cfg.bf16):
                kw: dict[str, Any] = {"do_sample": gen.temperature > 0}
                if gen.temperature > 0:
                    kw.update(temperature=gen.temperature, top_p=gen.top_p)
                out = mm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),  # type: ignore[operator]
                                        max_new_tokens=gen.max_new_tokens, pad_token_id=tok.pad_token_id,
                                        streamer=_Stream(tok, skip_prompt=True, skip_special_tokens=True), **kw)
        new = out[0, ids.shape[1]:]
        used = [aid for aid, _ in mixture if refined is None or aid not in refined.recorded]  # counted once
        if used:
            self.library.record_use(used)
        return Answer(text=tok.decode(new, skip_special_tokens=True).strip(), adapters=shown, route_ms=route_ms,
                      generate_ms=(time.perf_counter() - t0) * 1000, tokens=int(new.numel()),
                      info={"refine": refined.info} if refined else {})

    # --- training -----------------------------------------------------------------------------
    def train_adapter(self, name: str, texts: Sequence[str], cfg: TrainConfig | None = None, description: str = "",
                      domain_tags: Sequence[str] = (), skill_tags: Sequence[str] = (), source: str = "",
                      progress: bool = True, docs: DocsConfig | None = None) -> tuple[AdapterRecord, dict[str, Any]]:
        """Train an expert on ``texts`` and add it, keyed by its training examples.

        With ``docs``: a retrieval-aware expert, trained on passages + each text's opening with the
        loss on the rest of the text (loramix.rag.aware_pairs).
        """
        from loramix.train.expert import train_expert

        if name in self.library:
            raise ConfigError(f"an adapter named {name!r} already exists; remove it or pick another name")
        cfg = cfg or TrainConfig()
        weights: Any
        if cfg.kind == "nano":
            from loramix.train.nano import train_nano

            weights, report, _ = train_nano(str(self.base_path()), texts, cfg, bases=self.library.bases,
                                            progress=progress, description=name)
        elif docs is not None and docs.collections:
            from loramix.rag import train_aware

            weights, report = train_aware(self, texts, cfg, docs, progress, name)
        else:
            weights, report = train_expert(str(self.base_path()), texts, cfg, progress=progress, description=name)
        rng = np.random.default_rng(cfg.seed)
        pick = rng.choice(len(texts), size=min(256, len(texts)), replace=False)
        examples = [texts[int(i)][:1000] for i in pick]
        rec = self.add_weights(weights, name, description=description, domain_tags=list(domain_tags),
                               skill_tags=list(skill_tags), examples=examples,
                               meta={"source": source, "train": {k: v for k, v in report.to_dict().items()
                                                                 if k != "losses"},
                                     **({"docs": list(docs.collections)} if docs and docs.collections else {})})
        return rec, report.to_dict()
