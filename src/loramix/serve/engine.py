"""The seam between the HTTP layer and the model: the :class:`Engine` protocol and two engines.

- :class:`LocalEngine` is the real one: a :class:`loramix.app.Loramix` (library, router, mixer) plus a
  scheduler thread that owns the model.
- :class:`FakeEngine` needs no model: deterministic tokens, an in-memory library. HTTP unit tests use it.

Every method takes the caller's ``tenant`` (None = single user) so that visibility is enforced below the
HTTP layer. Blocking methods are plain functions (the HTTP layer runs them in a thread pool); a
generation is submitted with a callback and bridged to asyncio by :func:`stream_events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from loramix.config import RouteConfig
from loramix.errors import AdapterExists, AdapterNotFound, ConfigError, LoramixError, MergeError, Overloaded
from loramix.serve.scheduler import FinishEvent, GenRequest, SamplingParams, TokenEvent

if TYPE_CHECKING:
    from loramix.app import Loramix
    from loramix.serve.metrics import EngineStats
    from loramix.serve.settings import ServeSettings

__all__ = ["Augmented", "DocsRequest", "Engine", "FakeEngine", "GenerationFailed", "LocalEngine", "MergeRecipe",
           "RequestTimeout", "Resolved", "stream_events"]

Event = TokenEvent | FinishEvent
log = logging.getLogger("loramix.serve")
MERGE_STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")


class RequestTimeout(LoramixError):
    """A generation ran past the server's request timeout and was cancelled."""


class GenerationFailed(LoramixError):
    """The model side reported an error for this request."""


@dataclass
class Resolved:
    """What a request's ``model`` (or ``adapter_id``) resolved to."""

    mixture: list[tuple[str, float]]  # (adapter id, weight); [] = base model
    adapters: list[dict[str, Any]]  # [{"name", "weight"}] as shown to the client
    routed: bool = False
    route_ms: float = 0.0
    passages: list[dict[str, Any]] | None = None  # with loramix.docs: [{"collection", "id", "key", "score", ...}]

    def header(self) -> str:
        """The ``x-loramix-adapters`` header: ``name:0.700,other:0.300`` (empty for the base model)."""
        return ",".join(f"{a['name']}:{a['weight']:.3f}" for a in self.adapters)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"adapters": self.adapters, "routed": self.routed, "route_ms": round(self.route_ms, 2)}
        if self.passages is not None:
            d["passages"] = self.passages
        return d


@dataclass(frozen=True)
class DocsRequest:
    """A request's ``loramix: {"docs": [...], "passages": N}``: collections (names, ``tag:NAME``, ``auto``)
    to retrieve from with the query, and how many passages go into the prompt."""

    collections: tuple[str, ...]
    passages: int = 3

    def __post_init__(self) -> None:
        if not self.collections or not all(isinstance(c, str) and c.strip() for c in self.collections):
            raise ConfigError("loramix.docs must name at least one collection (a name, tag:NAME or auto)")
        if not 0 <= self.passages <= 16:
            raise ConfigError(f"loramix.passages must be in [0, 16], got {self.passages}")


@dataclass
class Augmented:
    """A prompt with retrieved passages in it: token ids, the offsets after the template head and after
    each passage (where a prefix KV cache may resume), and the passages used as the response lists them."""

    ids: list[int]
    boundaries: list[int]
    passages: list[dict[str, Any]]


