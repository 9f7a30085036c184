"""Opening a loramix SQLite file: the connection settings every store uses and the schema-version check.

Shared by the adapter registry (``registry.sqlite``) and the document store (``docs.sqlite``):
autocommit mode (transactions are explicit ``BEGIN IMMEDIATE``), WAL with ``synchronous = NORMAL``
(a commit is atomic; after a power cut the last commits may be lost, never half-applied), foreign
keys on, a busy timeout, and a refusal to open a file written by a newer loramix.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path

from loramix.errors import LoramixError

__all__ = ["ensure_schema", "open_db", "schema_version"]


def open_db(path: Path, busy_timeout: float, error: type[LoramixError], what: str) -> sqlite3.Connection:
    """A connection to ``path`` (shared across threads; callers serialise with their own lock);
    ``error`` names the failure as ``cannot open the {what} {path}: ...``."""
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as e:
        raise error(f"cannot open the {what} {path}: {e}") from e
    return conn


def schema_version(conn: sqlite3.Connection, path: Path, supported: int, error: type[LoramixError]) -> int:
    """The file's ``user_version``; ``error`` when it is newer than ``supported`` (this loramix is too old)."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > supported:
        raise error(f"{path} has schema version {version}; this loramix reads up to {supported}: upgrade loramix")
    return version


def ensure_schema(conn: sqlite3.Connection, path: Path, version: int, statements: Iterable[str],
                  migrate: Callable[[sqlite3.Connection], None],
                  write: Callable[[], AbstractContextManager[sqlite3.Connection]], error: type[LoramixError]) -> None:
    """Bring an older file (or a new, empty one) to ``version``: the ``CREATE ... IF NOT EXISTS`` statements,
    then ``migrate``, then the version stamp, all in one write transaction from ``write()``, so that a crash
    leaves the old schema or the new one. A newer file raises ``error`` (see :func:`schema_version`)."""
    if schema_version(conn, path, version, error) >= version:
        return
    with write() as c:
        for stmt in statements:
            c.execute(stmt)
        migrate(c)
        c.execute(f"PRAGMA user_version = {version}")
