"""Continuous batching of requests that each carry their own adapter mixture, over one MixedModel.

One background thread owns the model. Each turn of its loop (one "step", under the shared lock):

1. rows whose request was cancelled leave the batch;
2. waiting requests are admitted in FIFO order while the batch has room, their prompts fit the
   prefill budget and the mixer can hold their adapters next to the running rows' (``mm.fits``);
   a request whose adapters do not fit yet waits (later requests may pass it, at most
   ``max_bypass`` times) instead of failing;
3. the admitted prompts are prefilled together (left-padded), each samples its first token, and their
   KV cache is merged into the running batch's (both left-padded to a common length); with a
   ``prefix_cache``, a prompt that carries ``prefix_boundaries`` (retrieved passages, see
   :mod:`loramix.documents.kvcache`) is prefilled alone instead, reusing the longest cached prefix
   under its own mixture and storing its new passage prefixes;
4. one decode step for every running row; rows that finish leave by index-select of the cache.

The running batch keeps, per row: a 2-D attention mask over the cache columns (0 = padding), the
position id of its next token, and its request's sampling state (own torch.Generator, stop strings,
incremental detokeniser). The mixer's per-row adapter metadata (:class:`~loramix.mix.MixBatch`) is
built once per batch composition and released when a row joins or leaves.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from loramix.base import maybe_autocast
from loramix.errors import ConfigError, MixError, Overloaded
from loramix.mix import MixBatch, MixedModel
from loramix.serve.memory import release_free_memory

__all__ = ["FinishEvent", "GenRequest", "RequestHandle", "SamplingParams", "Scheduler", "SchedulerConfig",
           "SchedulerStats", "TokenEvent"]

log = logging.getLogger(__name__)

MIN_LOGPROB = -1e4  # reported instead of -inf / NaN: clients (lorax-client 0.6) need a finite number


@dataclass
class SchedulerConfig:
    """How requests are batched."""

    max_batch: int = 32  # rows decoding together; 1 = no batching
    max_prefill_tokens: int = 4096  # new prompts prefilled together per step, at most this many (padded) tokens
    max_queue: int = 256  # waiting requests beyond this: submit raises Overloaded
    max_bypass: int = 16  # later requests that may start before a waiting one whose adapters do not fit yet

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.max_prefill_tokens < 1:
            raise ConfigError(f"max_prefill_tokens must be at least 1, got {self.max_prefill_tokens}")
        if self.max_queue < 0 or self.max_bypass < 0:
            raise ConfigError("max_queue and max_bypass must be >= 0")


@dataclass
class SamplingParams:
    """One request's decoding settings."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None  # per-request torch.Generator: same seed -> same tokens
    stop: list[str] = field(default_factory=list)  # stop strings (text-level; excluded from the text)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be at least 1 (or None for no limit), got {self.top_k}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"stop strings must be non-empty strings, got {self.stop!r}")


@dataclass
class GenRequest:
    prompt_ids: list[int]
    mixture: list[tuple[str, float]]  # (adapter id, weight); [] = base model
    params: SamplingParams = field(default_factory=SamplingParams)
    prefix_boundaries: list[int] = field(default_factory=list)  # passage prefix offsets (KV prefix cache)


@dataclass
class TokenEvent:
    """One per generated token, in order."""

    id: int
    text: str  # the new text this token completes (may be ""; held back while it could start a stop string)
    logprob: float  # log-softmax of the unmodified distribution, always finite
    special: bool


@dataclass
class FinishEvent:
    """Exactly one per request, last. ``text`` equals the concatenation of its TokenEvents' text."""

    reason: str  # "length" | "eos" | "stop" | "error" | "cancelled"
    text: str  # whole generated text (stop string excluded)
    prompt_tokens: int
    generated_tokens: int
    error: str | None = None
    queue_s: float = 0.0  # submit -> admitted
    ttft_s: float = 0.0  # submit -> first token
    total_s: float = 0.0  # submit -> finished
    seed: int | None = None  # the sampling seed used (drawn at random when the request gave none)


