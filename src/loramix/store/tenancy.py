"""Tenancy in the registry: adapter owners and visibility, the schema migration, and the audit log.

An adapter's ``owner`` is a tenant name, or NULL for the operator's shared library (visible to all);
``public`` makes an owned adapter visible to every tenant. A caller's ``tenant`` of None means no
filter (the operator, an admin key, the CLI); any other tenant sees shared, public and its own
adapters, and nothing else: another tenant's private adapter looks exactly like a missing one.
Adapter names stay unique across the whole library, all tenants included.

The ``audit`` table keeps one row per action (time, tenant, action, adapter, outcome, detail); it
does not reference ``adapters``, so the rows outlive the adapters they mention.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from loramix.errors import InvalidAdapter, LibraryError
from loramix.store.records import NAME_RE, dump_json

# SQL condition (on alias ``a``) for "visible to tenant ?"; used only when a tenant is given
VISIBLE = "(a.owner IS NULL OR a.public = 1 OR a.owner = ?)"

AUDIT_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS audit (
        ts REAL NOT NULL, tenant TEXT, action TEXT NOT NULL, adapter TEXT, outcome TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '{}')""",
    "CREATE INDEX IF NOT EXISTS audit_tenant ON audit(tenant)",
)
OUTCOMES = ("ok", "denied", "not_found", "invalid", "error", "overloaded", "timeout", "cancelled")


def migrate(c: sqlite3.Connection) -> None:
    """Add the tenancy columns and the audit table to a library made before them (idempotent)."""
    cols = {r[1] for r in c.execute("PRAGMA table_info(adapters)")}
    if "owner" not in cols:
        c.execute("ALTER TABLE adapters ADD COLUMN owner TEXT")
    if "public" not in cols:
        c.execute("ALTER TABLE adapters ADD COLUMN public INTEGER NOT NULL DEFAULT 0")
    c.execute("CREATE INDEX IF NOT EXISTS adapters_owner ON adapters(owner)")
    for stmt in AUDIT_SCHEMA:
        c.execute(stmt)


def check_tenant(tenant: object, what: str = "tenant") -> str | None:
    """None (the operator / no filter) or a tenant name of 1-100 characters from ``A-Z a-z 0-9 . _ -``."""
    if tenant is None:
        return None
    if not isinstance(tenant, str) or not NAME_RE.fullmatch(tenant):
        raise LibraryError(f"invalid {what} {tenant!r}; expected 1-100 characters from A-Z a-z 0-9 . _ - "
                           "(or None for the operator's shared library)")
    return tenant


def check_public(public: object) -> bool:
    if not isinstance(public, bool):
        raise InvalidAdapter(f"public is {public!r}; expected True or False")
    return public


def visible_to(owner: str | None, public: bool, tenant: str | None) -> bool:
    """Whether an adapter with this owner and visibility is visible to ``tenant`` (None sees all)."""
    return tenant is None or owner is None or public or owner == tenant


def write_audit(c: sqlite3.Connection, action: str, tenant: str | None, adapter: str | None, outcome: str,
                detail: dict[str, Any] | None) -> None:
    if not isinstance(action, str) or not action:
        raise LibraryError(f"audit action is {action!r}; expected a non-empty string such as 'add' or 'generate'")
    if outcome not in OUTCOMES:
        raise LibraryError(f"audit outcome is {outcome!r}; expected one of {', '.join(OUTCOMES)}")
    if tenant is not None and not isinstance(tenant, str):
        raise LibraryError(f"audit tenant is a {type(tenant).__name__}; expected a string or None")
    if adapter is not None and not isinstance(adapter, str):
        raise LibraryError(f"audit adapter is a {type(adapter).__name__}; expected a string or None")
    c.execute("INSERT INTO audit (ts, tenant, action, adapter, outcome, detail) VALUES (?, ?, ?, ?, ?, ?)",
              (time.time(), tenant, action, adapter, outcome, dump_json(detail or {}, "audit detail")))


def read_audit(c: sqlite3.Connection, limit: int | None, tenant: str | None) -> list[dict[str, Any]]:
    """The newest ``limit`` rows (all when None), newest first; only ``tenant``'s when given."""
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise LibraryError(f"audit limit is {limit!r}; expected a non-negative integer or None")
    sql = "SELECT rowid, ts, tenant, action, adapter, outcome, detail FROM audit"
    params: list[Any] = []
    if tenant is not None:
        sql += " WHERE tenant = ?"
        params.append(tenant)
    sql += " ORDER BY rowid DESC LIMIT ?"
    params.append(-1 if limit is None else limit)
    return [{"id": r[0], "ts": r[1], "tenant": r[2], "action": r[3], "adapter": r[4], "outcome": r[5],
             "detail": json.loads(r[6])} for r in c.execute(sql, params)]
