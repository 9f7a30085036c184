"""TEMPORARY serial stand-in for the continuous-batching scheduler (``loramix.serve.scheduler``).

Same API as the scheduler contract (docs: SERVE.md), but it runs one request at a time. It exists only
so the HTTP layer can be tested against the real model before the scheduler lands; delete it then.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from loramix.errors import LoramixError


class Overloaded(LoramixError):
    """The server is at capacity; retrying later makes sense."""


@dataclass
class SchedulerConfig:
    max_batch: int = 32
    max_prefill_tokens: int = 4096
    max_queue: int = 256


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class GenRequest:
    prompt_ids: list[int]
    mixture: list[tuple[str, float]]
    params: SamplingParams


@dataclass
class TokenEvent:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass
class FinishEvent:
    reason: str
    text: str
    prompt_tokens: int
    generated_tokens: int
    error: str | None = None
    queue_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0


Event = TokenEvent | FinishEvent


@dataclass
class RequestHandle:
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class SchedulerStats:
    queue_len: int = 0
    running: int = 0
    running_adapters: list[str] = field(default_factory=list)
    waiting_adapters: list[str] = field(default_factory=list)
    steps: int = 0


class Scheduler:
    def __init__(self, mixer: Any, cfg: SchedulerConfig | None = None, *, eos_ids: set[int] | None = None,
                 lock: threading.RLock | None = None):
        self.mm, self.cfg = mixer, cfg or SchedulerConfig()
        self.eos_ids = eos_ids or set()
        self.lock = lock or threading.RLock()
        self._q: queue.Queue[tuple[GenRequest, Callable[[Event], None], RequestHandle, float] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._running: list[str] = []
        self.steps = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loramix-standin", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, req: GenRequest, on_event: Callable[[Event], None]) -> RequestHandle:
        if self._q.qsize() >= self.cfg.max_queue:
            raise Overloaded(f"{self._q.qsize()} requests are waiting (max_queue {self.cfg.max_queue}); retry later")
        h = RequestHandle()
        self._q.put((req, on_event, h, time.perf_counter()))
        return h

    def stats(self) -> SchedulerStats:
        return SchedulerStats(queue_len=self._q.qsize(), running=len(self._running),
                              running_adapters=list(self._running), steps=self.steps)

    def generate(self, req: GenRequest) -> tuple[list[TokenEvent], FinishEvent]:
        done = threading.Event()
        toks: list[TokenEvent] = []
        fin: list[FinishEvent] = []

        def cb(ev: Event) -> None:
            if isinstance(ev, FinishEvent):
                fin.append(ev)
                done.set()
            else:
                toks.append(ev)

        self.submit(req, cb)
        done.wait()
        return toks, fin[0]

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            req, cb, h, t_in = item
            try:
                self._run(req, cb, h, t_in)
            except Exception as e:  # noqa: BLE001 - reported to the caller as a finish event
                cb(FinishEvent("error", "", len(req.prompt_ids), 0, error=f"{type(e).__name__}: {e}"))

    def _run(self, req: GenRequest, cb: Callable[[Event], None], h: RequestHandle, t_in: float) -> None:
        p = req.params
        tok = self.mm.tokenizer
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        ids: list[int] = []
        text, reason, ttft = "", "length", 0.0
        self._running = [a for a, _ in req.mixture]
        with self.lock:
            batch = self.mm.prepare([req.mixture])
        try:
            past = None
            inp = torch.tensor([req.prompt_ids])  # (1, T)
            for _ in range(p.max_new_tokens):
                if h.cancelled.is_set():
                    reason = "cancelled"
                    break
                with self.lock, torch.inference_mode():
                    out = self.mm.forward(batch, input_ids=inp, past_key_values=past, use_cache=True)
                self.steps += 1
                past = out.past_key_values
                logits = out.logits[0, -1].float()  # (V,)
                logp = torch.log_softmax(logits, -1)  # (V,)
                nxt = self._sample(logits, p, g)
                if not ttft:
                    ttft = time.perf_counter() - t0
                ids.append(nxt)
                full = tok.decode(ids, skip_special_tokens=True)
                special = nxt in tok.all_special_ids
                if nxt in self.eos_ids and not p.ignore_eos:
                    cb(TokenEvent(nxt, "", max(float(logp[nxt]), -1e4), special))
                    reason = "eos"
                    break
                hit = [full.find(s) for s in p.stop if s and s in full]
                new = full[len(text):] if not full.endswith("\ufffd") else ""
                if hit:
                    cut = min(hit)
                    cb(TokenEvent(nxt, full[len(text):cut] if cut > len(text) else "", max(float(logp[nxt]), -1e4),
                                  special))
                    text, reason = full[:cut], "stop"
                    break
                cb(TokenEvent(nxt, new, max(float(logp[nxt]), -1e4), special))
                text += new
                inp = torch.tensor([[nxt]])
            else:
                text = tok.decode(ids, skip_special_tokens=True)
        finally:
            with self.lock:
                self.mm.release(batch)
            self._running = []
        now = time.perf_counter()
        cb(FinishEvent(reason, text, len(req.prompt_ids), len(ids), queue_s=t0 - t_in, ttft_s=ttft,
                       total_s=now - t_in))

    @staticmethod
    def _sample(logits: torch.Tensor, p: SamplingParams, g: torch.Generator | None) -> int:
        if p.temperature <= 0:
            return int(logits.argmax())
        x = logits / p.temperature  # (V,)
        if p.top_k:
            kth = torch.topk(x, min(p.top_k, x.numel())).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sx, si = torch.sort(x, descending=True)
            cum = torch.softmax(sx, -1).cumsum(-1)
            drop = cum - torch.softmax(sx, -1) > p.top_p
            x[si[drop]] = float("-inf")
        return int(torch.multinomial(torch.softmax(x, -1), 1, generator=g))
