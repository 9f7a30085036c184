"""Scale features of the library, mixed into :class:`~loramix.store.registry.Library`: adapter kinds
(LoRA and nano), pack files for small adapters, bulk adds, compaction, a generation counter, stats.

The registry gains (idempotently, without a schema-version bump):

- ``adapters.kind`` (``'lora'`` or ``'nano'``);
- ``pack_entries`` (see :mod:`loramix.store.packs`);
- ``library_state`` holding ``generation``, bumped by triggers on every change that can alter routing
  (adapters added, removed, renamed, re-described or re-tagged; keys set or deleted): caches keyed on it
  (the router's result cache) are invalidated by any process's change. ``use_count`` updates don't bump it.

Nothing here imports torch at module import time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loramix.errors import AdapterExists, InvalidAdapter, LibraryError
from loramix.store.nano_io import BasisStore, is_nano_blob, nano_blob_bytes, read_nano_bytes, read_nano_stack
from loramix.store.packs import MAX_ITEM_BYTES, PACK_SCHEMA, CompactReport, PackStore
from loramix.store.records import check_key, check_meta, check_name, check_tags, check_texts, dump_json

if TYPE_CHECKING:
    from loramix.lora import LoraWeights
    from loramix.nano import NanoBasis, NanoWeights

SCALE_SCHEMA = (
    *PACK_SCHEMA,
    "CREATE TABLE IF NOT EXISTS library_state (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO library_state (key, value) VALUES ('generation', 0)",
    *(f"""CREATE TRIGGER IF NOT EXISTS gen_{name} AFTER {event} BEGIN
          UPDATE library_state SET value = value + 1 WHERE key = 'generation'; END"""
      for name, event in (("adapters_ins", "INSERT ON adapters"), ("adapters_del", "DELETE ON adapters"),
                          ("adapters_upd", "UPDATE OF name, description, domain_tags, skill_tags, meta, owner, public ON adapters"),
                          ("keys_ins", "INSERT ON keys"), ("keys_upd", "UPDATE ON keys"),
                          ("keys_del", "DELETE ON keys"))),
    # when an adapter was last used (for prune): stamped whenever use_count changes
    """CREATE TRIGGER IF NOT EXISTS stamp_last_used AFTER UPDATE OF use_count ON adapters BEGIN
          UPDATE adapters SET last_used = (julianday('now') - 2440587.5) * 86400.0 WHERE id = NEW.id; END""",
)
BULK_BATCH = 5000  # adapters per transaction in add_many


@dataclass
class NewAdapter:
    """One adapter for :meth:`Library.add_many`: weights (LoRA or nano) and what the registry keeps."""

    name: str
    weights: Any  # LoraWeights | NanoWeights | NanoStack
    description: str = ""
    domain_tags: Sequence[str] = ()
    skill_tags: Sequence[str] = ()
    examples: list[str] | None = None
    meta: dict[str, Any] | None = None
    key: np.ndarray | None = None


@dataclass
class _Prepared:
    item: NewAdapter
    kind: str
    data: bytes
    sha: str
    dtags: list[str]
    stags: list[str]
    texts: list[str]
    meta_json: str
    vec: np.ndarray | None
    created: float = field(default_factory=time.time)


class ScaleMixin:
    """Methods the Library gains for kinds, packs and bulk work (expects the registry's attributes)."""

    home: Path
    base_shapes: Any
    max_bytes: int
    _conn: sqlite3.Connection
    packs: PackStore
    bases: BasisStore

    # the registry's plumbing
    _lock: Any
    _write: Any
    _read: Any
    _require: Any
    _rollback: Any
    _set_tags: Any
    _put_key: Any
    _exists_error: Any

    def _init_scale(self) -> None:
        self.packs = PackStore(self.home / "packs")
        self.bases = BasisStore(self.home / "meta" / "nano")
        cols = {r[1] for r in self._conn.execute("PRAGMA table_info(adapters)")}
        if {"kind", "last_used"} <= cols and self._conn.execute("PRAGMA table_info(library_state)").fetchone():
            return  # all of SCALE_SCHEMA is created in the one transaction below (only PRAGMAs at open)
        with self._write() as c:
            have = {r[1] for r in c.execute("PRAGMA table_info(adapters)")}
            if "kind" not in have:
                c.execute("ALTER TABLE adapters ADD COLUMN kind TEXT NOT NULL DEFAULT 'lora'")
            if "last_used" not in have:
                c.execute("ALTER TABLE adapters ADD COLUMN last_used REAL")
            for stmt in SCALE_SCHEMA:
                c.execute(stmt)

    # --- generation ----------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        """A counter any routing-relevant change (by any process) increases."""
        row = self._read("SELECT value FROM library_state WHERE key = 'generation'")
        return int(row[0][0]) if row else 0

    # --- nano bases ----------------------------------------------------------------------------
    def put_basis(self, basis: NanoBasis) -> str:
        """Keep a nano basis (under ``meta/nano``) so nano adapters over it can be added and loaded."""
        return self.bases.put(basis)

    def nano_basis(self, basis_id: str) -> NanoBasis:
        return self.bases.get(basis_id)

    # --- reading blobs (packs first, then blob files) ------------------------------------------
    def _blob_bytes(self, sha: str, name: str, verify: bool = False) -> bytes:
        with self._lock:
            data = self.packs.read(self._conn, sha)
        if data is not None:
            return data
        path = self.blobs.path(sha)  # type: ignore[attr-defined]
        if not path.is_file():
            raise LibraryError(f"blob {sha} of adapter {name!r} is missing ({path}, and no pack entry); the library "
                               "is damaged (was the blobs or packs folder edited?)")
        data = path.read_bytes()
        if verify and hashlib.sha256(data).hexdigest() != sha:
            raise LibraryError(f"blob {path} of adapter {name!r} is corrupt: expected sha256 {sha}")
        return data

    def load_nano(self, name_or_id: Any) -> NanoWeights:
        """A nano adapter's cores (raises InvalidAdapter for a LoRA adapter)."""
        rec = self.get(name_or_id)  # type: ignore[attr-defined]
        if rec.kind != "nano":
            raise InvalidAdapter(f"adapter {rec.name!r} is a {rec.kind} adapter; expected a nano adapter")
        return read_nano_bytes(self._blob_bytes(rec.blob, rec.name), self.bases.get)

    def _load_packed_id(self, adapter_id: Any, verify: bool = False) -> LoraWeights | None:
        """A packed adapter's weights by its id in one query (record and pack entry joined: the cold-load path,
        where every B-tree leaf read may be a disk read); None when ``adapter_id`` is no packed adapter's id."""
        if not isinstance(adapter_id, str):
            return None
        with self._lock:
            row = self._conn.execute(
                "SELECT a.name, a.blob, p.pack, p.offset, p.length, p.crc FROM adapters a "
                "JOIN pack_entries p ON p.sha = a.blob WHERE a.id = ?", (adapter_id,)).fetchone()
            if row is None:
                return None
            data = self.packs.read_entry(row[1], int(row[2]), int(row[3]), int(row[4]), int(row[5]))
        return self._decode(data, row[1], row[0], verify)

    def _load_any(self, rec: Any, verify: bool = False) -> LoraWeights | None:
        """The weights as LoRA for packed or nano adapters; None when it is a plain blob file (registry reads it)."""
        with self._lock:
            packed = self.packs.read(self._conn, rec.blob)
        if packed is None and rec.kind != "nano":
            return None
        data = packed if packed is not None else self._blob_bytes(rec.blob, rec.name, verify)
        return self._decode(data, rec.blob, rec.name, verify)

    def _decode(self, data: bytes, sha: str, name: str, verify: bool) -> LoraWeights:
        if verify and hashlib.sha256(data).hexdigest() != sha:
            raise LibraryError(f"blob {sha} of adapter {name!r} is corrupt (sha256 mismatch)")
        if is_nano_blob(data):
            nano = read_nano_stack(data, self.bases.get)
            return nano.to_lora(self.bases.get(nano.basis_id))
        from safetensors.torch import load

        from loramix.lora import LoraWeights
        from loramix.store.peft_io import CONFIG_META_KEY

        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        return LoraWeights.from_peft_state_dict(load(data), json.loads(meta[CONFIG_META_KEY]))

    # --- adding --------------------------------------------------------------------------------
    def _serialize(self, weights: Any, name: str) -> tuple[str, bytes]:
        from loramix.lora import LoraWeights
        from loramix.nano import NanoStack, NanoWeights
        from loramix.store.peft_io import blob_bytes, human_bytes, validate_weights

        if isinstance(weights, NanoWeights | NanoStack):
            basis = self.bases.get(weights.basis_id)
            weights.validate(basis)
            return "nano", nano_blob_bytes(weights, basis)
        if not isinstance(weights, LoraWeights):
            raise InvalidAdapter(f"weights of {name!r} are a {type(weights).__name__}; expected LoraWeights, "
                                 "NanoWeights or NanoStack")
        validate_weights(weights, self.base_shapes)
        data = blob_bytes(weights)
        if len(data) > self.max_bytes:
            raise InvalidAdapter(f"adapter {name!r} is {human_bytes(len(data))} as safetensors, over the size limit "
                                 f"of {human_bytes(self.max_bytes)} ({self.max_bytes} bytes, max_bytes)")
        return "lora", data

    def _prepare(self, item: NewAdapter) -> _Prepared:
        if not isinstance(item, NewAdapter):
            raise InvalidAdapter(f"add_many got a {type(item).__name__}; expected loramix.store.NewAdapter items")
        check_name(item.name)
        if not isinstance(item.description, str):
            raise InvalidAdapter(f"description of {item.name!r} is a {type(item.description).__name__}; expected a string")
        kind, data = self._serialize(item.weights, item.name)
        return _Prepared(item, kind, data, hashlib.sha256(data).hexdigest(), check_tags(item.domain_tags, "domain_tags"),
                         check_tags(item.skill_tags, "skill_tags"), check_texts(item.examples), check_meta(item.meta),
                         check_key(item.key) if item.key is not None else None)

    def add_many(self, items: Iterable[NewAdapter], batch_size: int = BULK_BATCH, progress: Any = None,
                 owner: str | None = None, public: bool = False) -> list[str]:
        """Register many adapters, ``batch_size`` per transaction (all of a batch or none of it).

        Small adapters (nano ones always) go to pack files, bigger ones to blob files. Returns the new
        ids in order. A failing item (bad weights, a taken name) raises before its batch commits; the
        batches before it stay committed. ``progress(n_done)`` is called after each batch. ``owner`` /
        ``public`` (tenancy) apply to every item.
        """
        from loramix.store.tenancy import check_public, check_tenant

        owner, public = check_tenant(owner, "owner"), check_public(public)
        ids: list[str] = []
        chunk: list[_Prepared] = []
        names: set[str] = set()
        for item in items:
            p = self._prepare(item)
            if p.item.name in names:
                raise AdapterExists(f"add_many got the name {p.item.name!r} twice; expected unique names")
            names.add(p.item.name)
            chunk.append(p)
            if len(chunk) >= batch_size:
                ids += self._commit_batch(chunk, owner, public)
                chunk = []
                if progress is not None:
                    progress(len(ids))
        if chunk:
            ids += self._commit_batch(chunk, owner, public)
            if progress is not None:
                progress(len(ids))
        return ids

    def _commit_batch(self, batch: list[_Prepared], owner: str | None, public: bool) -> list[str]:
        big = [p for p in batch if len(p.data) > MAX_ITEM_BYTES]
        placed: list[str] = []
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                wanted = [p.item.name for p in batch]
                for i in range(0, len(wanted), 500):
                    part = wanted[i:i + 500]
                    taken = c.execute(f"SELECT name, id FROM adapters WHERE name IN ({','.join('?' * len(part))})",
                                      part).fetchone()
                    if taken is not None:
                        raise self._exists_error(taken[0], taken[1], owner)
                for p in big:  # rare: a big LoRA goes to a blob file, placed while we hold the lock
                    tmp, _ = self.blobs.write_temp(p.data)  # type: ignore[attr-defined]
                    if self.blobs.place(tmp, p.sha):  # type: ignore[attr-defined]
                        placed.append(p.sha)
                self.packs.append(c, [(p.sha, p.data) for p in batch if len(p.data) <= MAX_ITEM_BYTES])
                ids = self._insert_batch(c, batch, owner, public)
                c.execute("COMMIT")
            except BaseException:
                for sha in placed:
                    with contextlib.suppress(OSError):
                        self.blobs.delete(sha)  # type: ignore[attr-defined]
                self._rollback()
                raise
        return ids

    def _insert_batch(self, c: sqlite3.Connection, batch: list[_Prepared], owner: str | None,
                      public: bool) -> list[str]:
        ids = [uuid.uuid4().hex[:16] for _ in batch]
        rows, tags, examples, keys = [], [], [], []
        for aid, p in zip(ids, batch, strict=True):
            w = p.item.weights
            rows.append((aid, p.item.name, p.item.description, dump_json(p.dtags, "domain_tags"),
                         dump_json(p.stags, "skill_tags"), int(w.rank), float(w.alpha),
                         dump_json(w.target_modules, "target_modules"), int(w.n_params), p.created, p.sha,
                         p.meta_json, p.kind, owner, int(public)))
            tags += [(aid, t, "domain") for t in p.dtags] + [(aid, t, "skill") for t in p.stags]
            examples += [(aid, t) for t in p.texts]
            if p.vec is not None:
                keys.append((aid, int(p.vec.size), p.vec.tobytes()))
        c.executemany("INSERT INTO adapters (id, name, description, domain_tags, skill_tags, rank, alpha, "
                      "target_modules, n_params, created, use_count, blob, meta, kind, owner, public) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)", rows)
        c.executemany("INSERT INTO tags (adapter_id, tag, kind) VALUES (?, ?, ?)", tags)
        c.executemany("INSERT INTO examples (adapter_id, text) VALUES (?, ?)", examples)
        c.executemany("INSERT INTO keys (adapter_id, dim, vec) VALUES (?, ?, ?)", keys)
        return ids

    # --- maintenance ---------------------------------------------------------------------------
    def compact(self, min_dead_share: float = 0.0) -> CompactReport:
        """Rewrite packs holding removed adapters' (or killed appends') bytes, keeping live ones."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                report, old = self.packs.compact(c, min_dead_share=min_dead_share)
                c.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self.packs.drop_maps(old)
            for p in old:
                p.unlink(missing_ok=True)
        return report

    def disk_bytes(self) -> dict[str, int]:
        """Bytes on disk: registry (with its WAL), pack files, blob files, meta artefacts."""
        def walk(p: Path) -> int:
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0

        reg = sum(f.stat().st_size for f in self.home.glob("registry.sqlite*") if f.is_file())
        return {"registry": reg, "packs": self.packs.disk_bytes(), "blobs": walk(self.home / "blobs"),
                "meta": walk(self.home / "meta")}

    def iter_records_fast(self, batch_size: int = 10000) -> Iterator[sqlite3.Row]:
        """Raw (id, name, kind, use_count, created, blob) rows in insertion order, a batch at a time."""
        last = 0
        while True:
            rows = self._read("SELECT rowid AS rid, id, name, kind, use_count, created, blob FROM adapters "
                              "WHERE rowid > ? ORDER BY rowid LIMIT ?", (last, batch_size))
            if not rows:
                return
            last = rows[-1]["rid"]
            yield from rows
