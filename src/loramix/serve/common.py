"""What every API module shares: the caller (principal), the engine and settings, sampling limits and
running one generation to completion or as a stream of events."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from loramix.config import RouteConfig
from loramix.serve.engine import DocsRequest, Engine, GenerationFailed, Resolved, stream_events
from loramix.serve.errors import ApiError
from loramix.serve.scheduler import FinishEvent, GenRequest, SamplingParams, TokenEvent
from loramix.serve.settings import ServeSettings

__all__ = ["Generation", "LoramixOptions", "Principal", "augment", "engine_of", "get_principal", "route_cfg",
           "run_in_threadpool", "sampling", "settings_of"]


RerankName = Literal["auto", "likelihood", "none"]  # RouteConfig.rerank (config.RERANKS), checked at the edge


class LoramixOptions(BaseModel):
    """The request's ``loramix`` object (OpenAI: the body's ``loramix``, the client's ``extra_body``; LoRAX:
    ``parameters.loramix``): routing options for ``auto``, and documents to retrieve passages from."""

    model_config = ConfigDict(extra="ignore")
    k: Annotated[int, Field(ge=1, le=64)] | None = None
    strategy: str | None = None
    tags: list[str] | None = None
    temperature: Annotated[float, Field(ge=0.001, le=100)] | None = None
    rerank: RerankName | None = None  # re-rank by the adapters' likelihood of the query
    docs: Annotated[list[str], Field(min_length=1, max_length=16)] | None = None  # names, tag:NAME, auto
    passages: Annotated[int, Field(ge=0, le=16)] | None = None  # passages in the prompt (default 3)

    def docs_request(self) -> DocsRequest | None:
        if self.docs is None:
            if self.passages is not None:
                raise ApiError(400, "loramix.passages is set but loramix.docs is not; name the collections to "
                                    "retrieve from, e.g. {\"docs\": [\"notes\"], \"passages\": 3}", "loramix.docs")
            return None
        return DocsRequest(tuple(self.docs), 3 if self.passages is None else self.passages)


def route_cfg(default: RouteConfig, opts: LoramixOptions | None) -> RouteConfig:
    """The routing options of ``auto`` requests: the request's, else the engine's default."""
    if opts is None:
        return default
    return RouteConfig(k=opts.k or default.k, strategy=opts.strategy or default.strategy, tags=list(opts.tags or []),
                       temperature=opts.temperature or default.temperature, rerank=opts.rerank or default.rerank)


async def augment(engine: Engine, resolved: Resolved, opts: LoramixOptions | None, tenant: str | None, *,
                  messages: list[dict[str, Any]] | None = None, prompt: str | None = None) -> tuple[list[int], list[int]] | None:
    """With ``loramix.docs``: (prompt ids with the retrieved passages, passage boundaries), and
    ``resolved.passages`` set to what the response lists; None without it."""
    docs = opts.docs_request() if opts is not None else None
    if docs is None:
        return None
    aug = await run_in_threadpool(engine.augment, resolved, docs, tenant, messages, prompt)
    resolved.passages = aug.passages
    return aug.ids, aug.boundaries


@dataclass(frozen=True)
class Principal:
    """Who is calling: their tenant (None = single user) and whether they may administer the library."""

    tenant: str | None = None
    admin: bool = True


async def get_principal(request: Request) -> Principal:
    """The caller. Without API keys the server is single-user (tenant None, admin). The auth module
    replaces this dependency (``app.dependency_overrides[get_principal]``) when keys are configured."""
    return Principal()


def engine_of(request: Request) -> Engine:
    return request.app.state.engine  # type: ignore[no-any-return]


def settings_of(request: Request) -> ServeSettings:
    return request.app.state.settings  # type: ignore[no-any-return]


def sampling(settings: ServeSettings, *, max_tokens: int | None, temperature: float | None, top_p: float | None,
             top_k: int | None, seed: int | None, stop: str | list[str] | None, ignore_eos: bool = False,
             max_tokens_param: str = "max_tokens") -> SamplingParams:
    """Checked sampling settings. ``max_tokens`` above the server's cap is refused (400), not clipped,
    so a client never silently gets less than it asked for."""
    n = settings.default_max_tokens if max_tokens is None else max_tokens
    if n < 1:
        raise ApiError(400, f"{max_tokens_param} must be at least 1, got {n}", max_tokens_param)
    if n > settings.max_new_tokens_cap:
        raise ApiError(400, f"{max_tokens_param} is {n} but this server generates at most "
                            f"{settings.max_new_tokens_cap} tokens per request (--max-new-tokens-cap)",
                       max_tokens_param)
    t = 1.0 if temperature is None else float(temperature)
    if not (math.isfinite(t) and t >= 0):
        raise ApiError(400, f"temperature must be a number >= 0, got {temperature}", "temperature")
    p = 1.0 if top_p is None else float(top_p)
    if not (math.isfinite(p) and 0 < p <= 1):
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    if top_k is not None and top_k < 1:
        top_k = None  # vLLM: -1 (or 0) means no top-k
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 16 or any(not isinstance(s, str) for s in stops):
        raise ApiError(400, "stop must be a string or a list of at most 16 strings", "stop")
    stops = [s for s in stops if s]
    return SamplingParams(max_new_tokens=n, temperature=t, top_p=p, top_k=top_k, seed=seed, stop=stops,
                          ignore_eos=ignore_eos)


@dataclass
class Generation:
    """One request's generation: prompt, mixture, sampling; ``events()`` yields what the model produces."""

    engine: Engine
    settings: ServeSettings
    prompt_ids: list[int]
    resolved: Resolved
    params: SamplingParams
    tenant: str | None = None
    boundaries: list[int] = field(default_factory=list)  # passage prefix offsets (the scheduler's KV prefix cache)

    def check(self) -> None:
        n = len(self.prompt_ids)
        if n == 0:
            raise ApiError(400, "the prompt is empty; expected at least one token", "prompt")
        if n > self.settings.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {n} tokens but this server accepts at most "
                                f"{self.settings.max_prompt_tokens} (--max-prompt-tokens)", "prompt",
                           "context_length_exceeded")

    async def events(self) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        req = GenRequest(prompt_ids=self.prompt_ids, mixture=self.resolved.mixture, params=self.params,
                         prefix_boundaries=list(self.boundaries))
        async for ev in stream_events(self.engine, req, self.settings.request_timeout_s):
            if isinstance(ev, FinishEvent):
                await run_in_threadpool(self.engine.record, self.resolved, ev, self.tenant)
            yield ev

    async def _collect(self) -> tuple[list[TokenEvent], FinishEvent]:
        toks: list[TokenEvent] = []
        async for ev in self.events():
            if isinstance(ev, FinishEvent):
                if ev.reason in ("error", "cancelled"):
                    raise GenerationFailed(ev.error or f"the generation was {ev.reason} (the server may be stopping)")
                return toks, ev
            toks.append(ev)
        raise GenerationFailed("the generation ended without a finish event")  # pragma: no cover

    async def run(self, request: Request | None = None) -> tuple[list[TokenEvent], FinishEvent]:
        """The whole generation; cancelled (the request leaves the batch) if ``request``'s client goes away."""
        if request is None:
            return await self._collect()
        work = asyncio.ensure_future(self._collect())

        async def gone() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)

        watch = asyncio.ensure_future(gone())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():  # the client left: cancelling closes the event stream, which cancels the request
                work.cancel()
        return await work

