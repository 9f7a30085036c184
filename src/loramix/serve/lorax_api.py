"""LoRAX-compatible routes: POST / (what lorax-client calls), /generate, /generate_stream, GET /info, /health.

lorax-client sends every parameter, null where unset: nulls are accepted and unknown keys ignored.
``adapter_id`` is an adapter name, ``auto`` (route the inputs) or empty for the base model.
``merged_adapters`` with ``linear`` runs as an exact per-row output mixture (sum of w_i * B_i A_i x);
``ties``, ``dare_linear`` and ``dare_ties`` are merged once with loramix's merge and cached by recipe.
loramix's own options ride in ``parameters.loramix`` (LoRAX ignores unknown parameters; lorax-client cannot
send them, raw HTTP can): ``{k, strategy, tags, temperature}`` route ``adapter_id: "auto"``, and
``{docs: [...], passages: N}`` puts passages retrieved for ``inputs`` before it; the response then carries
``loramix: {adapters, routed, route_ms, passages}`` (in the last event of a stream).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from loramix import __version__
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
from loramix.serve.engine import MergeRecipe, Resolved
from loramix.serve.errors import ApiError, error_body, status_of
from loramix.serve.scheduler import FinishEvent, TokenEvent

__all__ = ["router"]

router = APIRouter(tags=["lorax"])

_FINISH = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}


class MergedAdapters(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ids: list[str]
    weights: list[float]
    merge_strategy: str | None = None
    density: Annotated[float, Field(ge=0, le=1)] | None = None
    majority_sign_method: str | None = None


class Parameters(BaseModel):
    model_config = ConfigDict(extra="ignore")
    adapter_id: str | None = None
    adapter_source: str | None = None
    merged_adapters: MergedAdapters | None = None
    api_token: str | None = None
    best_of: int | None = None
    details: bool | None = None
    decoder_input_details: bool | None = None
    do_sample: bool | None = None
    max_new_tokens: Annotated[int, Field(ge=1)] | None = None
    ignore_eos_token: bool | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    stop: list[str] | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_k: int | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    truncate: Annotated[int, Field(ge=1)] | None = None
    typical_p: float | None = None
    watermark: bool | None = None
    return_k_alternatives: int | None = None
    response_format: dict[str, Any] | None = None
    loramix: LoramixOptions | None = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    inputs: str
    parameters: Parameters | None = None
    stream: bool | None = False


def _unsupported(p: Parameters) -> None:
    """Parameters that would change the output and that loramix does not implement: refuse, never ignore."""
    bad = []
    if p.best_of not in (None, 1):
        bad.append("best_of > 1")
    if p.repetition_penalty not in (None, 1.0):
        bad.append("repetition_penalty")
    if p.typical_p not in (None, 1.0):
        bad.append("typical_p")
    if p.watermark:
        bad.append("watermark")
    if p.response_format is not None:
        bad.append("response_format")
    if p.return_k_alternatives:
        bad.append("return_k_alternatives")
    if p.adapter_id and p.merged_adapters is not None:
        raise ApiError(422, "give at most one of adapter_id and merged_adapters", "adapter_id")
    if bad:
        raise ApiError(422, f"not supported by this server: {', '.join(bad)}", bad[0])


async def _prepare(request: Request, body: GenerateRequest, who: Principal) -> tuple[Generation, int | None]:
    engine, settings = engine_of(request), settings_of(request)
    p = body.parameters or Parameters()
    _unsupported(p)
    sample = bool(p.do_sample) or (p.temperature not in (None, 1.0) and p.temperature != 0) or \
        p.top_k is not None or p.top_p not in (None, 1.0)
    temperature = (p.temperature if p.temperature else 1.0) if sample else 0.0
    seed = (p.seed if p.seed is not None else secrets.randbits(31)) if sample else p.seed
    try:
        params = sampling(settings, max_tokens=p.max_new_tokens, temperature=temperature, top_p=p.top_p,
                          top_k=p.top_k, seed=seed, stop=p.stop, ignore_eos=bool(p.ignore_eos_token),
                          max_tokens_param="max_new_tokens")
    except ApiError as e:
        raise ApiError(422, e.message, e.param) from None
    resolved: Resolved
    if p.merged_adapters is not None:
        m = p.merged_adapters
        recipe = MergeRecipe(tuple(m.ids), tuple(m.weights), m.merge_strategy or "linear",
                             1.0 if m.density is None else m.density, m.majority_sign_method or "total")
        resolved = await run_in_threadpool(engine.resolve_merged, recipe, who.tenant)
    else:
        route = route_cfg(engine.default_route(), p.loramix) if (p.adapter_id or "").strip() == "auto" else None
        resolved = await run_in_threadpool(engine.resolve, p.adapter_id, who.tenant, body.inputs, route)
    try:
        aug = await augment(engine, resolved, p.loramix, who.tenant, prompt=body.inputs)
    except ApiError as e:
        raise ApiError(422, e.message, e.param) from None
    ids, bounds = aug if aug is not None else (await run_in_threadpool(engine.text_ids, body.inputs), [])
    if p.truncate is not None and len(ids) > p.truncate:
        ids, bounds = ids[-p.truncate:], []  # cut from the left: the passage offsets no longer hold
    gen = Generation(engine, settings, ids, resolved, params, who.tenant, bounds)
    gen.check()
    return gen, seed


def _token(ev: TokenEvent) -> dict[str, Any]:
    return {"id": ev.id, "text": ev.text, "logprob": ev.logprob, "special": ev.special, "skipped": False}


def _response(body: GenerateRequest, toks: list[TokenEvent], fin: FinishEvent, seed: int | None,
              resolved: Resolved) -> dict[str, Any]:
    p = body.parameters or Parameters()
    text = (body.inputs if p.return_full_text else "") + fin.text
    out: dict[str, Any] = {"generated_text": text}
    if resolved.passages is not None:
        out["loramix"] = resolved.to_dict()
    if p.details is not False:  # lorax-client asks for details by default
        out["details"] = {"finish_reason": _FINISH.get(fin.reason, "length"), "prompt_tokens": fin.prompt_tokens,
                          "generated_tokens": fin.generated_tokens, "seed": seed, "prefill": [],
                          "tokens": [_token(t) for t in toks], "skipped_tokens": 0, "best_of_sequences": None}
    return out


async def _generate(request: Request, body: GenerateRequest, who: Principal) -> tuple[dict[str, Any], Resolved]:
    gen, seed = await _prepare(request, body, who)
    toks, fin = await gen.run(request)
    return _response(body, toks, fin, seed, gen.resolved), gen.resolved


async def _stream(request: Request, body: GenerateRequest, who: Principal) -> StreamingResponse:
    gen, seed = await _prepare(request, body, who)
    events = gen.events()
    first = await anext(events)  # errors before the stream starts get a status code and a JSON body
    p = body.parameters or Parameters()

    def line(obj: Any) -> str:
        return f"data:{json.dumps(obj, separators=(',', ':'))}\n\n"

    async def sse() -> AsyncIterator[str]:
        pending: TokenEvent | None = None  # held back so the last token can carry generated_text and details
        ev = first
        try:
            while True:
                if isinstance(ev, FinishEvent):
                    if ev.reason in ("error", "cancelled") or pending is None:
                        msg = ev.error or f"the generation was {ev.reason} before any token"
                        yield line(error_body("/generate", 424, msg))
                        break
                    details = {"finish_reason": _FINISH.get(ev.reason, "length"), "prompt_tokens": ev.prompt_tokens,
                               "generated_tokens": ev.generated_tokens, "seed": seed}
                    text = (body.inputs if p.return_full_text else "") + ev.text
                    last = {"token": _token(pending), "generated_text": text, "details": details}
                    if gen.resolved.passages is not None:
                        last["loramix"] = gen.resolved.to_dict()
                    yield line(last)
                    break
                if pending is not None:
                    yield line({"token": _token(pending), "generated_text": None, "details": None})
                pending = ev
                ev = await anext(events)
        except Exception as e:  # noqa: BLE001 - after the stream started, an error is the last event
            status, _ = status_of(e)
            yield line(error_body("/generate", status, str(e)))
        finally:
            await events.aclose()

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"x-loramix-adapters": gen.resolved.header(), "cache-control": "no-cache"})


@router.post("/")
async def lorax_root(request: Request, body: GenerateRequest, who: Principal = Depends(get_principal)) -> Any:
    """LoRAX's compat route (what lorax-client posts to): a JSON array holding one response, or SSE with
    ``"stream": true``."""
    if body.stream:
        return await _stream(request, body, who)
    out, resolved = await _generate(request, body, who)
    return JSONResponse([out], headers={"x-loramix-adapters": resolved.header()})


@router.post("/generate")
async def generate(request: Request, body: GenerateRequest, who: Principal = Depends(get_principal)) -> Any:
    """Generate text for ``inputs`` (one response object)."""
    out, resolved = await _generate(request, body, who)
    return JSONResponse(out, headers={"x-loramix-adapters": resolved.header()})


@router.post("/generate_stream")
async def generate_stream(request: Request, body: GenerateRequest, who: Principal = Depends(get_principal)) -> Any:
    """Generate text for ``inputs`` as server-sent events, one token per event."""
    return await _stream(request, body, who)


@router.get("/info")
async def info(request: Request) -> dict[str, Any]:
    """The served model and the server's limits, in LoRAX's shape."""
    engine, s = engine_of(request), settings_of(request)
    i = await run_in_threadpool(engine.info)
    return {"model_id": engine.base_id, "model_sha": None, "model_dtype": "float32", "model_device_type": "cpu",
            "model_pipeline_tag": "text-generation", "max_concurrent_requests": s.max_queue, "max_best_of": 1,
            "max_stop_sequences": 16, "max_input_length": s.max_prompt_tokens,
            "max_total_tokens": s.max_prompt_tokens + s.max_new_tokens_cap, "max_batch_size": s.max_batch,
            "version": __version__, "sha": None, "docker_label": None, "loramix": i}


@router.get("/health")
async def health(request: Request) -> dict[str, str]:
    """200 once the model is loaded and the scheduler runs."""
    return {"status": "ok", "model_id": engine_of(request).base_id}

