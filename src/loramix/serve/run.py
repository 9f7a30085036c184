"""Start the server: build the engine over a library and base model, then run uvicorn."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from loramix.config import MixConfig
from loramix.serve.settings import ServeSettings

__all__ = ["build_app", "serve"]

log = logging.getLogger("loramix.serve")


def build_app(settings: ServeSettings, home: str | Path | None = None, base: str | Path | None = None,
              mix: MixConfig | None = None):  # type: ignore[no-untyped-def]
    """The app over a :class:`LocalEngine` for ``home`` and ``base`` (the engine starts with the app)."""
    from loramix.app import Loramix
    from loramix.serve.app import create_app
    from loramix.serve.engine import LocalEngine

    lm = Loramix(home=home, base=base, mix=mix)
    return create_app(LocalEngine(lm, settings), settings)


def serve(settings: ServeSettings, home: str | Path | None = None, base: str | Path | None = None,
          mix: MixConfig | None = None, log_level: str = "info") -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    settings.check_bind()
    t0 = time.perf_counter()
    app = build_app(settings, home, base, mix)
    log.info("app built in %.1f s", time.perf_counter() - t0)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, timeout_graceful_shutdown=5)