Event = TokenEvent | FinishEvent


@dataclass
class SchedulerStats:
    """A snapshot for metrics."""

    queue_len: int
    running: int
    running_adapters: list[str]  # distinct adapter ids of the running rows
    waiting_adapters: list[str]  # distinct adapter ids of the queued requests
    steps: int  # model calls (prefill + decode)
    prefill_steps: int
    decode_steps: int
    last_batch_size: int  # rows in the last decode step
    batch_sizes: dict[int, int]  # decode steps per batch size
    prompt_tokens: int  # totals over finished + running requests
    generated_tokens: int
    finished: dict[str, int]  # requests finished per reason
    max_batch: int


class RequestHandle:
    """What :meth:`Scheduler.submit` returns: cancel the request (e.g. the client went away)."""

    def __init__(self, sched: Scheduler, rid: int):
        self.id = rid
        self._sched = sched
        self.cancelled = False
        self.done = threading.Event()  # set once the FinishEvent was delivered

    def cancel(self) -> None:
        """The request leaves at the next step and gets ``FinishEvent(reason="cancelled")``."""
        self.cancelled = True
        self._sched._wake()


@dataclass(eq=False)
class _Req:
    """A submitted request: its inputs, then its decoding state once running."""

    req: GenRequest
    on_event: Callable[[Event], None]
    handle: RequestHandle
    ids: frozenset[str]  # adapters it uses (weight != 0)
    seed: int
    t_submit: float
    gen: torch.Generator | None = None
    t_start: float = 0.0
    t_first: float = 0.0
    bypassed: int = 0  # later requests admitted before it while its adapters did not fit
    out: list[int] = field(default_factory=list)  # generated ids
    text: str = ""  # detokenised generated text (stop strings not yet cut)
    sent: int = 0  # chars of ``text`` sent in TokenEvents
    prefix_off: int = 0  # incremental detokeniser window (see Scheduler._detok)
    read_off: int = 0
    finished: bool = False


@dataclass
class _Batch:
    """The running rows and their KV cache; all tensors share the row order of ``rows``."""

    rows: list[_Req] = field(default_factory=list)
    cache: DynamicCache | None = None  # per layer keys/values (B, H, T, D)
    mask: torch.Tensor | None = None  # (B, T) 1 = real token, 0 = left padding
    pos: torch.Tensor | None = None  # (B,) position id of each row's next input token
    last: torch.Tensor | None = None  # (B,) each row's next input token (its last sampled one)
    mix: MixBatch | None = None  # the mixer's metadata for exactly these rows; None after a change


class _RowsFailed(Exception):
    def __init__(self, failed: list[tuple[_Req, str]]):
        super().__init__(f"{len(failed)} rows failed")
        self.failed = failed


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _layers(cache: DynamicCache) -> list[Any]:
    """The cache's per-layer DynamicLayers (each ``.keys`` / ``.values`` is (B, H, T, D))."""
    return list(cache.layers)


def _lpad(x: torch.Tensor, n: int) -> torch.Tensor:
    """Pad dim -2 of (B, H, T, D) (or dim -1 of (B, T)) with ``n`` zeros on the left."""
    if n == 0:
        return x
    return F.pad(x, (0, 0, n, 0)) if x.dim() == 4 else F.pad(x, (n, 0))


