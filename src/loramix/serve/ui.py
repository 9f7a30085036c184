"""The web page: ``GET /ui`` and its assets (``/ui/static/*``), shipped in the package (no CDN, no build step).

The page is plain HTML, CSS and JavaScript. It talks to the same API as any client: the library
(``/v1/adapters``), the route playground (``/v1/route``), a chat box streaming ``/v1/chat/completions``
(server-sent events read with ``fetch`` and a ``ReadableStream``) and a metrics summary
(``/metrics/summary``). With API keys, the key typed into the page is kept in the browser's
localStorage and sent as ``Authorization: Bearer KEY``; the page itself needs no key.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["STATIC", "install_ui", "router"]

STATIC = Path(__file__).parent / "static"
# scripts and styles only from this server; data only from this server; no inline script
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

router = APIRouter(tags=["ui"], include_in_schema=False)


@router.get("/ui", response_class=HTMLResponse)
async def ui_page() -> HTMLResponse:
    """The web page."""
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"content-security-policy": CSP, "x-content-type-options": "nosniff",
                                       "cache-control": "no-cache"})


@router.get("/ui/")
async def ui_slash() -> RedirectResponse:
    return RedirectResponse("/ui")


def install_ui(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
