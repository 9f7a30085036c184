"""The adapter library: a SQLite registry (``home/registry.sqlite``) over content-addressed blobs.

Opening is cheap: it connects and checks the schema version; nothing scans blobs or loads keys.
Every write runs in one ``BEGIN IMMEDIATE`` transaction under a thread lock, and blob files are
only placed or deleted inside such a transaction, so an import that fails at any point leaves
neither a row nor a new blob behind (``gc`` sweeps what a killed process may leave in ``blobs/tmp``).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from loramix.config import home_dir
from loramix.errors import AccessDenied, AdapterExists, AdapterNotFound, InvalidAdapter, LibraryError, short
from loramix.lora import LoraWeights
from loramix.store.blobs import BlobStore, is_sha
from loramix.store.bulk import NewAdapter, ScaleMixin
from loramix.store.faults import fault
from loramix.store.peft_io import (
    blob_bytes,
    human_bytes,
    read_blob,
    read_peft_dir,
    validate_weights,
    write_peft_dir,
)
from loramix.store.records import (
    AdapterRecord,
    check_key,
    check_meta,
    check_name,
    check_tags,
    check_texts,
    dump_json,
    stack_keys,
)
from loramix.store.sqlite import ensure_schema, open_db
from loramix.store.tenancy import VISIBLE, check_public, check_tenant, migrate, read_audit, write_audit

SCHEMA_VERSION = 2  # 2: adapters.owner / adapters.public and the audit table (store/tenancy.py)
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS adapters (
        id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, description TEXT NOT NULL DEFAULT '',
        domain_tags TEXT NOT NULL DEFAULT '[]', skill_tags TEXT NOT NULL DEFAULT '[]',
        rank INTEGER NOT NULL, alpha REAL NOT NULL, target_modules TEXT NOT NULL DEFAULT '[]',
        n_params INTEGER NOT NULL, created REAL NOT NULL, use_count INTEGER NOT NULL DEFAULT 0,
        blob TEXT NOT NULL, meta TEXT NOT NULL DEFAULT '{}')""",
    "CREATE INDEX IF NOT EXISTS adapters_blob ON adapters(blob)",
    """CREATE TABLE IF NOT EXISTS keys (
        adapter_id TEXT PRIMARY KEY REFERENCES adapters(id) ON DELETE CASCADE,
        dim INTEGER NOT NULL, vec BLOB NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS examples (
        adapter_id TEXT NOT NULL REFERENCES adapters(id) ON DELETE CASCADE, text TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS examples_adapter ON examples(adapter_id)",
    """CREATE TABLE IF NOT EXISTS events (
        adapter_id TEXT NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
        ts REAL NOT NULL, event TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '{}')""",
    "CREATE INDEX IF NOT EXISTS events_adapter ON events(adapter_id)",
    # tag -> adapter index for list(tags=...); the JSON columns on adapters stay the source of truth
    """CREATE TABLE IF NOT EXISTS tags (
        adapter_id TEXT NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
        tag TEXT NOT NULL, kind TEXT NOT NULL, PRIMARY KEY (tag, adapter_id, kind))""",
    "CREATE INDEX IF NOT EXISTS tags_adapter ON tags(adapter_id)",
)
_COLS = ("a.id, a.name, a.description, a.domain_tags, a.skill_tags, a.rank, a.alpha, a.target_modules, "
         "a.n_params, a.created, a.use_count, a.blob, a.meta, a.owner, a.public, a.kind, "
         "EXISTS (SELECT 1 FROM keys k WHERE k.adapter_id = a.id) AS has_key")
_CHUNK = 500  # ids per IN (...) query

Ref: TypeAlias = "str | AdapterRecord"  # an adapter name, id, or its record


class Library(ScaleMixin):
    """A store of LoRA adapters for one base model. Safe to share between threads."""

    def __init__(self, home: Path | str | None = None, base_shapes: Mapping[str, tuple[int, int]] | None = None,
                 max_bytes: int = 2**30, busy_timeout: float = 30.0) -> None:
        if max_bytes < 1:
            raise LibraryError(f"max_bytes must be positive, got {max_bytes}")
        self.home = home_dir(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.db_path = self.home / "registry.sqlite"
        self.blobs = BlobStore(self.home / "blobs")
        self.base_shapes = {k: (int(v[0]), int(v[1])) for k, v in base_shapes.items()} if base_shapes else None
        self.max_bytes = int(max_bytes)
        self._lock = threading.RLock()
        self._conn = open_db(self.db_path, busy_timeout, LibraryError, "registry")
        self._init_schema()
        self._init_scale()  # adapters.kind, pack entries, generation counter (store/bulk.py)

    def _init_schema(self) -> None:
        ensure_schema(self._conn, self.db_path, SCHEMA_VERSION, SCHEMA, migrate, self._write, LibraryError)

    # --- plumbing ------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self.packs.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Library({str(self.home)!r})"

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on any exception."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _find(self, c: sqlite3.Connection, ref: Ref, tenant: str | None = None) -> sqlite3.Row | None:
        key = ref.id if isinstance(ref, AdapterRecord) else ref
        if not isinstance(key, str):
            return None
        vis, params = (f" AND {VISIBLE}", (tenant,)) if tenant is not None else ("", ())
        for col in ("id", "name"):
            row = c.execute(f"SELECT {_COLS} FROM adapters a WHERE a.{col} = ?{vis}", (key, *params)).fetchone()
            if row is not None:
                return row
        return None

    def _require(self, c: sqlite3.Connection, ref: Ref, tenant: str | None = None) -> sqlite3.Row:
        row = self._find(c, ref, tenant)
        if row is None:
            raise self._not_found(c, ref, tenant)
        return row

    def _not_found(self, c: sqlite3.Connection, ref: object, tenant: str | None = None) -> AdapterNotFound:
        """The error for a missing adapter; for a tenant it looks only at what the tenant may see."""
        if isinstance(ref, AdapterRecord):
            ref = ref.id
        msg = f"no adapter named or with id {short(repr(ref))} in the library at {self.home}"
        vis, params = (f" AND {VISIBLE}", [tenant]) if tenant is not None else ("", [])
        if c.execute(f"SELECT 1 FROM adapters a WHERE 1{vis} LIMIT 1", params).fetchone() is None:
            return AdapterNotFound(msg + "; the library is empty (add one with Library.add or `loramix add`)")
        if isinstance(ref, str) and ref:
            pat = "%" + ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            similar = [r[0] for r in c.execute(
                f"SELECT name FROM adapters a WHERE name LIKE ? ESCAPE '\\'{vis} ORDER BY name LIMIT 5",
                [pat, *params])]
            if similar:
                return AdapterNotFound(msg + "; similar names: " + ", ".join(similar))
        return AdapterNotFound(msg + "; expected an existing name or id (Library.list() shows them)")

    def _exists_error(self, name: str, adapter_id: str, owner: str | None = None) -> AdapterExists:
        if owner is not None:  # a tenant's upload: the same words whoever holds the name (it may be private)
            return AdapterExists(f"the adapter name {name!r} is taken; expected a new name (names are unique "
                                 "across the whole library, all tenants included)")
        return AdapterExists(f"an adapter named {name!r} already exists (id {adapter_id}); expected a new name, "
                             f"or remove the old one first with Library.remove({name!r})")

    def _check_new_name(self, name: str, owner: str | None = None) -> None:
        check_name(name)
        row = self._read("SELECT id FROM adapters WHERE name = ?", (name,))
        if row:
            raise self._exists_error(name, row[0]["id"], owner)

    # --- adding --------------------------------------------------------------------------------
    def add(self, path: str | Path, name: str, description: str = "", domain_tags: Iterable[str] = (),
            skill_tags: Iterable[str] = (), examples: list[str] | None = None, meta: dict[str, Any] | None = None,
            key: np.ndarray | None = None, owner: str | None = None, public: bool = False) -> AdapterRecord:
        """Import a PEFT LoRA folder (validated; pickle weights are refused) under a new name.

        ``owner``: the tenant it belongs to (None: the operator's shared library, visible to all);
        ``public``: an owned adapter that every tenant may see and use.
        """
        owner, public = check_tenant(owner, "owner"), check_public(public)
        self._check_new_name(name, owner)
        weights = read_peft_dir(path, self.base_shapes, self.max_bytes)
        return self._add(weights, name, description, domain_tags, skill_tags, examples, meta, key, owner, public)

    def add_weights(self, weights: LoraWeights, name: str, description: str = "", domain_tags: Iterable[str] = (),
                    skill_tags: Iterable[str] = (), examples: list[str] | None = None,
                    meta: dict[str, Any] | None = None, key: np.ndarray | None = None, owner: str | None = None,
                    public: bool = False) -> AdapterRecord:
        """Store in-memory weights (validated like an import) under a new name (``owner``/``public`` as in add)."""
        owner, public = check_tenant(owner, "owner"), check_public(public)
        self._check_new_name(name, owner)
        if getattr(weights, "kind", None) == "nano":  # nano adapters live in pack files (store/bulk.py)
            item = NewAdapter(name, weights, description, list(domain_tags), list(skill_tags), examples, meta, key)
            return self.get(self.add_many([item], owner=owner, public=public)[0])
        if not isinstance(weights, LoraWeights):
            raise InvalidAdapter(f"weights is a {type(weights).__name__}; expected a loramix.lora.LoraWeights")
        validate_weights(weights, self.base_shapes)
        return self._add(weights, name, description, domain_tags, skill_tags, examples, meta, key, owner, public)

    def _add(self, weights: LoraWeights, name: str, description: str, domain_tags: Iterable[str],
             skill_tags: Iterable[str], examples: list[str] | None, meta: dict[str, Any] | None,
             key: np.ndarray | None, owner: str | None = None, public: bool = False) -> AdapterRecord:
        if not isinstance(description, str):
            raise InvalidAdapter(f"description is a {type(description).__name__}; expected a string")
        dtags, stags = check_tags(domain_tags, "domain_tags"), check_tags(skill_tags, "skill_tags")
        texts, meta_json = check_texts(examples), check_meta(meta)
        vec = check_key(key) if key is not None else None
        data = blob_bytes(weights)
        if len(data) > self.max_bytes:
            raise InvalidAdapter(f"adapter {name!r} is {human_bytes(len(data))} as safetensors, over the size limit "
                                 f"of {human_bytes(self.max_bytes)} ({self.max_bytes} bytes, max_bytes)")
        tmp, sha = self.blobs.write_temp(data)
        del data
        fault("add.after_temp_write")
        placed = committed = False
        try:
            with self._lock:
                c = self._conn
                c.execute("BEGIN IMMEDIATE")
                try:
                    taken = c.execute("SELECT id FROM adapters WHERE name = ?", (name,)).fetchone()
                    if taken is not None:
                        raise self._exists_error(name, taken["id"], owner)
                    placed = self.blobs.place(tmp, sha)
                    fault("add.after_place")
                    adapter_id = self._new_id(c)
                    self._insert_rows(c, adapter_id, name, description, dtags, stags, weights, sha, meta_json,
                                      texts, vec)
                    if owner is not None or public:
                        c.execute("UPDATE adapters SET owner = ?, public = ? WHERE id = ?",
                                  (owner, int(public), adapter_id))
                    fault("add.before_commit")
                    c.execute("COMMIT")
                    committed = True
                except BaseException:
                    if placed and not committed:  # new blob, and we still hold the write lock: nobody uses it
                        with contextlib.suppress(OSError):
                            self.blobs.delete(sha)
                    self._rollback()
                    raise
        finally:
            tmp.unlink(missing_ok=True)
        return self.get(adapter_id)

    @staticmethod
    def _new_id(c: sqlite3.Connection) -> str:
        while True:
            adapter_id = uuid.uuid4().hex[:16]
            if c.execute("SELECT 1 FROM adapters WHERE id = ?", (adapter_id,)).fetchone() is None:
                return adapter_id

    def _insert_rows(self, c: sqlite3.Connection, adapter_id: str, name: str, description: str,
                     dtags: list[str], stags: list[str], weights: LoraWeights, sha: str, meta_json: str,
                     texts: list[str], vec: np.ndarray | None) -> None:
        """Insert the adapter row, its tags, examples and key (inside the caller's transaction)."""
        c.execute(
            "INSERT INTO adapters (id, name, description, domain_tags, skill_tags, rank, alpha, target_modules, "
            "n_params, created, use_count, blob, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
            (adapter_id, name, description, dump_json(dtags, "domain_tags"), dump_json(stags, "skill_tags"),
             int(weights.rank), float(weights.alpha), dump_json(weights.target_modules, "target_modules"),
             int(weights.n_params), time.time(), sha, meta_json))
        self._set_tags(c, adapter_id, "domain", dtags)
        self._set_tags(c, adapter_id, "skill", stags)
        c.executemany("INSERT INTO examples (adapter_id, text) VALUES (?, ?)", [(adapter_id, t) for t in texts])
        if vec is not None:
            self._put_key(c, adapter_id, vec)

    @staticmethod
    def _set_tags(c: sqlite3.Connection, adapter_id: str, kind: str, tags: list[str]) -> None:
        c.execute("DELETE FROM tags WHERE adapter_id = ? AND kind = ?", (adapter_id, kind))
        c.executemany("INSERT INTO tags (adapter_id, tag, kind) VALUES (?, ?, ?)",
                      [(adapter_id, t, kind) for t in tags])

    # --- reading -------------------------------------------------------------------------------
    def get(self, name_or_id: Ref, tenant: str | None = None) -> AdapterRecord:
        """The record with this id or name; raises AdapterNotFound (also when ``tenant`` may not see it)."""
        with self._lock:
            return AdapterRecord.from_row(self._require(self._conn, name_or_id, check_tenant(tenant)))

    def list(self, tags: list[str] | None = None, limit: int | None = None, offset: int = 0,
             tenant: str | None = None) -> list[AdapterRecord]:
        """Records in insertion order; with ``tags``, only adapters carrying all of them (domain or skill);
        with ``tenant``, only those it may see (shared, public, its own)."""
        wanted = check_tags(tags, "tags")
        sql, params, where = f"SELECT {_COLS} FROM adapters a", [], []
        if wanted:
            where.append(f"a.id IN (SELECT adapter_id FROM tags WHERE tag IN ({','.join('?' * len(wanted))}) "
                         "GROUP BY adapter_id HAVING COUNT(DISTINCT tag) = ?)")
            params += [*wanted, len(wanted)]
        if check_tenant(tenant) is not None:
            where.append(VISIBLE)
            params.append(tenant)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY a.rowid"
        if limit is not None or offset:
            if (limit is not None and limit < 0) or offset < 0:
                raise LibraryError(f"limit and offset must be >= 0, got limit={limit}, offset={offset}")
            sql += " LIMIT ? OFFSET ?"
            params += [-1 if limit is None else int(limit), int(offset)]
        return [AdapterRecord.from_row(r) for r in self._read(sql, params)]

    def ids(self) -> builtins.list[str]:
        return [r[0] for r in self._read("SELECT id FROM adapters ORDER BY rowid")]

    def __len__(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM adapters")[0][0])

    def __contains__(self, name_or_id: object) -> bool:
        if not isinstance(name_or_id, str | AdapterRecord):
            return False
        with self._lock:
            return self._find(self._conn, name_or_id) is not None

    def load(self, name_or_id: Ref, verify: bool = False) -> LoraWeights:
        """The adapter's weights, read from its blob with safetensors; ``verify`` re-checks the sha256."""
        fast = self._load_packed_id(name_or_id, verify)  # by id, packed: one query (store/bulk.py)
        if fast is not None:
            return fast
        rec = self.get(name_or_id)
        packed = self._load_any(rec, verify)  # packed or nano adapters (store/bulk.py)
        if packed is not None:
            return packed
        path = self.blobs.path(rec.blob)
        if not path.is_file():
            raise LibraryError(f"blob {rec.blob} of adapter {rec.name!r} is missing ({path}); the library is damaged "
                               "(was the blobs folder edited?)")
        if verify:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != rec.blob:
                raise LibraryError(f"blob {path} of adapter {rec.name!r} is corrupt: sha256 {h.hexdigest()}, "
                                   f"expected {rec.blob}")
        return read_blob(path)

    def export(self, name_or_id: Ref, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write a PEFT folder (adapter_config.json + adapter_model.safetensors) for PeftModel.from_pretrained."""
        return write_peft_dir(self.load(name_or_id), out_dir, overwrite=overwrite)

    # --- changing ------------------------------------------------------------------------------
    def remove(self, name_or_id: Ref, tenant: str | None = None) -> None:
        """Delete the adapter with its key, examples and events; its blob too unless another adapter shares it.

        With ``tenant``: only an adapter it may see, and not a shared one (owner None) or another tenant's
        public one, which it may use but not delete (AccessDenied).

        Two transactions, so that no crash leaves a row without its blob: the rows' deletion commits
        first; then, under a new write lock, the blob is deleted only if no row references it (a crash
        in between leaves an orphan blob, which :meth:`gc` removes).
        """
        tenant = check_tenant(tenant)
        with self._write() as c:
            row = self._require(c, name_or_id, tenant)
            if tenant is not None and row["owner"] != tenant:
                raise AccessDenied(f"adapter {short(repr(row['name']))} is not yours to delete: it belongs to "
                                   f"{'the shared library' if row['owner'] is None else 'another tenant'}; "
                                   "expected one of your own adapters")
            c.execute("DELETE FROM adapters WHERE id = ?", (row["id"],))
            fault("remove.after_row_delete")
        fault("remove.after_commit")
        with contextlib.suppress(OSError, sqlite3.Error):  # the adapter is gone; a leftover blob is gc's job
            self._delete_if_orphan(row["blob"], "remove.after_blob_delete")
    def _restore_trashed(self, f: Path) -> bool:
        """Put back a blob that an older loramix's interrupted remove moved aside while its row stayed."""
        sha = f.name.split(".trash-", 1)[0] if ".trash-" in f.name else ""
        if not is_sha(sha):
            return False
        with self._write() as c:
            if (c.execute("SELECT 1 FROM adapters WHERE blob = ? LIMIT 1", (sha,)).fetchone() is None
                    or self.blobs.exists(sha)):
                return False
            self.blobs.restore(f, sha)
            return True

    def _delete_if_orphan(self, sha: str, point: str) -> bool:
        """Delete blob ``sha`` if no row references it, holding the write lock so no add can claim it meanwhile."""
        with self._write() as c:
            if c.execute("SELECT 1 FROM adapters WHERE blob = ? LIMIT 1", (sha,)).fetchone() is not None:
                return False
            deleted = self.blobs.delete(sha)
            fault(point)
            return deleted

    def update(self, name_or_id: Ref, description: str | None = None, domain_tags: Iterable[str] | None = None,
               skill_tags: Iterable[str] | None = None, meta: dict[str, Any] | None = None,
               name: str | None = None) -> AdapterRecord:
        """Change the given fields (None leaves one as is); ``meta`` replaces the whole dict."""
        with self._write() as c:
            row = self._require(c, name_or_id)
            aid, sets, params = row["id"], [], []
            if description is not None:
                if not isinstance(description, str):
                    raise InvalidAdapter(f"description is a {type(description).__name__}; expected a string")
                sets.append("description = ?")
                params.append(description)
            for col, kind, value in (("domain_tags", "domain", domain_tags), ("skill_tags", "skill", skill_tags)):
                if value is not None:
                    tags = check_tags(value, col)
                    sets.append(f"{col} = ?")
                    params.append(dump_json(tags, col))
                    self._set_tags(c, aid, kind, tags)
            if meta is not None:
                sets.append("meta = ?")
                params.append(check_meta(meta))
            if name is not None and name != row["name"]:
                check_name(name)
                taken = c.execute("SELECT id FROM adapters WHERE name = ?", (name,)).fetchone()
                if taken is not None:
                    raise self._exists_error(name, taken["id"])
                sets.append("name = ?")
                params.append(name)
            if sets:
                c.execute(f"UPDATE adapters SET {', '.join(sets)} WHERE id = ?", (*params, aid))
        return self.get(aid)

    # --- routing keys --------------------------------------------------------------------------
    def set_key(self, id: Ref, vec: np.ndarray) -> None:
        """Store the adapter's routing key (a finite 1-D vector, kept as float32 bytes)."""
        v = check_key(vec)
        with self._write() as c:
            self._put_key(c, self._require(c, id)["id"], v)

    def set_keys(self, ids: Sequence[Ref], vecs: np.ndarray, missing_ok: bool = False) -> builtins.list[str]:
        """Store many keys in one transaction: ``vecs`` is (len(ids), d). Returns the ids keyed.

        ``missing_ok`` skips adapters removed meanwhile (by another process) instead of failing them all.
        """
        m = np.asarray(vecs)
        if m.ndim != 2 or m.shape[0] != len(ids):
            raise LibraryError(f"keys have shape {m.shape}; expected ({len(ids)}, d), one row per id")
        rows = [check_key(v) for v in m]
        done: builtins.list[str] = []
        with self._write() as c:
            for ref, v in zip(ids, rows, strict=True):
                row = self._find(c, ref) if missing_ok else self._require(c, ref)
                if row is not None:
                    self._put_key(c, row["id"], v)
                    done.append(row["id"])
            fault("key.before_commit")
        return done

    @staticmethod
    def _put_key(c: sqlite3.Connection, adapter_id: str, v: np.ndarray) -> None:
        c.execute("INSERT INTO keys (adapter_id, dim, vec) VALUES (?, ?, ?) ON CONFLICT (adapter_id) "
                  "DO UPDATE SET dim = excluded.dim, vec = excluded.vec", (adapter_id, int(v.size), v.tobytes()))

    def delete_key(self, id: Ref) -> None:
        with self._write() as c:
            c.execute("DELETE FROM keys WHERE adapter_id = ?", (self._require(c, id)["id"],))

    def keys(self, ids: Sequence[str] | None = None) -> tuple[builtins.list[str], np.ndarray]:
        """(ids having keys, their (n, d) float32 matrix): all in insertion order, or those of ``ids`` in order."""
        if ids is None:
            rows = self._read("SELECT k.adapter_id, k.dim, k.vec FROM keys k JOIN adapters a ON a.id = k.adapter_id "
                              "ORDER BY a.rowid")
            return stack_keys(rows)
        wanted = list(dict.fromkeys(ids))
        found: dict[str, sqlite3.Row] = {}
        for i in range(0, len(wanted), _CHUNK):
            chunk = wanted[i:i + _CHUNK]
            for r in self._read(f"SELECT adapter_id, dim, vec FROM keys WHERE adapter_id IN "
                                f"({','.join('?' * len(chunk))})", chunk):
                found[r["adapter_id"]] = r
        return stack_keys([found[i] for i in wanted if i in found])

    def iter_keys(self, batch_size: int = 4096) -> Iterator[tuple[builtins.list[str], np.ndarray]]:
        """All keys in insertion order, ``batch_size`` at a time (for building an index without one big copy)."""
        last = 0
        while True:
            rows = self._read("SELECT a.rowid AS rid, k.adapter_id, k.dim, k.vec FROM keys k "
                              "JOIN adapters a ON a.id = k.adapter_id WHERE a.rowid > ? ORDER BY a.rowid LIMIT ?",
                              (last, batch_size))
            if not rows:
                return
            last = rows[-1]["rid"]
            yield stack_keys(rows)

    # --- examples, usage, events ---------------------------------------------------------------
    def examples(self, id: Ref) -> builtins.list[str]:
        with self._lock:
            aid = self._require(self._conn, id)["id"]
            return [r[0] for r in self._conn.execute(
                "SELECT text FROM examples WHERE adapter_id = ? ORDER BY rowid", (aid,))]

    def add_examples(self, id: Ref, texts: Iterable[str] | str) -> int:
        """Append example texts (blank ones skipped); returns how many were added."""
        rows = check_texts(texts)
        with self._write() as c:
            aid = self._require(c, id)["id"]
            c.executemany("INSERT INTO examples (adapter_id, text) VALUES (?, ?)", [(aid, t) for t in rows])
        return len(rows)

    def record_use(self, ids: Iterable[Ref] | str, event: str | None = None,
                   detail: dict[str, Any] | None = None) -> None:
        """use_count += 1 for each id (all or none); with ``event``, also log one event row per id."""
        refs: builtins.list[Ref] = [ids] if isinstance(ids, str | AdapterRecord) else list(ids)
        if event is None and detail is not None:
            raise LibraryError("record_use got a detail but no event; expected event='...' to log it under")
        if event is not None and (not isinstance(event, str) or not event):
            raise LibraryError(f"event is {event!r}; expected a non-empty string")
        detail_json = dump_json(detail if detail is not None else {}, "detail")
        now = time.time()
        with self._write() as c:
            for ref in refs:
                aid = self._require(c, ref)["id"]
                c.execute("UPDATE adapters SET use_count = use_count + 1 WHERE id = ?", (aid,))
                if event is not None:
                    c.execute("INSERT INTO events (adapter_id, ts, event, detail) VALUES (?, ?, ?, ?)",
                              (aid, now, event, detail_json))

    def events(self, id: Ref, limit: int | None = None) -> builtins.list[dict[str, Any]]:
        """The adapter's events, oldest first (the newest ``limit`` when given)."""
        with self._lock:
            aid = self._require(self._conn, id)["id"]
            rows = self._conn.execute("SELECT ts, event, detail FROM events WHERE adapter_id = ? ORDER BY rowid DESC "
                                      "LIMIT ?", (aid, -1 if limit is None else int(limit))).fetchall()
        return [{"adapter_id": aid, "ts": r["ts"], "event": r["event"], "detail": json.loads(r["detail"])}
                for r in reversed(rows)]

    # --- housekeeping --------------------------------------------------------------------------
    def meta_path(self, name: str) -> Path:
        """``home/meta/<name>``, created: a folder for library-level artefacts (faiss index, router head)."""
        path = self.home / "meta" / check_name(name, "meta folder name")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def gc(self, stale_after: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Remove temp and trash files older than ``stale_after`` s and blobs no adapter references.

        Safe while other processes work: a temp file younger than ``stale_after`` may be an import in
        progress and is kept; each orphan is checked and deleted under the write lock, so an import
        that is placing the same blob either committed its row first (the blob is kept) or waits.
        ``dry_run`` deletes nothing and reports what would go.
        """
        report = GcReport(dry_run=dry_run)
        for f in self.blobs.stale_temps(stale_after):
            with contextlib.suppress(FileNotFoundError):
                if not dry_run and self._restore_trashed(f):
                    report.restored.append(f.name)
                    continue
                size = f.stat().st_size
                if not dry_run:
                    f.unlink()
                report.temp_files.append(f.name)
                report.bytes += size
        referenced = {r[0] for r in self._read("SELECT DISTINCT blob FROM adapters")}
        for sha in [s for s in self.blobs.iter_shas() if s not in referenced]:
            with contextlib.suppress(FileNotFoundError):
                size = self.blobs.path(sha).stat().st_size
                if dry_run:
                    gone = self._read("SELECT 1 FROM adapters WHERE blob = ? LIMIT 1", (sha,)) == []
                else:
                    gone = self._delete_if_orphan(sha, "gc.after_blob_delete")
                if gone:
                    report.orphan_blobs.append(sha)
                    report.bytes += size
        report.unkeyed = [r[0] for r in self._read(
            "SELECT name FROM adapters a WHERE NOT EXISTS (SELECT 1 FROM keys k WHERE k.adapter_id = a.id) "
            "ORDER BY a.rowid")]
        return report

    # --- audit log -----------------------------------------------------------------------------
    def audit(self, action: str, tenant: str | None = None, adapter: str | None = None, outcome: str = "ok",
              detail: dict[str, Any] | None = None) -> None:
        """Append one audit row (time, tenant, action, adapter, outcome, detail); see store/tenancy.py."""
        with self._write() as c:
            write_audit(c, action, tenant, adapter, outcome, detail)

    def audit_log(self, limit: int | None = 100, tenant: str | None = None) -> builtins.list[dict[str, Any]]:
        """The newest ``limit`` audit rows, newest first; only ``tenant``'s rows when given."""
        with self._lock:
            return read_audit(self._conn, limit, check_tenant(tenant))

@dataclass
class GcReport:
    """What :meth:`Library.gc` removed (or, with ``dry_run``, would remove)."""

    dry_run: bool = False
    temp_files: builtins.list[str] = field(default_factory=list)  # names in blobs/tmp (temp and trash files)
    orphan_blobs: builtins.list[str] = field(default_factory=list)  # sha256 of blobs no adapter references
    bytes: int = 0  # freed
    unkeyed: builtins.list[str] = field(default_factory=list)  # adapters without a routing key (keyed at next start)

    restored: builtins.list[str] = field(default_factory=list)  # trash files put back: a row still needed them

    @property
    def removed(self) -> int:
        return len(self.temp_files) + len(self.orphan_blobs)

    def to_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "removed": self.removed, "temp_files": self.temp_files,
                "orphan_blobs": self.orphan_blobs, "bytes": self.bytes, "unkeyed": self.unkeyed,
                "restored": self.restored}