class Scheduler:
    """Continuous batching over a :class:`~loramix.mix.MixedModel`; see the module docstring."""

    def __init__(self, mixer: MixedModel, cfg: SchedulerConfig | None = None, *, eos_ids: set[int] | None = None,
                 lock: threading.RLock | None = None, prefix_cache: Any = None):
        self.mm = mixer
        self.prefix_cache = prefix_cache  # a loramix.documents.PrefixKVCache, or None
        self.cfg = cfg or SchedulerConfig()
        self.tok = mixer.tokenizer
        self.model = mixer.model
        self.lock = lock if lock is not None else threading.RLock()
        self.eos_ids = set(eos_ids) if eos_ids is not None else self._default_eos()
        self.special_ids = set(getattr(self.tok, "all_special_ids", []) or [])
        emb: Any = self.model.get_input_embeddings()
        self.vocab = int(emb.weight.shape[0])
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else min(self.eos_ids, default=0)
        self.device = next(self.model.parameters()).device
        probe = DynamicCache(config=self.model.config)
        if probe.layers and any(type(layer) is not DynamicLayer for layer in probe.layers):
            raise ConfigError("continuous batching needs a model whose layers all use full attention "
                              f"(got cache layers {sorted({type(x).__name__ for x in probe.layers})})")
        self._cond = threading.Condition()
        self._queue: deque[_Req] = deque()
        self._batch = _Batch()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._next_id = 0
        self._counts: Counter[str] = Counter()
        self._batch_sizes: Counter[int] = Counter()
        self._last_batch = 0
        self._admitted: list[_Req] = []  # popped from the queue this step, not yet in the batch

    def _default_eos(self) -> set[int]:
        ids: set[int] = set()
        if self.tok.eos_token_id is not None:
            ids.add(int(self.tok.eos_token_id))
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif gen_eos:
            ids.update(int(i) for i in gen_eos)
        return ids

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread that owns the model (idempotent)."""
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="loramix-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the current step, then end every waiting and running request with "cancelled"."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if thread is None or not thread.is_alive():
            self._shutdown()  # also covers requests submitted before start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # --- submitting ----------------------------------------------------------------------------------
    def submit(self, req: GenRequest, on_event: Callable[[Event], None]) -> RequestHandle:
        """Queue a request; returns at once. ``on_event`` is called from the scheduler thread with each
        TokenEvent and then one FinishEvent. Raises Overloaded when the queue is full or the scheduler
        stopped, ConfigError / MixError for a request that could never run."""
        prompt = [int(t) for t in req.prompt_ids]
        if not prompt:
            raise ConfigError("the prompt is empty; expected at least one token id")
        bad = [t for t in prompt if not 0 <= t < self.vocab]
        if bad:
            raise ConfigError(f"prompt token id {bad[0]} is out of range; expected 0 <= id < {self.vocab}")
        ids = frozenset(str(a) for a, w in req.mixture if float(w) != 0.0)
        if len(ids) > self.mm.cfg.capacity:
            raise MixError(f"the mixture uses {len(ids)} adapters but the mixer has {self.mm.cfg.capacity} slots; "
                           "use fewer adapters or raise MixConfig.capacity")
        bounds = [int(b) for b in req.prefix_boundaries]
        if any(not 0 <= b <= len(prompt) for b in bounds):
            raise ConfigError(f"prefix_boundaries {bounds} must lie within the prompt's {len(prompt)} tokens")
        req = GenRequest(prompt_ids=prompt, mixture=[(str(a), float(w)) for a, w in req.mixture], params=req.params,
                         prefix_boundaries=bounds)
        seed = req.params.seed if req.params.seed is not None else secrets.randbits(63)
        with self._cond:
            if self._stopping:
                raise Overloaded("the scheduler is stopping; retry on another server or later")
            if len(self._queue) >= self.cfg.max_queue:
                raise Overloaded(f"{len(self._queue)} requests are waiting (max_queue={self.cfg.max_queue}); "
                                 "retry later")
            self._next_id += 1
            handle = RequestHandle(self, self._next_id)
            self._queue.append(_Req(req=req, on_event=on_event, handle=handle, ids=ids, seed=seed,
                                    t_submit=time.perf_counter()))
            self._cond.notify_all()
        return handle

    def generate(self, req: GenRequest, timeout: float | None = None) -> tuple[list[TokenEvent], FinishEvent]:
        """Submit and wait (starts the scheduler if needed): the TokenEvents and the FinishEvent."""
        self.start()
        tokens: list[TokenEvent] = []
        box: list[FinishEvent] = []

        def on_event(ev: Event) -> None:
            if isinstance(ev, FinishEvent):
                box.append(ev)
            else:
                tokens.append(ev)

        handle = self.submit(req, on_event)
        if not handle.done.wait(timeout):
            handle.cancel()
            handle.done.wait()
        return tokens, box[0]

    def stats(self) -> SchedulerStats:
        with self._cond:
            queue = list(self._queue)
            rows = list(self._batch.rows)
            counts = dict(self._counts)
            sizes = dict(self._batch_sizes)
        return SchedulerStats(
            queue_len=len(queue), running=len(rows),
            running_adapters=sorted({a for r in rows for a in r.ids}),
            waiting_adapters=sorted({a for r in queue for a in r.ids}),
            steps=counts.get("prefill_steps", 0) + counts.get("decode_steps", 0),
            prefill_steps=counts.get("prefill_steps", 0), decode_steps=counts.get("decode_steps", 0),
            last_batch_size=self._last_batch, batch_sizes=sizes,
            prompt_tokens=counts.get("prompt_tokens", 0), generated_tokens=counts.get("generated_tokens", 0),
            finished={k[9:]: v for k, v in counts.items() if k.startswith("finished:")},
            max_batch=self.cfg.max_batch)

    # --- the loop ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        busy = False  # ran a step since the batch last drained
        while True:
            with self._cond:
                idle = not self._stopping and not self._queue and not self._batch.rows
            if idle and busy:  # drained: hand the activations' freed heap back to the OS (serve/memory.py)
                release_free_memory()
                busy = False
            with self._cond:
                while not self._stopping and not self._queue and not self._batch.rows:
                    self._cond.wait()
                if self._stopping:
                    break
            busy = True
            events: list[tuple[_Req, Event]] = []
            try:
                progressed = self._step(events)
            except Exception as e:  # a bug or a failure of the whole batch: fail its rows, keep serving
                log.exception("scheduler step failed")
                for r in self._batch.rows + self._admitted:
                    self._finish(r, "error", events, error=_err(e))
                with self.lock:
                    self._reset_batch()
                progressed = True
            self._admitted = []
            self._deliver(events)
            if not progressed:  # waiting requests whose adapters do not fit, nothing running: wait a little
                with self._cond:
                    self._cond.wait(0.01)
        self._shutdown()

    def _shutdown(self) -> None:
        events: list[tuple[_Req, Event]] = []
        with self._cond:
            waiting, self._queue = list(self._queue), deque()
        for r in waiting + list(self._batch.rows):
            self._finish(r, "cancelled", events)
        with self.lock:
            self._reset_batch()
        self._deliver(events)

    def _deliver(self, events: list[tuple[_Req, Event]]) -> None:
        """Call the callbacks outside the model lock; a raising callback cancels its request."""
        for r, ev in events:
            try:
                r.on_event(ev)
            except Exception:
                log.exception("on_event callback of request %d raised; cancelling it", r.handle.id)
                r.handle.cancelled = True
            if isinstance(ev, FinishEvent):
                r.handle.done.set()

    def _step(self, events: list[tuple[_Req, Event]]) -> bool:
        """One turn: drop cancelled rows, admit + prefill, one decode step. Whether anything happened."""
        with self.lock, torch.inference_mode(), maybe_autocast(self.mm.cfg.bf16):
            self._drop_cancelled(events)
            new = self._admit()
            if new:
                self._prefill(new, events)
            if self._batch.rows:
                self._decode(events)
                return True
            return bool(new)

    # --- admission -----------------------------------------------------------------------------------
    def _drop_cancelled(self, events: list[tuple[_Req, Event]]) -> None:
        with self._cond:
            gone = [r for r in self._queue if r.handle.cancelled]
            for r in gone:
                self._queue.remove(r)
        for r in gone:
            self._finish(r, "cancelled", events)
        rows = self._batch.rows
        if any(r.handle.cancelled for r in rows):
            for r in rows:
                if r.handle.cancelled:
                    self._finish(r, "cancelled", events)
            self._keep([i for i, r in enumerate(rows) if not r.finished])

    def _admit(self) -> list[_Req]:
        """Pop the requests to prefill now (FIFO; see the module docstring)."""
        room = self.cfg.max_batch - len(self._batch.rows)
        ids = set().union(*(r.ids for r in self._batch.rows))  # adapters of the running rows (pinned)
        chosen: list[_Req] = []
        skipped: list[_Req] = []  # waiting requests passed over because their adapters do not fit yet
        longest = 0
        with self._cond:
            for r in self._queue:
                if len(chosen) >= room or any(s.bypassed >= self.cfg.max_bypass for s in skipped):
                    break  # full, or a request passed over often enough waits for nobody else to pass it
                n = max(longest, len(r.req.prompt_ids))
                if chosen and n * (len(chosen) + 1) > self.cfg.max_prefill_tokens:
                    break  # the prefill budget is spent; the rest goes next step, in order
                if not self.mm.fits(sorted(ids | r.ids)):
                    skipped.append(r)
                    continue
                chosen.append(r)
                ids |= r.ids
                longest = n
                for s in skipped:
                    s.bypassed += 1
            for r in chosen:
                self._queue.remove(r)
        self._admitted = chosen
        now = time.perf_counter()
        for r in chosen:
            r.t_start = now
            r.gen = torch.Generator(device=self.device).manual_seed(r.seed) if r.req.params.temperature > 0 else None
        return chosen

    # --- mixer metadata ------------------------------------------------------------------------------
    def _prepare(self, rows: list[_Req]) -> MixBatch:
        """``mm.prepare`` for these rows. When it fails, find the rows whose mixture fails alone and
        raise _RowsFailed with them (the caller fails those and retries); else re-raise."""
        try:
            return self.mm.prepare([r.req.mixture for r in rows])
        except Exception as e:
            failed = []
            for r in rows:
                try:
                    self.mm.release(self.mm.prepare([r.req.mixture]))
                except Exception as e2:
                    failed.append((r, _err(e2)))
            if failed:
                raise _RowsFailed(failed) from e
            raise

    def _release_mix(self) -> None:
        if self._batch.mix is not None:
            self.mm.release(self._batch.mix)
            self._batch.mix = None

    # --- prefill -------------------------------------------------------------------------------------
    def _prefill(self, new: list[_Req], events: list[tuple[_Req, Event]]) -> None:
        """Prefill ``new`` together, sample each row's first token and add the rows that go on to the batch.
        When the model call fails, each row is retried alone so that only the failing ones fail."""
        self._release_mix()  # the composition changes; frees the running rows' pins for the prepare below
        if self.prefix_cache is not None and any(r.req.prefix_boundaries for r in new):
            for r in [r for r in new if r.req.prefix_boundaries]:
                self._prefill_cached(r, events)
            new = [r for r in new if not r.req.prefix_boundaries]
            if not new:
                return
        try:
            done = self._prefill_forward(new, events)
        except Exception as e:
            if len(new) == 1:
                log.warning("prefill failed: %s", _err(e))
                self._finish(new[0], "error", events, error=_err(e))
                return
            for r in new:
                if not r.finished:
                    self._prefill([r], events)
            return
        if done is not None:
            self._join(*done, events)

    def _prefill_cached(self, r: _Req, events: list[tuple[_Req, Event]]) -> None:
        """Prefill one row through the prefix cache (scope: its mixture), sample its first token, join."""
        try:
            mix = self._prepare([r])
        except Exception as e:
            self._finish(r, "error", events, error=e.failed[0][1] if isinstance(e, _RowsFailed) else _err(e))
            return

        def forward(x: torch.Tensor, past: Any) -> Any:  # x (1, t) after the `start` cached tokens
            start = 0 if past is None else int(past.get_seq_length())
            pos = torch.arange(start, start + x.shape[1], device=self.device).unsqueeze(0)  # (1, t)
            return self.mm.forward(mix, input_ids=x.to(self.device), position_ids=pos, use_cache=True, logits_to_keep=1,
                                   past_key_values=past if past is not None else DynamicCache(config=self.model.config))

        try:
            scope = ("scheduler", tuple((a, round(float(w), 6)) for a, w in r.req.mixture))
            pre = self.prefix_cache.prefill(forward, r.req.prompt_ids, r.req.prefix_boundaries, scope)
        except Exception as e:
            log.warning("prefill failed: %s", _err(e))
            self._finish(r, "error", events, error=_err(e))
            return
        finally:
            self.mm.release(mix)
        mask = torch.ones(1, len(r.req.prompt_ids), dtype=torch.long, device=self.device)  # (1, L)
        self._count("prefix_cache_tokens_reused", pre.reused)
        self._join([r], pre.past, mask, pre.logits[:, -1].float(), events)

    def _prefill_forward(self, new: list[_Req], events: list[tuple[_Req, Event]]
                         ) -> tuple[list[_Req], DynamicCache, torch.Tensor, torch.Tensor] | None:
        """One model call over the left-padded prompts: (rows, cache, mask (N, L), last logits (N, V))."""
        while True:
            try:
                mix = self._prepare(new)
                break
            except _RowsFailed as f:
                for r, msg in f.failed:
                    self._finish(r, "error", events, error=msg)
                new = [r for r in new if not r.finished]
                if not new:
                    return None
        try:
            n, L = len(new), max(len(r.req.prompt_ids) for r in new)
            ids = torch.full((n, L), self.pad_id, dtype=torch.long)  # (N, L) left-padded prompts
            mask = torch.zeros(n, L, dtype=torch.long)  # (N, L)
            for i, r in enumerate(new):
                p = r.req.prompt_ids
                ids[i, L - len(p):] = torch.tensor(p)
                mask[i, L - len(p):] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            pos = (mask.cumsum(1) - 1).clamp(min=0)  # (N, L) position of each token within its own prompt
            cache = DynamicCache(config=self.model.config)
            out = self.mm.forward(mix, input_ids=ids, attention_mask=mask, position_ids=pos,
                                  past_key_values=cache, use_cache=True, logits_to_keep=1)
        finally:
            self.mm.release(mix)
        return new, cache, mask, out.logits[:, -1].float()

    def _join(self, new: list[_Req], cache: DynamicCache, mask: torch.Tensor, logits: torch.Tensor,
              events: list[tuple[_Req, Event]]) -> None:
        """First tokens of prefilled rows (logits (N, V)); those that go on join the running batch."""
        self._count("prefill_steps")
        self._count("prompt_tokens", int(mask.sum()))
        toks, lps = self._sample(new, logits)
        for r, t, lp in zip(new, toks, lps, strict=True):
            self._advance(r, t, lp, events)
        keep = [i for i, r in enumerate(new) if not r.finished]
        if not keep:
            return
        idx = torch.tensor(keep, device=self.device)
        for layer in _layers(cache):
            layer.keys = layer.keys.index_select(0, idx)  # (N', H, L, D)
            layer.values = layer.values.index_select(0, idx)
        self._merge([new[i] for i in keep], cache, mask.index_select(0, idx),
                    mask.sum(1).index_select(0, idx), torch.tensor([toks[i] for i in keep], device=self.device))

    def _merge(self, rows: list[_Req], cache: DynamicCache, mask: torch.Tensor, pos: torch.Tensor,
               last: torch.Tensor) -> None:
        """Append prefilled rows (cache (N, H, L, D), mask (N, L), pos/last (N,)) to the running batch."""
        b = self._batch
        if not b.rows:
            with self._cond:
                b.rows = rows
            b.cache, b.mask, b.pos, b.last = cache, mask, pos, last
            self._trim()
            return
        assert b.cache is not None and b.mask is not None and b.pos is not None and b.last is not None
        t_old, t_new = b.mask.shape[1], mask.shape[1]
        t = max(t_old, t_new)
        for old, add in zip(_layers(b.cache), _layers(cache), strict=True):
            old.keys = torch.cat([_lpad(old.keys, t - t_old), _lpad(add.keys, t - t_new)], 0)  # (B+N, H, T, D)
            old.values = torch.cat([_lpad(old.values, t - t_old), _lpad(add.values, t - t_new)], 0)
        b.mask = torch.cat([_lpad(b.mask, t - t_old), _lpad(mask, t - t_new)], 0)  # (B+N, T)
        b.pos = torch.cat([b.pos, pos])  # (B+N,)
        b.last = torch.cat([b.last, last])  # (B+N,)
        with self._cond:
            b.rows = b.rows + rows
        b.mix = None

    # --- decode --------------------------------------------------------------------------------------
    def _decode(self, events: list[tuple[_Req, Event]]) -> None:
        b = self._batch
        while b.mix is None:
            try:
                b.mix = self._prepare(b.rows)
            except _RowsFailed as f:
                for r, msg in f.failed:
                    self._finish(r, "error", events, error=msg)
                self._keep([i for i, r in enumerate(b.rows) if not r.finished])
                if not b.rows:
                    return
        assert b.cache is not None and b.mask is not None and b.pos is not None and b.last is not None
        rows = b.rows
        mask = torch.cat([b.mask, b.mask.new_ones(len(rows), 1)], 1)  # (B, T+1)
        try:
            out = self.mm.forward(b.mix, input_ids=b.last[:, None], attention_mask=mask,
                                  position_ids=b.pos[:, None], past_key_values=b.cache, use_cache=True,
                                  logits_to_keep=1)
        except Exception as e:  # the step is shared: every row in it fails; the cache is unusable
            log.warning("decode step of %d rows failed: %s", len(rows), _err(e))
            for r in rows:
                self._finish(r, "error", events, error=_err(e))
            self._reset_batch()
            return
        b.mask, b.pos = mask, b.pos + 1
        self._count("decode_steps")
        self._last_batch = len(rows)
        with self._cond:
            self._batch_sizes[len(rows)] += 1
        toks, lps = self._sample(rows, out.logits[:, -1].float())  # logits (B, V)
        for r, t, lp in zip(rows, toks, lps, strict=True):
            self._advance(r, t, lp, events)
        b.last = torch.tensor(toks, device=self.device)
        if any(r.finished for r in rows):
            self._keep([i for i, r in enumerate(rows) if not r.finished])

    def _keep(self, keep: list[int]) -> None:
        """Keep only these rows of the running batch (index-select), then trim all-padding columns."""
        b = self._batch
        if len(keep) == len(b.rows):
            return
        self._release_mix()
        if not keep:
            self._reset_batch()
            return
        assert b.cache is not None and b.mask is not None and b.pos is not None and b.last is not None
        idx = torch.tensor(keep, device=self.device)
        for layer in _layers(b.cache):
            layer.keys = layer.keys.index_select(0, idx)  # (B', H, T, D)
            layer.values = layer.values.index_select(0, idx)
        b.mask, b.pos, b.last = b.mask.index_select(0, idx), b.pos.index_select(0, idx), b.last.index_select(0, idx)
        with self._cond:
            b.rows = [b.rows[i] for i in keep]
        self._trim()

    def _trim(self) -> None:
        """Drop leading cache columns that are padding in every row."""
        b = self._batch
        assert b.cache is not None and b.mask is not None
        first = int(b.mask.any(0).int().argmax())  # first column some row uses
        if first > 0:
            for layer in _layers(b.cache):
                layer.keys = layer.keys[:, :, first:]  # (B, H, T', D)
                layer.values = layer.values[:, :, first:]
            b.mask = b.mask[:, first:]  # (B, T')

    def _reset_batch(self) -> None:
        self._release_mix()
        with self._cond:
            self._batch = _Batch()

    # --- sampling and text ---------------------------------------------------------------------------
    def _sample(self, rows: list[_Req], logits: torch.Tensor) -> tuple[list[int], list[float]]:
        """Each row's next token (greedy or its own sampler) and its log-probability."""
        logp = torch.log_softmax(logits, -1)  # (B, V)
        toks = logits.argmax(-1)  # (B,)
        for i, r in enumerate(rows):
            p = r.req.params
            if p.temperature <= 0:
                continue
            x = logits[i] / p.temperature  # (V,)
            if p.top_k is not None and p.top_k < x.shape[0]:
                kth = torch.topk(x, p.top_k).values[-1]
                x = x.masked_fill(x < kth, float("-inf"))
            if p.top_p < 1.0:
                sx, order = torch.sort(x, descending=True)  # (V,)
                probs = torch.softmax(sx, -1)
                drop = probs.cumsum(-1) - probs >= p.top_p  # tokens after the nucleus is complete
                x = x.index_fill(0, order[drop], float("-inf"))
            toks[i] = torch.multinomial(torch.softmax(x, -1), 1, generator=r.gen)[0]
        lps = logp.gather(1, toks[:, None])[:, 0]  # (B,)
        lps = torch.nan_to_num(lps, nan=MIN_LOGPROB, neginf=MIN_LOGPROB).clamp(min=MIN_LOGPROB)
        return [int(t) for t in toks.tolist()], [float(v) for v in lps.tolist()]

    def _detok(self, r: _Req, final: bool = False) -> str:
        """New text from the tokens generated since the last call. Decodes a window that starts one emitted
        chunk back (so tokenisers that drop a word's leading space at the start of text still get it right)
        and waits while the text ends in an incomplete UTF-8 sequence, unless ``final``."""
        kw: dict[str, Any] = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
        prefix = self.tok.decode(r.out[r.prefix_off:r.read_off], **kw)
        full = self.tok.decode(r.out[r.prefix_off:], **kw)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            r.prefix_off, r.read_off = r.read_off, len(r.out)
            return full[len(prefix):]
        return ""

    def _advance(self, r: _Req, tok: int, lp: float, events: list[tuple[_Req, Event]]) -> None:
        """Append a sampled token to a row: emit its TokenEvent and, when it ends the row, the FinishEvent."""
        if not r.out:
            r.t_first = time.perf_counter()
        r.out.append(tok)
        self._count("generated_tokens")
        p = r.req.params
        before = len(r.text)
        r.text += self._detok(r)
        cut = None
        if p.stop:
            start = max(0, before - max(len(s) for s in p.stop) + 1)
            hits = [i for i in (r.text.find(s, start) for s in p.stop) if i >= 0]
            cut = min(hits) if hits else None
        reason = None
        if cut is not None:
            reason = "stop"
        elif tok in self.eos_ids and not p.ignore_eos:
            reason = "eos"
        elif len(r.out) >= p.max_new_tokens:
            reason = "length"
        if reason is None:
            end = len(r.text) - _held_back(r.text, p.stop)  # a possible stop string's start is held back
        elif cut is None:
            r.text += self._detok(r, final=True)
            end = len(r.text)
        else:
            r.text = r.text[:cut]
            end = cut
        events.append((r, TokenEvent(id=tok, text=r.text[r.sent:end], logprob=lp, special=tok in self.special_ids)))
        r.sent = max(r.sent, end)
        if reason is not None:
            self._finish(r, reason, events)

    def _finish(self, r: _Req, reason: str, events: list[tuple[_Req, Event]], error: str | None = None) -> None:
        if r.finished:
            return
        r.finished = True
        now = time.perf_counter()
        start = r.t_start or now
        self._count(f"finished:{reason}")
        events.append((r, FinishEvent(reason=reason, text=r.text[:r.sent], prompt_tokens=len(r.req.prompt_ids),
                                      generated_tokens=len(r.out), error=error, queue_s=start - r.t_submit,
                                      ttft_s=(r.t_first - r.t_submit) if r.out else 0.0,
                                      total_s=now - r.t_submit, seed=r.seed)))

    def _count(self, key: str, n: int = 1) -> None:
        with self._cond:
            self._counts[key] += n


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best

