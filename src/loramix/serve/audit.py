"""Audit and metrics around the engine: :class:`AuditedEngine` wraps any Engine.

Every library action (list, get, add, delete, runtime load/unload), every resolution of a request's
model, route, score and generation appends one audit row (time, tenant, action, adapter, outcome,
detail) through the engine's ``audit`` method (the library's audit table for the real engine) and each
finished generation is observed by the metrics. A refused action is audited too, with its outcome
(``not_found``, ``denied``, ``invalid``, ``overloaded``, ``error``), then re-raised unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loramix.config import RouteConfig
from loramix.errors import (
    AccessDenied,
    AdapterExists,
    AdapterNotFound,
    CollectionNotFound,
    ConfigError,
    DocumentError,
    InvalidAdapter,
    LoramixError,
    MergeError,
    Overloaded,
    RoutingError,
)
from loramix.serve.engine import Augmented, DocsRequest, Engine, Event, Handle, MergeRecipe, Resolved
from loramix.serve.metrics import EngineStats, Metrics
from loramix.serve.scheduler import FinishEvent, GenRequest

__all__ = ["AuditedEngine", "outcome_of_error"]

log = logging.getLogger("loramix.serve")


def outcome_of_error(exc: BaseException) -> str:
    if isinstance(exc, AdapterNotFound | CollectionNotFound):
        return "not_found"
    if isinstance(exc, AccessDenied):
        return "denied"
    if isinstance(exc, Overloaded):
        return "overloaded"
    if isinstance(exc, AdapterExists | InvalidAdapter | ConfigError | MergeError | RoutingError | DocumentError):
        return "invalid"
    return "error"


def _names(resolved: Resolved) -> str | None:
    return ",".join(a["name"] for a in resolved.adapters) or None


class AuditedEngine:
    """An Engine that audits each call and observes finished generations; everything else is delegated."""

    def __init__(self, inner: Engine, metrics: Metrics | None = None):
        self.inner = inner
        self.metrics = metrics
        self.base_id = inner.base_id

    def __getattr__(self, name: str) -> Any:  # anything beyond the protocol (scheduler, lm, ...) as it is
        return getattr(self.inner, name)

    def _audit(self, action: str, tenant: str | None, adapter: str | None, outcome: str = "ok",
               detail: dict[str, Any] | None = None) -> None:
        sink = getattr(self.inner, "audit", None)
        if sink is None:
            return
        try:
            sink(action, tenant=tenant, adapter=adapter, outcome=outcome, detail=detail)
        except Exception:  # noqa: BLE001 - an audit failure must not fail the request; it is logged
            log.exception("could not write the audit row for %s by %s", action, tenant)

    @contextmanager
    def _audited(self, action: str, tenant: str | None, adapter: str | None,
                 detail: dict[str, Any] | None = None) -> Iterator[None]:
        try:
            yield
        except LoramixError as e:
            self._audit(action, tenant, adapter, outcome_of_error(e), {**(detail or {}), "error": str(e)[:300]})
            raise
        self._audit(action, tenant, adapter, "ok", detail)

    # --- passed through, not audited ---------------------------------------------------------------
    def start(self) -> None:
        self.inner.start()

    def close(self) -> None:
        self.inner.close()

    def info(self) -> dict[str, Any]:
        return self.inner.info()

    def default_route(self) -> RouteConfig:
        return self.inner.default_route()

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.inner.chat_ids(messages)

    def text_ids(self, text: str) -> list[int]:
        return self.inner.text_ids(text)

    def models(self, tenant: str | None) -> list[dict[str, Any]]:
        return self.inner.models(tenant)

    def stats(self) -> EngineStats | None:
        fn: Callable[[], EngineStats | None] | None = getattr(self.inner, "stats", None)
        return fn() if fn is not None else None

    # --- audited -------------------------------------------------------------------------------
    def resolve(self, model: str | None, tenant: str | None, query: str | None = None,
                route: RouteConfig | None = None) -> Resolved:
        try:
            return self.inner.resolve(model, tenant, query, route)
        except LoramixError as e:  # the successful ones are audited with their generation or score
            self._audit("resolve", tenant, model or None, outcome_of_error(e), {"error": str(e)[:300]})
            raise

    def resolve_merged(self, recipe: MergeRecipe, tenant: str | None) -> Resolved:
        try:
            return self.inner.resolve_merged(recipe, tenant)
        except LoramixError as e:
            self._audit("resolve", tenant, ",".join(recipe.names), outcome_of_error(e),
                        {"merge_strategy": recipe.strategy, "error": str(e)[:300]})
            raise

    def route(self, query: str, cfg: RouteConfig, tenant: str | None) -> dict[str, Any]:
        with self._audited("route", tenant, None, {"strategy": cfg.strategy, "k": cfg.k}):
            out = self.inner.route(query, cfg, tenant)
        return out

    def score(self, text: str, resolved: Resolved) -> dict[str, Any]:
        return self.inner.score(text, resolved)  # not audited: Engine.score carries no tenant

    def augment(self, resolved: Resolved, docs: DocsRequest, tenant: str | None,
                messages: list[dict[str, Any]] | None = None, prompt: str | None = None) -> Augmented:
        """Passages for a request; a refusal (unknown or unreadable collection) is audited as ``retrieve``,
        the passages used go into the generation's audit row."""
        try:
            return self.inner.augment(resolved, docs, tenant, messages, prompt)
        except LoramixError as e:
            self._audit("retrieve", tenant, None, outcome_of_error(e),
                        {"docs": list(docs.collections), "error": str(e)[:300]})
            raise

    def submit(self, req: GenRequest, on_event: Callable[[Event], None]) -> Handle:
        return self.inner.submit(req, on_event)

    def record(self, resolved: Resolved, finish: FinishEvent, tenant: str | None) -> None:
        """A finished generation: metrics, the audit row, then the engine's own bookkeeping (use counts)."""
        if self.metrics is not None:
            self.metrics.observe_generation(finish)
        outcome = {"error": "error", "cancelled": "cancelled"}.get(finish.reason, "ok")
        detail: dict[str, Any] = {"finish_reason": finish.reason, "prompt_tokens": finish.prompt_tokens,
                                  "generated_tokens": finish.generated_tokens, "routed": resolved.routed,
                                  "weights": [round(float(a["weight"]), 4) for a in resolved.adapters]}
        if resolved.passages is not None:
            detail["passages"] = [f"{p['collection']}:{p['id']}" for p in resolved.passages]
        if finish.error:
            detail["error"] = finish.error[:300]
        self._audit("generate", tenant, _names(resolved), outcome, detail)
        self.inner.record(resolved, finish, tenant)

    def list_adapters(self, tenant: str | None, q: str | None = None, tags: Sequence[str] = ()) -> list[dict[str, Any]]:
        with self._audited("list", tenant, None, {"q": q, "tags": list(tags)} if q or tags else None):
            out = self.inner.list_adapters(tenant, q, tags)
        return out

    def get_adapter(self, name: str, tenant: str | None) -> dict[str, Any]:
        with self._audited("get", tenant, name):
            out = self.inner.get_adapter(name, tenant)
        return out

    def add_adapter(self, folder: Path, name: str, tenant: str | None, description: str = "",
                    tags: Sequence[str] = (), examples: Sequence[str] | None = None,
                    public: bool = False) -> dict[str, Any]:
        with self._audited("add", tenant, name, {"public": public}):
            out = self.inner.add_adapter(folder, name, tenant, description, tags, examples, public)
        return out

    def remove_adapter(self, name: str, tenant: str | None) -> None:
        with self._audited("delete", tenant, name):
            self.inner.remove_adapter(name, tenant)

    def load_lora(self, name: str, path: Path, tenant: str | None) -> None:
        with self._audited("load_lora", tenant, name, {"path": str(path)}):
            self.inner.load_lora(name, path, tenant)

    def unload_lora(self, name: str, tenant: str | None) -> None:
        with self._audited("unload_lora", tenant, name):
            self.inner.unload_lora(name, tenant)
