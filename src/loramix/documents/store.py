"""Document collections: chunked texts and their embeddings in ``home/docs.sqlite``.

A sibling of the adapter registry (same folder, own file, so the two never contend for one write
lock). A collection is added in one ``BEGIN IMMEDIATE`` transaction after every chunk was embedded
and checked, so a failed or killed import leaves nothing behind: a collection is whole or gone.
Every change bumps a ``generation`` counter that caches (retrieval, passage KV) compare against.
The faiss index over chunk vectors is a cache of this table, kept by :class:`loramix.route.index.KeyIndex`.

Tenancy follows the adapters' rule (:mod:`loramix.store.tenancy`): a collection's ``owner`` is a tenant
name, or NULL for the operator's shared collections, which every tenant reads; ``public`` opens an owned
collection to every tenant. A ``tenant`` of None means no filter (the operator, the CLI); any other
tenant sees shared, public and its own collections, and another tenant's private collection reads
exactly like a missing one. Names stay unique across all tenants.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from loramix.config import home_dir
from loramix.errors import CollectionNotFound, DocumentError, LoramixError
from loramix.store.sqlite import ensure_schema, open_db
from loramix.store.tenancy import check_tenant, visible_to

__all__ = ["Chunk", "CollectionRecord", "DocStore", "chunk_text"]

SCHEMA_VERSION = 2  # 2: collections.owner, collections.public (tenancy)
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS collections (
        id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, tags TEXT NOT NULL DEFAULT '[]',
        source TEXT NOT NULL DEFAULT '', created REAL NOT NULL, chunk_words INTEGER NOT NULL,
        chunk_overlap INTEGER NOT NULL, n_docs INTEGER NOT NULL, n_chunks INTEGER NOT NULL,
        encoder TEXT NOT NULL, dim INTEGER NOT NULL, owner TEXT, public INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS chunks (
        id TEXT PRIMARY KEY, collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
        doc INTEGER NOT NULL, seq INTEGER NOT NULL, key TEXT NOT NULL, text TEXT NOT NULL, vec BLOB NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS chunks_collection ON chunks(collection_id)",
    "CREATE TABLE IF NOT EXISTS state (k TEXT PRIMARY KEY, v INTEGER NOT NULL)",
)
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_CHUNK = 500  # ids per IN (...) query


class TextEncoder(Protocol):
    @property
    def name(self) -> str: ...

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray: ...


@dataclass(frozen=True)
class CollectionRecord:
    """One collection's row."""

    id: str
    name: str
    tags: list[str]
    source: str
    created: float
    chunk_words: int
    chunk_overlap: int
    n_docs: int
    n_chunks: int
    encoder: str
    dim: int
    owner: str | None = None  # tenant; None = the operator's shared collection (every tenant reads it)
    public: bool = False  # an owned collection every tenant reads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Chunk:
    """One stored passage: ``doc`` is its document's position in the source, ``key`` the document's key."""

    id: str
    collection: str  # collection name
    doc: int
    seq: int
    key: str
    text: str


def chunk_text(text: str, words: int, overlap: int) -> list[str]:
    """Windows of ``words`` words, consecutive ones sharing ``overlap`` words (one window when short)."""
    toks = text.split()
    if len(toks) <= words:
        return [" ".join(toks)] if toks else []
    step = words - overlap
    out = []
    for start in range(0, len(toks), step):
        out.append(" ".join(toks[start:start + words]))
        if start + words >= len(toks):
            break
    return out


def _record(row: sqlite3.Row) -> CollectionRecord:
    return CollectionRecord(id=row["id"], name=row["name"], tags=json.loads(row["tags"]), source=row["source"],
                            created=float(row["created"]), chunk_words=int(row["chunk_words"]),
                            chunk_overlap=int(row["chunk_overlap"]), n_docs=int(row["n_docs"]),
                            n_chunks=int(row["n_chunks"]), encoder=row["encoder"], dim=int(row["dim"]),
                            owner=row["owner"], public=bool(row["public"]))


def _migrate(c: sqlite3.Connection) -> None:
    """Schema 1 -> 2: the tenancy columns (idempotent)."""
    cols = {r[1] for r in c.execute("PRAGMA table_info(collections)")}
    if "owner" not in cols:
        c.execute("ALTER TABLE collections ADD COLUMN owner TEXT")
    if "public" not in cols:
        c.execute("ALTER TABLE collections ADD COLUMN public INTEGER NOT NULL DEFAULT 0")


def _check_tags(tags: Iterable[str]) -> list[str]:
    out: list[str] = []
    for t in tags:
        if not isinstance(t, str) or not t.strip() or "," in t:
            raise DocumentError(f"collection tag {t!r} is invalid; expected non-empty strings without commas")
        if t.strip() not in out:
            out.append(t.strip())
    return out


