"""Prometheus metrics of the server, in the app's own registry (never prometheus-client's global one).

Two kinds:

- Observed as things happen: HTTP requests by route and outcome with their duration (an ASGI
  middleware, so a stream counts until its last byte), and per generation its finish reason, queue
  time, time to first token, time per output token, end-to-end latency, prompt and generated tokens.
- Read at scrape time from the engine (:class:`EngineCollector`, no polling thread): queue length,
  running batch size, adapters loaded/pinned/slots, slot hits/misses/evictions, adapter load seconds,
  scheduler steps, and ``loramix_lora_requests_info`` with the running and waiting adapter names and
  ``max_lora`` as labels, shaped like vLLM's ``vllm:lora_requests_info`` (value: the scrape time); the
  retrieval cache and the passage KV prefix cache (``loramix.docs`` requests): hits, misses/lookups,
  reused tokens, and hit ratios since start.

``GET /metrics`` is the Prometheus text format; it names every running adapter, so with API keys it
needs an admin key (Prometheus sends one with ``authorization: {credentials: KEY}``).
``GET /metrics/summary`` is a small JSON digest for the web page, open to any caller with a valid key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loramix.serve.common import Principal, get_principal

__all__ = ["EngineCollector", "EngineStats", "Metrics", "MetricsMiddleware", "install_metrics", "outcome_of",
           "router"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


@dataclass
class EngineStats:
    """What the engine reports at scrape time (adapter names, not ids, in the two lists)."""

    queue_len: int = 0  # requests waiting for a batch row
    running: int = 0  # requests decoding now: the running batch size
    running_adapters: list[str] = field(default_factory=list)
    waiting_adapters: list[str] = field(default_factory=list)
    max_lora: int = 0  # adapter slots (distinct adapters one batch may use)
    adapters_loaded: int = 0
    adapters_pinned: int = 0
    slot_hits: int = 0
    slot_misses: int = 0
    slot_evictions: int = 0
    adapter_load_seconds: float = 0.0
    steps: int = 0  # scheduler steps (forward passes)
    max_batch: int = 0  # the scheduler's row limit
    last_batch_size: int = 0  # rows in the last decode step
    decode_batch_sizes: dict[int, int] = field(default_factory=dict)  # decode steps per batch size
    retrieval_hits: int = 0  # loramix.docs retrievals answered from the retrieval cache
    retrieval_misses: int = 0
    kv_lookups: int = 0  # prompts with passages looked up in the passage KV prefix cache
    kv_hits: int = 0  # ... that reused a cached prefix (the template head at least)
    kv_passage_hits: int = 0  # ... that reused at least one cached passage
    kv_tokens_reused: int = 0  # prompt tokens not prefilled thanks to the cache


def outcome_of(status: int) -> str:
    """An HTTP status as a small set of outcomes (the label stays low-cardinality)."""
    if status < 400:
        return "ok"
    return {401: "unauthorized", 403: "forbidden", 404: "not_found", 408: "timeout", 413: "too_large",
            429: "overloaded"}.get(status, "invalid" if status < 500 else "error")


class Metrics:
    """The app's registry and the metrics observed as requests run."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("loramix_http_requests", "HTTP requests by route template and outcome.",
                                ["route", "outcome"], registry=r)
        self.request_seconds = Histogram("loramix_http_request_duration_seconds",
                                         "HTTP request duration until the last byte was sent (streams included).",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.generations = Counter("loramix_generations", "Finished generations by finish reason.",
                                   ["finish_reason"], registry=r)
        self.queue_seconds = Histogram("loramix_request_queue_seconds", "Time a generation waited for a batch row.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loramix_time_to_first_token_seconds", "Time from submission to the first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("loramix_time_per_output_token_seconds",
                              "Mean time per output token after the first, per generation.",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("loramix_e2e_request_latency_seconds", "Generation time from submission to finish.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("loramix_prompt_tokens", "Prompt tokens of finished generations.", registry=r)
        self.generation_tokens = Counter("loramix_generation_tokens", "Generated tokens.", registry=r)
        self.started = time.time()

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, outcome_of(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def observe_generation(self, finish: Any) -> None:
        """Record one scheduler FinishEvent (reason, token counts, queue/ttft/total seconds)."""
        self.generations.labels(finish.reason).inc()
        self.prompt_tokens.inc(finish.prompt_tokens)
        self.generation_tokens.inc(finish.generated_tokens)
        if finish.reason in ("error", "cancelled") and finish.generated_tokens == 0:
            return  # no timing worth recording
        self.queue_seconds.observe(finish.queue_s)
        self.e2e.observe(finish.total_s)
        if finish.generated_tokens >= 1:
            self.ttft.observe(finish.ttft_s)
        if finish.generated_tokens >= 2:
            self.tpot.observe(max(0.0, finish.total_s - finish.ttft_s) / (finish.generated_tokens - 1))

    def attach(self, stats: Callable[[], EngineStats | None]) -> None:
        self.registry.register(EngineCollector(stats))

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def _sum_of(self, name: str, label: str) -> float:
        return sum(s.value for m in self.registry.collect() if m.name == name for s in m.samples
                   if s.name == name + "_total" and label in s.labels)

    def summary(self) -> dict[str, Any]:
        """A small JSON digest for the web page (means from the histograms' sums and counts)."""
        def mean(name: str) -> float | None:
            n = self.value(name + "_count")
            return self.value(name + "_sum") / n if n else None

        out: dict[str, Any] = {
            "uptime_s": round(time.time() - self.started, 1),
            "requests": int(self._sum_of("loramix_http_requests", "outcome")),
            "errors": int(sum(s.value for m in self.registry.collect() if m.name == "loramix_http_requests"
                              for s in m.samples if s.name.endswith("_total")
                              and s.labels.get("outcome") in ("error", "timeout"))),
            "generations": int(self._sum_of("loramix_generations", "finish_reason")),
            "prompt_tokens": int(self.value("loramix_prompt_tokens_total")),
            "generated_tokens": int(self.value("loramix_generation_tokens_total")),
            "ttft_mean_ms": None, "tpot_mean_ms": None, "e2e_mean_ms": None,
        }
        for key, name in (("ttft_mean_ms", "loramix_time_to_first_token_seconds"),
                          ("tpot_mean_ms", "loramix_time_per_output_token_seconds"),
                          ("e2e_mean_ms", "loramix_e2e_request_latency_seconds")):
            m = mean(name)
            out[key] = None if m is None else round(m * 1000, 2)
        for key, name in (("queue_len", "loramix_num_requests_waiting"), ("running", "loramix_num_requests_running"),
                          ("adapters_loaded", "loramix_adapters_loaded"), ("max_lora", "loramix_adapter_slots"),
                          ("slot_hits", "loramix_adapter_slot_hits_total"),
                          ("slot_misses", "loramix_adapter_slot_misses_total")):
            v = self.registry.get_sample_value(name)
            out[key] = None if v is None else int(v)
        return out


class EngineCollector(Collector):
    """Reads the engine's numbers when Prometheus scrapes (nothing runs between scrapes)."""

    def __init__(self, stats: Callable[[], EngineStats | None]):
        self.stats = stats

    def describe(self) -> list[Any]:
        return []  # the families depend on what the engine reports; collected at scrape time only

    def collect(self) -> Iterator[Any]:
        s = self.stats()
        if s is None:  # the engine is not started (or has no numbers)
            return
        gauges: list[tuple[str, str, float]] = [
            ("loramix_num_requests_waiting", "Requests waiting for a batch row.", s.queue_len),
            ("loramix_num_requests_running", "Requests decoding now (the running batch size).", s.running),
            ("loramix_adapters_loaded", "Adapters resident in the mixer's slots.", s.adapters_loaded),
            ("loramix_adapters_pinned", "Adapters pinned by the running batch.", s.adapters_pinned),
            ("loramix_adapter_slots", "Adapter slots (distinct adapters one batch may use).", s.max_lora)]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters: list[tuple[str, str, float]] = [
            ("loramix_adapter_slot_hits", "Adapter requests served from a resident slot.", s.slot_hits),
            ("loramix_adapter_slot_misses", "Adapter requests that loaded weights into a slot.", s.slot_misses),
            ("loramix_adapter_slot_evictions", "Adapters evicted from a slot (LRU).", s.slot_evictions),
            ("loramix_adapter_load_seconds", "Seconds spent loading adapter weights into slots.",
             s.adapter_load_seconds),
            ("loramix_scheduler_steps", "Scheduler steps (batched forward passes).", s.steps)]
        for name, doc, total in counters:
            yield CounterMetricFamily(name, doc, value=total)
        docs: list[tuple[str, str, float]] = [
            ("loramix_retrieval_cache_hits", "Passage retrievals answered from the retrieval cache.", s.retrieval_hits),
            ("loramix_retrieval_cache_misses", "Passage retrievals that searched the collections.", s.retrieval_misses),
            ("loramix_kv_prefix_cache_lookups", "Prompts with passages looked up in the KV prefix cache.", s.kv_lookups),
            ("loramix_kv_prefix_cache_hits", "Prompts that reused a cached prefix (template head or passages).",
             s.kv_hits),
            ("loramix_kv_prefix_cache_passage_hits", "Prompts that reused at least one cached passage.",
             s.kv_passage_hits),
            ("loramix_kv_prefix_cache_tokens_reused", "Prompt tokens taken from the KV prefix cache.",
             s.kv_tokens_reused)]
        for name, doc, total in docs:
            yield CounterMetricFamily(name, doc, value=total)
        for name, doc, num, den in (
                ("loramix_retrieval_cache_hit_ratio", "Retrieval cache hits / lookups since start (0 before any).",
                 s.retrieval_hits, s.retrieval_hits + s.retrieval_misses),
                ("loramix_kv_prefix_cache_hit_ratio", "KV prefix cache hits / lookups since start (0 before any).",
                 s.kv_hits, s.kv_lookups),
                ("loramix_kv_prefix_cache_passage_hit_ratio", "KV prefix cache passage hits / lookups since start.",
                 s.kv_passage_hits, s.kv_lookups)):
            yield GaugeMetricFamily(name, doc, value=num / den if den else 0.0)
        yield GaugeMetricFamily("loramix_max_batch", "Rows the scheduler decodes together at most.", value=s.max_batch)
        yield GaugeMetricFamily("loramix_last_batch_size", "Rows in the last decode step.", value=s.last_batch_size)
        yield _batch_histogram(s.decode_batch_sizes, s.max_batch)
        info = GaugeMetricFamily("loramix_lora_requests_info", "Running stats on LoRA requests (as vLLM's "
                                 "vllm:lora_requests_info); the value is the scrape time.",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(s.running_adapters), ",".join(s.waiting_adapters), str(s.max_lora)], time.time())
        yield info


def _batch_histogram(sizes: dict[int, int], max_batch: int) -> HistogramMetricFamily:
    """Decode steps by batch size as a Prometheus histogram (buckets 1, 2, 4, ... up to max_batch)."""
    top = max([max_batch, *sizes]) if sizes or max_batch else 1
    bounds, b = [], 1
    while b < top:
        bounds.append(b)
        b *= 2
    bounds.append(top)
    buckets = [(str(float(ub)), float(sum(n for size, n in sizes.items() if size <= ub))) for ub in bounds]
    buckets.append(("+Inf", float(sum(sizes.values()))))
    return HistogramMetricFamily("loramix_decode_batch_size", "Rows per decode step (the running batch size).",
                                 buckets=buckets, sum_value=float(sum(size * n for size, n in sizes.items())))


class MetricsMiddleware:
    """Counts every HTTP request by route template and outcome and times it to its last byte."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), 500

        async def send_wrapper(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"  # never the raw path: bounded label values
            self.metrics.observe_request(template, status, time.perf_counter() - t0)


router = APIRouter(tags=["metrics"])


def metrics_of(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


@router.get("/metrics", response_class=Response)
async def prometheus(request: Request, who: Principal = Depends(get_principal)) -> Response:
    """Prometheus text format (admin-only with API keys: it names every running adapter)."""
    from loramix.serve.tenants import require_admin

    require_admin(who, "reading /metrics")
    return Response(metrics_of(request).text(), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/summary")
async def summary(request: Request, who: Principal = Depends(get_principal)) -> dict[str, Any]:
    """A JSON digest of the metrics for the web page: counts, token totals, mean latencies, queue."""
    return metrics_of(request).summary()


def install_metrics(app: FastAPI, metrics: Metrics | None = None) -> Metrics:
    """Give ``app`` its registry (``metrics`` or a new one), the request middleware and the two routes."""
    m = metrics or Metrics()
    app.state.metrics = m
    app.add_middleware(MetricsMiddleware, metrics=m)
    app.include_router(router)
    return m
