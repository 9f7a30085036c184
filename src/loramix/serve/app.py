"""The FastAPI application: ``create_app(engine, settings)``.

One APIRouter per API (OpenAI, LoRAX, library); errors are mapped in one place (serve/errors.py); the
caller is the ``get_principal`` dependency (single user unless the auth module overrides it).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loramix import __version__
from loramix.serve import library_api, lorax_api, openai_api
from loramix.serve.audit import AuditedEngine
from loramix.serve.engine import Engine
from loramix.serve.errors import error_body, install_error_handlers
from loramix.serve.metrics import Metrics, install_metrics
from loramix.serve.settings import ServeSettings
from loramix.serve.tenants import KeyRing, install_auth
from loramix.serve.ui import install_ui

__all__ = ["BodyLimit", "create_app"]


class BodyLimit:
    """Refuse request bodies over the limit with 413 (adapter uploads get their own, larger limit)."""

    def __init__(self, app: ASGIApp, settings: ServeSettings):
        self.app, self.settings = app, settings

    def _limit(self, scope: Scope) -> int:
        upload = scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/adapters"
        return self.settings.max_upload_bytes if upload else self.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                too_big = False
            if too_big:
                await self._refuse(scope, send, limit)
                return
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0  # no length given (chunked): read it here, up to the limit
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            size += len(msg.get("body", b""))
            if size > limit:
                await self._refuse(scope, send, limit)
                return
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        body, sent = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, limit: int) -> None:
        msg = f"the request body is larger than this server's limit of {limit} bytes"
        data = json.dumps(error_body(scope["path"], 413, msg)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


def create_app(engine: Engine, settings: ServeSettings | None = None) -> FastAPI:
    """The HTTP app over ``engine``; the engine is started and closed with the app's lifespan."""
    settings = settings or ServeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="loramix", version=__version__, lifespan=lifespan,
                  description="OpenAI- and LoRAX-compatible serving of a LoRA library with per-row mixtures.")
    metrics = Metrics()
    audited = AuditedEngine(engine, metrics)  # audit rows and generation metrics around every engine call
    metrics.attach(audited.stats)
    app.state.engine = audited
    app.state.settings = settings
    app.state.created = int(time.time())
    install_error_handlers(app)
    app.include_router(openai_api.router)
    app.include_router(lorax_api.router)
    app.include_router(library_api.router)
    keys = KeyRing.load(settings.api_keys) if settings.api_keys is not None else None
    install_auth(app, keys, settings.max_concurrent_per_key)
    install_ui(app)
    app.add_middleware(BodyLimit, settings=settings)
    install_metrics(app, metrics)  # outermost: counts and times every response, refusals included
    return app

