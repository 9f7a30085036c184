"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions.

``model`` picks the adapters: an adapter name, ``auto`` (route the last user message), a mixture
``name:0.7,other:0.3``, or the base model's id / empty for none. Routing options ride in the body under
``loramix: {k, strategy, tags, temperature}``; ``loramix: {docs: [...], passages: N}`` retrieves passages
for the last user message (or the prompt) and puts them in the prompt. Responses carry a ``loramix``
field (adapters, weights and, with docs, the passages used) and an ``x-loramix-adapters`` header.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from loramix.serve.common import (
    Generation,
    LoramixOptions,
    Principal,
    augment,
    engine_of,
    get_principal,
    route_cfg,
    run_in_threadpool,
    sampling,
    settings_of,
)
from loramix.serve.engine import Resolved, last_user_text
from loramix.serve.errors import ApiError, error_body, status_of
from loramix.serve.scheduler import FinishEvent

__all__ = ["router"]

router = APIRouter(tags=["openai"])


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields (logit_bias, user, ...) are ignored
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: int | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None
    loramix: LoramixOptions | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool | None = None


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


@router.get("/v1/models")
async def list_models(request: Request, who: Principal = Depends(get_principal)) -> dict[str, Any]:
    """The base model first, then one card per adapter the caller may use (vLLM's LoRA cards)."""
    engine = engine_of(request)
    cards = await run_in_threadpool(engine.models, who.tenant)
    base = engine.base_id
    data = [{"id": base, "object": "model", "created": request.app.state.created,
             "owned_by": "loramix", "root": base, "parent": None}]
    data += [{"id": c["id"], "object": "model", "created": c["created"], "owned_by": "loramix", "root": c["id"],
              "parent": base} for c in cards]
    return {"object": "list", "data": data}


async def _prepare(request: Request, body: _Sampling, who: Principal, *, messages: list[dict[str, Any]] | None,
                   prompt: str | None, max_tokens: int | None, max_tokens_param: str) -> Generation:
    engine, settings = engine_of(request), settings_of(request)
    if body.n not in (None, 1):
        raise ApiError(400, f"n={body.n} is not supported; this server returns one choice per request (n=1)", "n")
    params = sampling(settings, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                      top_k=body.top_k, seed=body.seed, stop=body.stop, ignore_eos=bool(body.ignore_eos),
                      max_tokens_param=max_tokens_param)
    query = last_user_text(messages) if messages is not None else prompt
    route = route_cfg(engine.default_route(), body.loramix) if (body.model or "").strip() == "auto" else None
    resolved: Resolved = await run_in_threadpool(engine.resolve, body.model, who.tenant, query, route)
    aug = await augment(engine, resolved, body.loramix, who.tenant, messages=messages, prompt=prompt)
    if aug is not None:
        ids, bounds = aug
    else:
        ids = await run_in_threadpool(engine.chat_ids, messages) if messages is not None else \
            await run_in_threadpool(engine.text_ids, prompt or "")
        bounds = []
    gen = Generation(engine, settings, ids, resolved, params, who.tenant, bounds)
    gen.check()
    return gen


def _headers(resolved: Resolved) -> dict[str, str]:
    return {"x-loramix-adapters": resolved.header()}


async def _respond(request: Request, gen: Generation, *, chat: bool, model: str, stream: bool, include_usage: bool,
                   echo: str = "") -> Any:
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    extra = gen.resolved.to_dict()
    if not stream:
        toks, fin = await gen.run(request)
        text = echo + fin.text
        choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(fin.reason), "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        body = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice],
                "usage": _usage(fin.prompt_tokens, fin.generated_tokens), "loramix": extra}
        return JSONResponse(body, headers=_headers(gen.resolved))

    events = gen.events()
    first = await anext(events)  # fail before the stream starts (overloaded, bad state) with a status code

    async def sse() -> AsyncIterator[str]:
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict[str, Any] | str, finish: str | None = None) -> dict[str, Any]:
            c: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                c["delta"] = delta
            else:
                c["text"] = delta
            return {"id": rid, "object": chunk_kind, "created": created, "model": model, "choices": [c],
                    "loramix": extra}

        if chat:
            yield _sse(chunk({"role": "assistant", "content": ""}))
        elif echo:
            yield _sse(chunk(echo))
        ev, sent = first, ""
        try:
            while True:
                if isinstance(ev, FinishEvent):
                    if ev.reason in ("error", "cancelled"):
                        msg = ev.error or f"the generation was {ev.reason}"
                        yield _sse(error_body("/v1", 500, msg, None, "generation_failed"))
                        break
                    if len(ev.text) > len(sent) and ev.text.startswith(sent):  # text held back by detokenising
                        rest = ev.text[len(sent):]
                        yield _sse(chunk({"content": rest} if chat else rest))
                    yield _sse(chunk({} if chat else "", _finish(ev.reason)))
                    if include_usage:
                        yield _sse({"id": rid, "object": chunk_kind, "created": created, "model": model,
                                    "choices": [], "usage": _usage(ev.prompt_tokens, ev.generated_tokens),
                                    "loramix": extra})
                    break
                if ev.text:
                    sent += ev.text
                    yield _sse(chunk({"content": ev.text} if chat else ev.text))
                ev = await anext(events)
        except Exception as e:  # noqa: BLE001 - after the stream started, an error is the last event
            status, code = status_of(e)
            yield _sse(error_body("/v1", status, str(e), None, code))
        finally:
            await events.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={**_headers(gen.resolved), "cache-control": "no-cache"})


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest,
                           who: Principal = Depends(get_principal)) -> Any:
    """A chat completion under the adapters ``model`` names (or routes to, for ``auto``)."""
    messages = [m.model_dump() for m in body.messages]
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    gen = await _prepare(request, body, who, messages=messages, prompt=None, max_tokens=max_tokens,
                         max_tokens_param="max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _respond(request, gen, chat=True, model=body.model or gen.engine.base_id, stream=bool(body.stream),
                          include_usage=include_usage)


@router.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest, who: Principal = Depends(get_principal)) -> Any:
    """A plain-text completion of ``prompt`` (one prompt per request)."""
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt is a list of {len(prompt)} strings; this server takes one prompt per "
                                "request", "prompt")
        prompt = prompt[0]
    gen = await _prepare(request, body, who, messages=None, prompt=prompt, max_tokens=body.max_tokens,
                         max_tokens_param="max_tokens")
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _respond(request, gen, chat=False, model=body.model or gen.engine.base_id, stream=bool(body.stream),
                          include_usage=include_usage, echo=prompt if body.echo else "")