@dataclass(frozen=True)
class MergeRecipe:
    """LoRAX's ``merged_adapters``: how to combine several adapters into one."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    strategy: str = "linear"
    density: float = 1.0
    majority_sign_method: str = "total"

    def __post_init__(self) -> None:
        if not self.names:
            raise ConfigError("merged_adapters.ids is empty; expected at least one adapter name")
        if len(self.names) != len(self.weights):
            raise ConfigError(f"merged_adapters has {len(self.names)} ids but {len(self.weights)} weights; "
                              "expected one weight per id")
        if self.strategy not in MERGE_STRATEGIES:
            raise ConfigError(f"unknown merge_strategy {self.strategy!r}; expected one of {', '.join(MERGE_STRATEGIES)}")
        if not 0.0 <= self.density <= 1.0:
            raise ConfigError(f"density must be in [0, 1], got {self.density}")
        if self.majority_sign_method not in ("total", "frequency"):
            raise ConfigError(f"unknown majority_sign_method {self.majority_sign_method!r}; expected total or frequency")
        if not all(math.isfinite(w) for w in self.weights):
            raise ConfigError("merged_adapters.weights must be finite numbers")

    def key(self) -> str:
        return hashlib.sha256(json.dumps([self.names, self.weights, self.strategy, self.density,
                                          self.majority_sign_method]).encode()).hexdigest()[:16]


class Handle(Protocol):
    def cancel(self) -> None: ...


class Engine(Protocol):
    """What the HTTP layer needs from the model side."""

    base_id: str

    def start(self) -> None: ...
    def close(self) -> None: ...
    def info(self) -> dict[str, Any]: ...
    def models(self, tenant: str | None) -> list[dict[str, Any]]: ...
    def resolve(self, model: str | None, tenant: str | None, query: str | None = None,
                route: RouteConfig | None = None) -> Resolved: ...
    def resolve_merged(self, recipe: MergeRecipe, tenant: str | None) -> Resolved: ...
    def route(self, query: str, cfg: RouteConfig, tenant: str | None) -> dict[str, Any]: ...
    def default_route(self) -> RouteConfig: ...
    def score(self, text: str, resolved: Resolved) -> dict[str, Any]: ...
    def augment(self, resolved: Resolved, docs: DocsRequest, tenant: str | None,
                messages: list[dict[str, Any]] | None = None, prompt: str | None = None) -> Augmented: ...
    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]: ...
    def text_ids(self, text: str) -> list[int]: ...
    def submit(self, req: GenRequest, on_event: Callable[[Event], None]) -> Handle: ...
    def record(self, resolved: Resolved, finish: FinishEvent, tenant: str | None) -> None: ...
    def list_adapters(self, tenant: str | None, q: str | None = None, tags: Sequence[str] = ()) -> list[dict[str, Any]]: ...
    def get_adapter(self, name: str, tenant: str | None) -> dict[str, Any]: ...
    def add_adapter(self, folder: Path, name: str, tenant: str | None, description: str = "",
                    tags: Sequence[str] = (), examples: Sequence[str] | None = None, public: bool = False) -> dict[str, Any]: ...
    def remove_adapter(self, name: str, tenant: str | None) -> None: ...
    def load_lora(self, name: str, path: Path, tenant: str | None) -> None: ...
    def unload_lora(self, name: str, tenant: str | None) -> None: ...


async def stream_events(engine: Engine, req: GenRequest, timeout_s: float) -> AsyncGenerator[Event, None]:
    """Submit ``req`` and yield its events on this event loop; the request is cancelled if the consumer
    stops early (client gone) or it runs past ``timeout_s`` (then :class:`RequestTimeout` is raised)."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[Event] = asyncio.Queue()

    def on_event(ev: Event) -> None:  # called from the scheduler thread
        with contextlib.suppress(RuntimeError):  # the loop is gone (server shutting down)
            loop.call_soon_threadsafe(q.put_nowait, ev)

    handle = engine.submit(req, on_event)
    done = False
    deadline = loop.time() + timeout_s
    try:
        while True:
            try:
                ev = await asyncio.wait_for(q.get(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise RequestTimeout(f"the generation ran past the server's request timeout of {timeout_s:g} s "
                                     "and was cancelled; ask fewer max_tokens") from None
            if isinstance(ev, FinishEvent):
                done = True
            yield ev
            if done:
                return
    finally:
        if not done:
            handle.cancel()


def _text_of(content: Any) -> str:
    """A chat message's content: a string, or OpenAI's list of parts (text parts joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    raise ConfigError(f"message content is a {type(content).__name__}; expected a string or a list of text parts")


def last_user_text(messages: Sequence[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return _text_of(m.get("content"))
    return _text_of(messages[-1].get("content")) if messages else ""


def _looks_like_mixture(model: str) -> bool:
    return "," in model or ":" in model


def _parse_weighted(model: str) -> list[tuple[str, float]]:
    from loramix.app import parse_mixture

    mix = parse_mixture(model)
    for name, w in mix:
        if not math.isfinite(w):
            raise ConfigError(f"weight of {name!r} is not a finite number")
    return mix


# --- the real engine ------------------------------------------------------------------------------
def resolve_model(model: str | None, base_id: str, one: Callable[[str], tuple[str, str]],
                  known: Callable[[str], bool], auto: Callable[[], Resolved]) -> Resolved:
    """The ``model`` grammar every engine shares: empty or the base id = no adapter; ``auto`` = routed
    (``auto()``); an exact adapter name (``known``), or anything not shaped like a mixture = that adapter;
    else ``name:0.7,other:0.3``. ``one(name) -> (id, name)`` raises AdapterNotFound for what the caller
    may not see."""
    model = (model or "").strip()
    if not model or model == base_id:
        return Resolved([], [])
    if model == "auto":
        return auto()
    if known(model) or not _looks_like_mixture(model):
        aid, name = one(model)
        return Resolved([(aid, 1.0)], [{"name": name, "weight": 1.0}])
    return named_mixture([(one(n), w) for n, w in _parse_weighted(model)])


def named_mixture(pairs: Sequence[tuple[tuple[str, str], float]]) -> Resolved:
    """((id, name), weight) pairs -> the mixture and what the response shows."""
    return Resolved([(aid, w) for (aid, _), w in pairs], [{"name": n, "weight": w} for (_, n), w in pairs])


class LocalEngine:
    """Loramix (library, router, mixer) plus a scheduler that owns the model."""

    def __init__(self, lm: Loramix, settings: ServeSettings):
        self.lm = lm
        self.settings = settings
        self.base_id = settings.served_model_name or lm.base_path().name
        self._runtime: dict[str, str] = {}  # vLLM-style runtime LoRA name -> in-memory adapter id
        self._merged: dict[str, str] = {}  # merge recipe key -> in-memory adapter id
        self._merge_lock = threading.Lock()
        self._route_lock = threading.Lock()  # the router (lazy construction, index sync) is used one call at a time
        self._sched: Any = None
        self.started = time.time()
        self._last_snapshot = -math.inf

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        from loramix.serve.scheduler import Scheduler, SchedulerConfig

        lm = self.lm
        _ = lm.base, lm.mixer  # load the base once, now
        eos = self._eos_ids()
        cfg = SchedulerConfig(max_batch=self.settings.max_batch, max_queue=self.settings.max_queue)
        self._sched = Scheduler(lm.mixer, cfg, eos_ids=eos, lock=lm.lock, prefix_cache=lm.kv_cache)
        self._sched.start()

    def close(self) -> None:
        if self._sched is not None:
            self._sched.stop()
            self._sched = None
            self._snapshot(force=True)

    @property
    def scheduler(self) -> Any:
        return self._sched

    def _eos_ids(self) -> set[int]:
        tok, model = self.lm.base.tokenizer, self.lm.base.model
        ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids |= set(gen) if isinstance(gen, list) else ({gen} if gen is not None else set())
        return ids

    def info(self) -> dict[str, Any]:
        cfg = self.lm.base.model.config
        return {"model_id": self.base_id, "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
                "adapters": len(self.lm.library), "runtime_adapters": sorted(self._runtime)}

    # --- models and resolution -----------------------------------------------------------------
    def models(self, tenant: str | None) -> list[dict[str, Any]]:
        recs = self.lm.library.list(tenant=tenant)
        out = [{"id": r.name, "created": int(r.created)} for r in recs]
        return out + [{"id": n, "created": int(self.started)} for n in self._runtime]

    def _one(self, name: str, tenant: str | None) -> tuple[str, str]:
        """(adapter id, name) of a library or runtime adapter ``tenant`` may see; AdapterNotFound otherwise."""
        if name in self._runtime:
            return self._runtime[name], name
        try:
            rec = self.lm.library.get(name, tenant=tenant)
        except AdapterNotFound:
            raise AdapterNotFound(f"no model or adapter named {name!r}; GET /v1/models lists them") from None
        return rec.id, rec.name

    def resolve(self, model: str | None, tenant: str | None, query: str | None = None,
                route: RouteConfig | None = None) -> Resolved:
        def auto() -> Resolved:
            r = self.route_obj(query or "", route or self.default_route(), tenant)
            return Resolved(r.mixture, [{"name": a.name, "weight": a.weight} for a in r.adapters], True, r.latency_ms)

        return resolve_model(model, self.base_id, lambda n: self._one(n, tenant),
                             lambda n: n in self._runtime or n in self.lm.library, auto)

    def resolve_merged(self, recipe: MergeRecipe, tenant: str | None) -> Resolved:
        named = [self._one(n, tenant) for n in recipe.names]
        linear = named_mixture(list(zip(named, recipe.weights, strict=True)))
        if recipe.strategy == "linear":  # exact output mixture, per row: no merge needed
            return linear
        shown = linear.adapters
        key = recipe.key()
        with self._merge_lock:
            aid = self._merged.get(key)
            if aid is None:
                from loramix.mix import merge

                ws = [self.lm.load_weights(a) for a, _ in named]
                merged = merge(ws, list(recipe.weights), recipe.strategy, density=recipe.density,
                               majority_sign_method=recipe.majority_sign_method,  # type: ignore[arg-type]
                               seed=0)
                aid = f"merged-{key}"
                self.lm.extra_weights[aid] = merged
                self._merged[key] = aid
        return Resolved([(aid, 1.0)], [{"name": f"{recipe.strategy}({','.join(recipe.names)})", "weight": 1.0,
                                         "merged_from": shown}])

    def default_route(self) -> RouteConfig:
        from loramix.route.trained import default_rerank, default_strategy

        lib = self.lm.library
        return RouteConfig(strategy=default_strategy(lib), rerank=default_rerank(lib))

    def route_obj(self, query: str, cfg: RouteConfig, tenant: str | None) -> Any:
        if not query.strip():
            raise ConfigError("nothing to route: the query (or last user message) is empty")
        with self._route_lock:
            return self.lm.route(query, cfg, tenant=tenant)

    def route(self, query: str, cfg: RouteConfig, tenant: str | None) -> dict[str, Any]:
        d = self.route_obj(query, cfg, tenant).to_dict()
        d["strategy"] = cfg.strategy
        return dict(d)

    def score(self, text: str, resolved: Resolved) -> dict[str, Any]:
        return {**self.lm.score_mixture(text, resolved.mixture), "adapters": resolved.adapters}

    def augment(self, resolved: Resolved, docs: DocsRequest, tenant: str | None,
                messages: list[dict[str, Any]] | None = None, prompt: str | None = None) -> Augmented:
        """Retrieve passages for the last user message (or ``prompt``) from the collections ``tenant`` may
        read, under the row's mixture (``auto`` collections follow its adapters' tags), and build the prompt:
        passages at the start of the last user message (chat) or before the text (completions)."""
        from loramix.config import DocsConfig
        from loramix.documents import passage_prompt
        from loramix.rag import retrieve

        query = last_user_text(messages) if messages is not None else (prompt or "")
        if not query.strip():
            raise ConfigError("nothing to retrieve passages for: the last user message (or prompt) is empty")
        cfg = DocsConfig(collections=list(docs.collections), passages=docs.passages)
        with self._route_lock:  # the retriever shares the encoder with the router
            found = retrieve(self.lm, query, cfg, resolved.mixture, tenant)
        tok = self.lm.base.tokenizer
        if messages is not None:
            msgs = [{"role": m.get("role", "user"), "content": _text_of(m.get("content"))} for m in messages]
            pp = passage_prompt(tok, query, found, cfg.budget, chat=True, messages=msgs)
        else:
            pp = passage_prompt(tok, query, found, cfg.budget, chat=False)
        return Augmented(pp.ids, pp.boundaries, [p.to_dict() for p in pp.passages])

    # --- tokens and generation -----------------------------------------------------------------
    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.lm.base.tokenizer
        msgs = [{"role": m.get("role", "user"), "content": _text_of(m.get("content"))} for m in messages]
        if getattr(tok, "chat_template", None):
            enc = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
            return list(enc["input_ids"])
        return self.text_ids("\n".join(f"{m['role']}: {m['content']}" for m in msgs) + "\nassistant:")

    def text_ids(self, text: str) -> list[int]:
        return list(self.lm.base.tokenizer(text)["input_ids"])

    def submit(self, req: GenRequest, on_event: Callable[[Event], None]) -> Handle:
        if self._sched is None:
            raise Overloaded("the server is starting or stopping; retry in a moment")
        return self._sched.submit(req, on_event)  # type: ignore[no-any-return]

    def record(self, resolved: Resolved, finish: FinishEvent, tenant: str | None) -> None:
        ids = [aid for aid, _ in resolved.mixture if aid not in self.lm.extra_weights]
        if ids and finish.reason not in ("error", "cancelled"):
            self.lm.library.record_use(ids)
        self._snapshot()

    def _snapshot(self, force: bool = False) -> None:
        """The engine's cache counters for ``loramix stats`` (``meta/stats/engine.json``), at most every
        ``settings.stats_every_s`` seconds, and once more when the server stops."""
        now = time.monotonic()
        if not force and now - self._last_snapshot < self.settings.stats_every_s:
            return
        self._last_snapshot = now
        try:
            self.lm.write_stats()
        except OSError as e:  # a full disk must not fail a generation
            log.warning("could not write the stats snapshot: %s", e)

    # --- library ---------------------------------------------------------------------------------
    def list_adapters(self, tenant: str | None, q: str | None = None, tags: Sequence[str] = ()) -> list[dict[str, Any]]:
        recs = self.lm.library.list(tags=list(tags) or None, tenant=tenant)
        out = [r.to_dict() for r in recs]
        return [d for d in out if _matches(d, q)] if q else out

    def get_adapter(self, name: str, tenant: str | None) -> dict[str, Any]:
        return self.lm.library.get(name, tenant=tenant).to_dict()

    def add_adapter(self, folder: Path, name: str, tenant: str | None, description: str = "",
                    tags: Sequence[str] = (), examples: Sequence[str] | None = None, public: bool = False) -> dict[str, Any]:
        if name in self._runtime or name == self.base_id or name == "auto":
            raise AdapterExists(f"the name {name!r} is taken (a runtime adapter, the base model or 'auto'); pick another")
        with self._route_lock:  # keying updates the router's index (arrow keys take the model lock themselves)
            rec = self.lm.add_adapter(folder, name, description=description, domain_tags=list(tags),
                                      examples=list(examples) if examples else None, owner=tenant,
                                      public=bool(public) and tenant is not None)
        return rec.to_dict()

    def remove_adapter(self, name: str, tenant: str | None) -> None:
        with self.lm.lock:  # the scheduler thread reads the mixer's slot table
            self.lm.remove_adapter(name, tenant=tenant)

    def audit(self, action: str, tenant: str | None = None, adapter: str | None = None, outcome: str = "ok",
              detail: dict[str, Any] | None = None) -> None:
        self.lm.library.audit(action, tenant=tenant, adapter=adapter, outcome=outcome, detail=detail)

    def stats(self) -> EngineStats | None:
        """Scheduler and mixer numbers for the metrics (read at scrape time); None before start."""
        from loramix.serve.metrics import EngineStats

        sched = self._sched
        if sched is None or self.lm._mixer is None:
            return None
        s, m = sched.stats(), self.lm.mixer.stats()
        names = {aid: n for n, aid in self._runtime.items()}

        def name_of(aid: str) -> str:
            if aid not in names:
                try:
                    names[aid] = self.lm.library.get(aid).name
                except AdapterNotFound:  # a cached merge, or removed since
                    names[aid] = aid
            return names[aid]

        ret = self.lm._retriever
        kv = self.lm.kv_cache.stats()
        return EngineStats(retrieval_hits=ret.hits if ret is not None else 0,
                           retrieval_misses=ret.misses if ret is not None else 0,
                           kv_lookups=int(kv["lookups"]), kv_hits=int(kv["hits"]),
                           kv_passage_hits=int(kv["passage_hits"]), kv_tokens_reused=int(kv["tokens_reused"]),
                           queue_len=s.queue_len, running=s.running,
                           running_adapters=sorted({name_of(a) for a in s.running_adapters}),
                           waiting_adapters=sorted({name_of(a) for a in s.waiting_adapters}),
                           max_lora=int(m["capacity"]), adapters_loaded=int(m["loaded"]),
                           adapters_pinned=int(m["pinned"]), slot_hits=int(m["hits"]), slot_misses=int(m["misses"]),
                           slot_evictions=int(m["evictions"]), adapter_load_seconds=float(m["load_seconds"]),
                           steps=int(s.steps), max_batch=int(s.max_batch), last_batch_size=int(s.last_batch_size),
                           decode_batch_sizes=dict(s.batch_sizes))

    def load_lora(self, name: str, path: Path, tenant: str | None) -> None:
        from loramix.base import base_linear_shapes
        from loramix.store.peft_io import read_peft_dir

        if not name or name in ("auto", self.base_id) or name in self._runtime or name in self.lm.library:
            raise AdapterExists(f"an adapter or model named {name!r} already exists; unload it or pick another name")
        weights = read_peft_dir(path, base_linear_shapes(self.lm._base_arg), self.lm.library.max_bytes)
        aid = "runtime-" + hashlib.sha256(f"{name}\0{time.time()}".encode()).hexdigest()[:16]
        self.lm.extra_weights[aid] = weights
        self._runtime[name] = aid

    def unload_lora(self, name: str, tenant: str | None) -> None:
        aid = self._runtime.pop(name, None)
        if aid is None:
            raise AdapterNotFound(f"no runtime adapter named {name!r} (only adapters loaded with "
                                  "/v1/load_lora_adapter can be unloaded; DELETE /v1/adapters/NAME removes a library one)")
        with self.lm.lock:
            self.lm.mixer.evict(aid)
        self.lm.extra_weights.pop(aid, None)


def _matches(d: dict[str, Any], q: str) -> bool:
    hay = " ".join([d.get("name", ""), d.get("description", ""), *d.get("domain_tags", []), *d.get("skill_tags", [])])
    return all(w in hay.lower() for w in q.lower().split())


# --- a fake engine for fast HTTP tests ----------------------------------------------------------
@dataclass
class _FakeHandle:
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeEngine:
    """No model: a deterministic token stream and an in-memory library.

    Generation yields ``" w<N>"`` words, N from a hash of the prompt, mixture and seed. Markers in the
    prompt steer it: ``[eos]`` ends after 3 tokens, ``[fail]`` fails after 2 tokens, ``[overload]``
    is refused as Overloaded.
    """

    base_id: str = "fake-base"
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    runtime: dict[str, str] = field(default_factory=dict)
    uses: dict[str, int] = field(default_factory=dict)
    started: bool = False
    audit_rows: list[dict[str, Any]] = field(default_factory=list)  # what Library.audit would store
    # document collections: name -> {"owner", "public", "tags", "chunks": [(key, text)]}
    collections: dict[str, dict[str, Any]] = field(default_factory=dict)
    retrieval_hits: int = 0
    retrieval_misses: int = 0
    _retrieved: set[tuple[Any, ...]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.collections.setdefault("facts", {"owner": None, "public": False, "tags": ["law"], "chunks": [
            ("tort", "A tort is a civil wrong that causes a claimant to suffer loss or harm."),
            ("contract", "A contract is an agreement between parties that the law will enforce."),
            ("rose", "The rose is a woody flowering plant of the genus Rosa.")]})
        self.collections.setdefault("alice-notes", {"owner": "alice", "public": False, "tags": ["private"],
                                                    "chunks": [("secret", "Alice's private note about torts.")]})
        for i, (name, desc) in enumerate([("law", "contracts and torts law"), ("botany", "plants and flowers"),
                                          ("code", "c programming functions")]):
            self.adapters.setdefault(name, {"id": f"id{i}", "name": name, "description": desc,
                                            "domain_tags": [name], "skill_tags": [], "created": 1700000000.0 + i,
                                            "owner": None, "public": False})

    def _visible(self, name: str, tenant: str | None) -> bool:
        from loramix.store.tenancy import visible_to

        a = self.adapters.get(name)
        return a is not None and visible_to(a.get("owner"), bool(a.get("public")), tenant)

    def audit(self, action: str, tenant: str | None = None, adapter: str | None = None, outcome: str = "ok",
              detail: dict[str, Any] | None = None) -> None:
        self.audit_rows.append({"action": action, "tenant": tenant, "adapter": adapter, "outcome": outcome,
                                "detail": detail or {}})

    def stats(self) -> EngineStats:
        from loramix.serve.metrics import EngineStats

        return EngineStats(max_lora=8, adapters_loaded=len(self.uses), slot_hits=sum(self.uses.values()),
                           retrieval_hits=self.retrieval_hits, retrieval_misses=self.retrieval_misses)

    def start(self) -> None:
        self.started = True

    def close(self) -> None:
        self.started = False

    def info(self) -> dict[str, Any]:
        return {"model_id": self.base_id, "max_position_embeddings": 512, "adapters": len(self.adapters),
                "runtime_adapters": sorted(self.runtime)}

    def models(self, tenant: str | None) -> list[dict[str, Any]]:
        return [{"id": n, "created": int(a["created"])} for n, a in self.adapters.items() if self._visible(n, tenant)] + \
               [{"id": n, "created": 1700000000} for n in self.runtime]

    def _one(self, name: str, tenant: str | None = None) -> tuple[str, str]:
        if name in self.runtime:
            return self.runtime[name], name
        if not self._visible(name, tenant):
            raise AdapterNotFound(f"no model or adapter named {name!r}; GET /v1/models lists them")
        return self.adapters[name]["id"], name

    def resolve(self, model: str | None, tenant: str | None, query: str | None = None,
                route: RouteConfig | None = None) -> Resolved:
        def auto() -> Resolved:
            r = self.route(query or "", route or self.default_route(), tenant)
            return Resolved([(self.adapters[a["name"]]["id"], a["weight"]) for a in r["adapters"]],
                            [{"name": a["name"], "weight": a["weight"]} for a in r["adapters"]], True, 0.1)

        return resolve_model(model, self.base_id, lambda n: self._one(n, tenant),
                             lambda n: n in self.adapters or n in self.runtime, auto)

    def resolve_merged(self, recipe: MergeRecipe, tenant: str | None) -> Resolved:
        named = [self._one(n, tenant) for n in recipe.names]
        linear = named_mixture(list(zip(named, recipe.weights, strict=True)))
        if recipe.strategy == "linear":
            return linear
        shown = linear.adapters
        if recipe.strategy.startswith("dare") and recipe.density == 0.0:
            raise MergeError("density 0 drops every weight; expected a density in (0, 1]")
        return Resolved([(f"merged-{recipe.key()}", 1.0)], [{"name": recipe.strategy, "weight": 1.0,
                                                              "merged_from": shown}])

    def default_route(self) -> RouteConfig:
        return RouteConfig()

    def route(self, query: str, cfg: RouteConfig, tenant: str | None) -> dict[str, Any]:
        if not query.strip():
            raise ConfigError("nothing to route: the query (or last user message) is empty")
        words = set(query.lower().split())
        cands = [a for n, a in self.adapters.items()
                 if self._visible(n, tenant) and all(t in a["domain_tags"] for t in cfg.tags)]
        scored = sorted(((len(words & set(a["description"].split())) + 0.01 * i, a["name"])
                         for i, a in enumerate(reversed(cands))), reverse=True)[:cfg.k]
        if not scored:
            from loramix.errors import RoutingError

            raise RoutingError(f"no adapter carries all of the tags {cfg.tags}")
        from loramix.route.router import softmax_weights

        ws = softmax_weights([s for s, _ in scored], cfg.temperature)
        return {"adapters": [{"name": n, "score": s, "weight": w} for (s, n), w in zip(scored, ws, strict=True)],
                "latency_ms": 0.1, "strategy": cfg.strategy}

    def score(self, text: str, resolved: Resolved) -> dict[str, Any]:
        if not text:
            raise ConfigError("text is empty; expected some text to score")
        h = int(hashlib.sha256((text + repr(resolved.mixture)).encode()).hexdigest()[:6], 16)
        return {"loss": 3.0 + h / 2**24, "tokens": len(text), "adapters": resolved.adapters}

    def _readable(self, tenant: str | None) -> dict[str, dict[str, Any]]:
        from loramix.store.tenancy import visible_to

        return {n: c for n, c in self.collections.items() if visible_to(c["owner"], bool(c["public"]), tenant)}

    def augment(self, resolved: Resolved, docs: DocsRequest, tenant: str | None,
                messages: list[dict[str, Any]] | None = None, prompt: str | None = None) -> Augmented:
        """Word-overlap retrieval over the in-memory collections; passages prepended like LocalEngine does."""
        from loramix.errors import CollectionNotFound, DocumentError

        query = last_user_text(messages) if messages is not None else (prompt or "")
        if not query.strip():
            raise ConfigError("nothing to retrieve passages for: the last user message (or prompt) is empty")
        readable = self._readable(tenant)
        tags = {t for aid, _ in resolved.mixture for a in self.adapters.values() if a["id"] == aid for t in a["domain_tags"]}
        names: list[str] = []
        for spec in docs.collections:
            if spec.startswith("tag:"):
                picked = [n for n, c in readable.items() if spec[4:] in c["tags"]]
                if not picked:
                    raise DocumentError(f"no collection carries the tag {spec[4:]!r}")
            elif spec == "auto":
                picked = [n for n, c in readable.items() if tags & set(c["tags"])]
            elif spec in readable:
                picked = [spec]
            else:
                raise CollectionNotFound(f"no document collection named {spec!r}; collections: {', '.join(sorted(readable))}")
            names += [n for n in picked if n not in names]
        key = (query, tuple(sorted(names)), docs.passages)
        self.retrieval_hits += key in self._retrieved
        self.retrieval_misses += key not in self._retrieved
        self._retrieved.add(key)
        words = set(query.lower().split())
        scored = sorted(((len(words & set(text.lower().split())), n, f"{n}-{i}", k, text)
                         for n in names for i, (k, text) in enumerate(self.collections[n]["chunks"])),
                        key=lambda x: (-x[0], x[2]))[: docs.passages]
        block = "".join(f"[{i}] {t}\n" for i, (*_, t) in enumerate(scored, 1))
        if messages is not None:
            last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
            if last is None:
                raise ConfigError("passages go into the last user message, and this chat has none; expected a "
                                  "message with role 'user'")
            msgs = [dict(m) for m in messages]
            msgs[last]["content"] = block + "\n" + _text_of(msgs[last].get("content")) if block else msgs[last]["content"]
            ids = self.chat_ids(msgs)
        else:
            ids = self.text_ids((block + "\n" if block else "") + query)
        return Augmented(ids, [], [{"collection": n, "id": cid, "key": k, "score": float(sc)}
                                   for sc, n, cid, k, _ in scored])

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = "".join(f"<{m.get('role', 'user')}>{_text_of(m.get('content'))}\n" for m in messages) + "<assistant>"
        return self.text_ids(text)

    def text_ids(self, text: str) -> list[int]:
        return [b for b in text.encode()]

    def submit(self, req: GenRequest, on_event: Callable[[Event], None]) -> Handle:
        prompt = bytes(req.prompt_ids).decode(errors="replace")
        if "[overload]" in prompt:
            raise Overloaded("the fake engine is overloaded; retry later")
        p: SamplingParams = req.params
        seed = hashlib.sha256(f"{req.prompt_ids}{req.mixture}{p.seed if p.temperature > 0 else ''}".encode()).digest()
        text, n, reason = "", 0, "length"
        for i in range(p.max_new_tokens):
            if "[fail]" in prompt and i == 2:
                on_event(FinishEvent("error", text, len(req.prompt_ids), n, error="the fake engine failed"))
                return _FakeHandle()
            if "[eos]" in prompt and i == 3 and not p.ignore_eos:
                on_event(TokenEvent(0, "", -0.5, True))
                n, reason = n + 1, "eos"
                break
            word = f" w{seed[i % 32] % 50}"
            full = text + word
            cut = min((full.find(s) for s in p.stop if s and s in full), default=-1)
            n += 1
            if cut >= 0:
                on_event(TokenEvent(100 + i, full[len(text):cut] if cut > len(text) else "", -1.0, False))
                text, reason = full[:cut], "stop"
                break
            on_event(TokenEvent(100 + i, word, -1.0 - (i % 3) * 0.25, False))
            text = full
        on_event(FinishEvent(reason, text, len(req.prompt_ids), n, ttft_s=0.001, total_s=0.002))
        return _FakeHandle()

    def record(self, resolved: Resolved, finish: FinishEvent, tenant: str | None) -> None:
        for aid, _ in resolved.mixture:
            self.uses[aid] = self.uses.get(aid, 0) + 1

    def list_adapters(self, tenant: str | None, q: str | None = None, tags: Sequence[str] = ()) -> list[dict[str, Any]]:
        out = [dict(a) for n, a in self.adapters.items()
               if self._visible(n, tenant) and all(t in a["domain_tags"] for t in tags)]
        return [d for d in out if _matches(d, q)] if q else out

    def get_adapter(self, name: str, tenant: str | None) -> dict[str, Any]:
        if not self._visible(name, tenant):
            raise AdapterNotFound(f"no adapter named {name!r}")
        return dict(self.adapters[name])

    def add_adapter(self, folder: Path, name: str, tenant: str | None, description: str = "",
                    tags: Sequence[str] = (), examples: Sequence[str] | None = None, public: bool = False) -> dict[str, Any]:
        from loramix.store.peft_io import read_peft_dir
        from loramix.store.records import check_name

        check_name(name)
        if name in self.adapters or name in self.runtime:
            raise AdapterExists(f"an adapter named {name!r} already exists")
        w = read_peft_dir(folder)
        self.adapters[name] = {"id": f"id{len(self.adapters)}-{name}", "name": name, "description": description,
                               "domain_tags": list(tags), "skill_tags": [], "created": time.time(), "rank": w.rank,
                               "examples": len(examples or []), "owner": tenant,
                               "public": bool(public) and tenant is not None}
        return dict(self.adapters[name])

    def remove_adapter(self, name: str, tenant: str | None) -> None:
        from loramix.errors import AccessDenied

        if not self._visible(name, tenant):
            raise AdapterNotFound(f"no adapter named {name!r}")
        if tenant is not None and self.adapters[name].get("owner") != tenant:
            raise AccessDenied(f"adapter {name!r} is not yours to delete; expected one of your own adapters")
        del self.adapters[name]

    def load_lora(self, name: str, path: Path, tenant: str | None) -> None:
        from loramix.store.peft_io import read_peft_dir

        if name in self.adapters or name in self.runtime:
            raise AdapterExists(f"an adapter or model named {name!r} already exists")
        read_peft_dir(path)
        self.runtime[name] = f"runtime-{name}"

    def unload_lora(self, name: str, tenant: str | None) -> None:
        if self.runtime.pop(name, None) is None:
            raise AdapterNotFound(f"no runtime adapter named {name!r}")

