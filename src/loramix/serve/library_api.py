"""The library and routing over HTTP: /v1/adapters CRUD, /v1/route, /v1/score, and vLLM's
/v1/load_lora_adapter and /v1/unload_lora_adapter (paths only under the folders the operator allows)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from loramix.config import RouteConfig
from loramix.serve.common import (
    Principal,
    RerankName,
    engine_of,
    get_principal,
    run_in_threadpool,
    settings_of,
)
from loramix.serve.errors import ApiError
from loramix.serve.tenants import deny_unless_admin

__all__ = ["router"]

router = APIRouter(tags=["library"])

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


def _csv(s: str | None) -> list[str]:
    return [t.strip() for t in (s or "").split(",") if t.strip()]


@router.get("/v1/adapters")
async def list_adapters(request: Request, q: str | None = None, tags: str | None = None,
                        who: Principal = Depends(get_principal)) -> dict[str, Any]:
    """The adapters the caller may use; ``q`` matches words in name, description and tags, ``tags``
    (comma-separated) keeps adapters carrying all of them."""
    data = await run_in_threadpool(engine_of(request).list_adapters, who.tenant, q, _csv(tags))
    return {"object": "list", "data": data}


@router.get("/v1/adapters/{name}")
async def get_adapter(request: Request, name: str, who: Principal = Depends(get_principal)) -> dict[str, Any]:
    """One adapter's record."""
    return await run_in_threadpool(engine_of(request).get_adapter, name, who.tenant)  # type: ignore[no-any-return]


@router.delete("/v1/adapters/{name}")
async def delete_adapter(request: Request, name: str, who: Principal = Depends(get_principal)) -> dict[str, str]:
    """Remove an adapter from the library."""
    await run_in_threadpool(engine_of(request).remove_adapter, name, who.tenant)
    return {"deleted": name}


async def _read_upload(f: UploadFile, limit: int, what: str) -> bytes:
    data = await f.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"{what} is larger than the upload limit of {limit} bytes (--max-upload-bytes)", what)
    return data


@router.post("/v1/adapters", status_code=201)
async def add_adapter(
    request: Request,
    name: Annotated[str, Form()],
    adapter_config: Annotated[UploadFile, File(description="the PEFT folder's adapter_config.json")],
    adapter_model: Annotated[UploadFile, File(description="the PEFT folder's adapter_model.safetensors")],
    description: Annotated[str, Form()] = "",
    tags: Annotated[str, Form(description="domain tags, comma-separated")] = "",
    public: Annotated[bool, Form()] = False,
    examples: Annotated[str, Form(description="example inputs, one per line")] = "",
    who: Principal = Depends(get_principal),
) -> JSONResponse:
    """Upload a PEFT LoRA folder's two files; validated and added atomically, like `loramix adapters add`."""
    limit = settings_of(request).max_upload_bytes
    cfg = await _read_upload(adapter_config, limit, "adapter_config")
    weights = await _read_upload(adapter_model, limit, "adapter_model")
    ex = [line.strip() for line in examples.splitlines() if line.strip()]
    engine = engine_of(request)

    def add() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="loramix-upload-") as d:
            (Path(d) / CONFIG_NAME).write_bytes(cfg)
            (Path(d) / WEIGHTS_NAME).write_bytes(weights)
            return engine.add_adapter(Path(d), name, who.tenant, description=description, tags=_csv(tags),
                                      examples=ex or None, public=public)

    return JSONResponse(await run_in_threadpool(add), status_code=201)


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    query: str
    k: Annotated[int, Field(ge=1, le=64)] | None = None
    strategy: str | None = None
    tags: list[str] | None = None
    temperature: Annotated[float, Field(ge=0.001, le=100)] | None = None
    rerank: RerankName | None = None  # re-rank by the adapters' likelihood of the query


@router.post("/v1/route")
async def route(request: Request, body: RouteRequest, who: Principal = Depends(get_principal)) -> dict[str, Any]:
    """Route a query: the adapters, their scores and mixture weights (the CLI's `route --json`)."""
    engine = engine_of(request)
    d = engine.default_route()
    cfg = RouteConfig(k=body.k or d.k, strategy=body.strategy or d.strategy, tags=list(body.tags or []),
                      temperature=body.temperature or d.temperature, rerank=body.rerank or d.rerank)
    return await run_in_threadpool(engine.route, body.query, cfg, who.tenant)  # type: ignore[no-any-return]


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: Annotated[str, Field(min_length=1)]
    model: str | None = None


@router.post("/v1/score")
async def score(request: Request, body: ScoreRequest, who: Principal = Depends(get_principal)) -> dict[str, Any]:
    """Mean token loss of ``text`` under ``model`` (same grammar as chat's ``model``; ``auto`` routes the text)."""
    engine, s = engine_of(request), settings_of(request)
    ids = await run_in_threadpool(engine.text_ids, body.text)
    if len(ids) > s.max_prompt_tokens:
        raise ApiError(400, f"text has {len(ids)} tokens but this server accepts at most {s.max_prompt_tokens}",
                       "text", "context_length_exceeded")
    route = engine.default_route() if (body.model or "").strip() == "auto" else None
    resolved = await run_in_threadpool(engine.resolve, body.model, who.tenant, body.text, route)
    return await run_in_threadpool(engine.score, body.text, resolved)  # type: ignore[no-any-return]


class LoadLora(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: Annotated[str, Field(min_length=1, max_length=200)]
    lora_path: Annotated[str, Field(min_length=1)]


class UnloadLora(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: Annotated[str, Field(min_length=1)]


def allowed_path(raw: str, allowed: list[Path]) -> Path:
    """``raw`` resolved (symlinks followed), if it lies under one of the ``allowed`` folders; else 403/400."""
    if not allowed:
        raise ApiError(403, "loading adapters from paths is off on this server; the operator enables it with "
                            "--allow-lora-dir DIR", "lora_path")
    try:
        path = Path(raw).expanduser().resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        raise ApiError(400, f"lora_path {raw!r} does not exist; expected a PEFT LoRA folder under an allowed "
                            "directory", "lora_path") from None
    roots = [Path(a).expanduser().resolve() for a in allowed]
    if not any(path == r or path.is_relative_to(r) for r in roots):
        raise ApiError(403, f"lora_path {raw!r} is outside the folders this server may read adapters from",
                       "lora_path")
    return path


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request, body: LoadLora, who: Principal = Depends(get_principal)) -> dict[str, str]:
    """vLLM's runtime LoRA loading: serve a PEFT folder under ``lora_name`` (in memory, not added to the
    library; it is listed in /v1/models and usable as ``model`` until unloaded). Admin-only."""
    deny_unless_admin(request, who, "load_lora", body.lora_name)
    path = allowed_path(body.lora_path, settings_of(request).allow_lora_dirs)
    await run_in_threadpool(engine_of(request).load_lora, body.lora_name, path, who.tenant)
    return {"loaded": body.lora_name, "message": f"Success: LoRA adapter '{body.lora_name}' added successfully."}


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request, body: UnloadLora,
                              who: Principal = Depends(get_principal)) -> dict[str, str]:
    """Stop serving a runtime LoRA loaded with /v1/load_lora_adapter. Admin-only."""
    deny_unless_admin(request, who, "unload_lora", body.lora_name)
    await run_in_threadpool(engine_of(request).unload_lora, body.lora_name, who.tenant)
    return {"unloaded": body.lora_name, "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."}