class DocStore:
    """The document collections of one library home. Safe to share between threads."""

    def __init__(self, home: Path | str | None = None, busy_timeout: float = 30.0) -> None:
        self.home = home_dir(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.db_path = self.home / "docs.sqlite"
        self._lock = threading.RLock()
        self._conn = open_db(self.db_path, busy_timeout, DocumentError, "document store")
        try:
            ensure_schema(self._conn, self.db_path, SCHEMA_VERSION, SCHEMA, _migrate, self._write, DocumentError)
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def index_dir(self) -> Path:
        """Folder of the faiss cache over chunk vectors."""
        return self.home / "meta" / "docs-index"

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("INSERT INTO state (k, v) VALUES ('generation', 1) "
                                   "ON CONFLICT(k) DO UPDATE SET v = v + 1")
                self._conn.execute("COMMIT")
            except BaseException as e:
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise DocumentError(f"writing to the document store {self.db_path} failed ({e}); "
                                        "nothing was changed") from e
                raise

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # --- collections ---------------------------------------------------------------------------
    def generation(self) -> int:
        """A counter bumped by every change (any process)."""
        rows = self._read("SELECT v FROM state WHERE k = 'generation'")
        return int(rows[0]["v"]) if rows else 0

    def list(self, tags: Sequence[str] | None = None, tenant: str | None = None) -> list[CollectionRecord]:
        """Collections (carrying all of ``tags``) that ``tenant`` may read (None: all)."""
        recs = [_record(r) for r in self._read("SELECT * FROM collections ORDER BY name")]
        if tags:
            recs = [r for r in recs if set(tags) <= set(r.tags)]
        return [r for r in recs if visible_to(r.owner, r.public, tenant)]

    def get(self, name: str, tenant: str | None = None) -> CollectionRecord:
        """A collection by name or id; CollectionNotFound when missing or not readable by ``tenant``."""
        rows = self._read("SELECT * FROM collections WHERE name = ? OR id = ?", (name, name))
        rows = [r for r in rows if visible_to(r["owner"], bool(r["public"]), tenant)]
        if not rows:
            names = [r.name for r in self.list(tenant=tenant)]
            have = f"; collections: {', '.join(names)}" if names else "; there are none (add one with `loramix docs add`)"
            raise CollectionNotFound(f"no document collection named {name!r}{have}")  # no path: servers show it
        return _record(rows[0])

    def __contains__(self, name: object) -> bool:
        return bool(isinstance(name, str) and self._read("SELECT 1 FROM collections WHERE name = ?", (name,)))

    def add(self, name: str, texts: Sequence[str], encoder: TextEncoder, keys: Sequence[str] | None = None,
            tags: Iterable[str] = (), source: str = "", chunk_words: int = 96, chunk_overlap: int = 24,
            batch_size: int = 64, owner: str | None = None, public: bool = False) -> CollectionRecord:
        """Chunk, embed and store ``texts`` as a new collection (all of it, or nothing on any error);
        ``owner`` (a tenant, None = shared) and ``public`` as in the module doc."""
        try:
            owner = check_tenant(owner, "owner")
        except LoramixError as e:
            raise DocumentError(str(e)) from None
        if not isinstance(public, bool):
            raise DocumentError(f"public is {public!r}; expected True or False")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or set(name) == {"."}:
            raise DocumentError(f"invalid collection name {name!r}; expected 1-100 characters from A-Z a-z 0-9 . _ -")
        if name.startswith("tag") and ":" in name or name == "auto":
            raise DocumentError(f"collection name {name!r} is reserved")
        if name in self:
            raise DocumentError(f"a collection named {name!r} already exists; remove it first (`loramix docs rm {name}`)")
        tags = _check_tags(tags)
        if chunk_words < 8 or not 0 <= chunk_overlap < chunk_words:
            raise DocumentError(f"chunk_words must be >= 8 and 0 <= overlap < chunk_words, got {chunk_words}, {chunk_overlap}")
        if keys is not None and len(keys) != len(texts):
            raise DocumentError(f"got {len(keys)} keys for {len(texts)} texts; expected one key per text")
        rows: list[tuple[int, int, str, str]] = []  # (doc, seq, key, text)
        n_docs = 0
        for d, text in enumerate(texts):
            if not isinstance(text, str):
                raise DocumentError(f"document {d} is a {type(text).__name__}; expected a string")
            pieces = chunk_text(text, chunk_words, chunk_overlap)
            n_docs += bool(pieces)
            key = str(keys[d]) if keys is not None else str(d)
            rows.extend((d, s, key, p) for s, p in enumerate(pieces))
        if not rows:
            raise DocumentError(f"collection {name!r}: the source holds no non-blank text; expected at least one document")
        vecs = np.asarray(encoder.encode([r[3] for r in rows], batch_size=batch_size), dtype="<f4")  # (n, d)
        if vecs.ndim != 2 or len(vecs) != len(rows) or not np.isfinite(vecs).all():
            raise DocumentError(f"the encoder returned {vecs.shape} (or non-finite values) for {len(rows)} chunks; "
                                "expected one finite vector per chunk")
        dims = {r.dim for r in self.list()}
        if dims and dims != {vecs.shape[1]}:
            raise DocumentError(f"the encoder gives {vecs.shape[1]}-d vectors but the stored collections have "
                                f"{sorted(dims)}; use one encoder for every collection")
        cid = uuid.uuid4().hex[:16]
        with self._write() as c:
            c.execute("INSERT INTO collections (id, name, tags, source, created, chunk_words, chunk_overlap, n_docs, "
                      "n_chunks, encoder, dim, owner, public) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                      (cid, name, json.dumps(tags), source, time.time(), chunk_words, chunk_overlap, n_docs,
                       len(rows), getattr(encoder, "name", "?"), int(vecs.shape[1]), owner,
                       int(public and owner is not None)))
            c.executemany("INSERT INTO chunks VALUES (?,?,?,?,?,?,?)",
                          [(f"{cid}-{d}-{s}", cid, d, s, k, t, v.tobytes())
                           for (d, s, k, t), v in zip(rows, vecs, strict=True)])
        return self.get(name)

    def remove(self, name: str) -> CollectionRecord:
        rec = self.get(name)
        with self._write() as c:
            c.execute("DELETE FROM collections WHERE id = ?", (rec.id,))
        return rec

    def set_tags(self, name: str, tags: Iterable[str]) -> CollectionRecord:
        rec = self.get(name)
        with self._write() as c:
            c.execute("UPDATE collections SET tags = ? WHERE id = ?", (json.dumps(_check_tags(tags)), rec.id))
        return self.get(rec.id)

    # --- chunks --------------------------------------------------------------------------------
    def chunk_ids(self, collection_ids: Iterable[str] | None = None) -> builtins.list[str]:
        if collection_ids is None:
            return [r["id"] for r in self._read("SELECT id FROM chunks")]
        out: builtins.list[str] = []
        for cid in collection_ids:
            out.extend(r["id"] for r in self._read("SELECT id FROM chunks WHERE collection_id = ?", (cid,)))
        return out

    def chunks(self, ids: Sequence[str] | None = None, collection: str | None = None) -> builtins.list[Chunk]:
        """Chunks by id (in that order; unknown ids skipped), or all of one collection in order."""
        sql = ("SELECT k.id, c.name, k.doc, k.seq, k.key, k.text FROM chunks k "
               "JOIN collections c ON c.id = k.collection_id")
        if ids is None:
            where, params = (" WHERE c.name = ? ORDER BY k.doc, k.seq", [collection]) if collection else ("", [])
            return [Chunk(*r) for r in self._read(sql + where, params)]
        found: dict[str, Chunk] = {}
        ids = list(ids)
        for i in range(0, len(ids), _CHUNK):
            part = ids[i:i + _CHUNK]
            for r in self._read(sql + f" WHERE k.id IN ({','.join('?' * len(part))})", part):
                found[r[0]] = Chunk(*r)
        return [found[i] for i in ids if i in found]

    def keys(self, ids: Sequence[str] | None = None) -> tuple[builtins.list[str], np.ndarray]:
        """(chunk ids, (n, d) float32 vectors): the interface :class:`KeyIndex.sync` reads."""
        ids = list(ids) if ids is not None else self.chunk_ids()
        out_ids: builtins.list[str] = []
        vecs: builtins.list[bytes] = []
        dim = 0
        for i in range(0, len(ids), _CHUNK):
            part = ids[i:i + _CHUNK]
            for r in self._read(f"SELECT k.id, k.vec, c.dim FROM chunks k JOIN collections c ON c.id = k.collection_id "
                                f"WHERE k.id IN ({','.join('?' * len(part))})", part):
                out_ids.append(r["id"])
                vecs.append(r["vec"])
                dim = int(r["dim"])
        if not out_ids:
            return [], np.zeros((0, 0), dtype=np.float32)
        mat = np.frombuffer(b"".join(vecs), dtype="<f4").reshape(len(out_ids), dim)
        return out_ids, mat.astype(np.float32)
