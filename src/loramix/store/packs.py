"""Append-only pack files for small adapters: ``<home>/packs/pack-000001.lmp``.

Each adapter blob (its canonical safetensors bytes, named by sha256 like a blob file) is appended to
the newest pack; the registry's ``pack_entries`` table maps the sha to (pack, offset, length, crc32).
Ordering gives crash safety: the bytes are written and fsynced *before* the transaction that inserts the
entry and the adapter rows commits, and appends only happen while that transaction holds SQLite's
write lock. A kill at any moment therefore leaves either nothing or committed rows whose bytes are on
disk; what a killed append leaves at a pack's end is unreferenced and reclaimed by :meth:`compact`,
like the bytes of removed adapters. Reads are memory-mapped and checked against the crc32.

This module never imports torch.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import sqlite3
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loramix.errors import LibraryError

PACK_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS pack_entries (
        sha TEXT PRIMARY KEY, pack INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
        crc INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS pack_entries_pack ON pack_entries(pack)",
)
_PACK_RE = re.compile(r"^pack-(\d{6})\.lmp$")
MAX_PACK_BYTES = 1 << 30  # start a new pack beyond this size
MAX_ITEM_BYTES = 1 << 20  # adapters up to this size go into packs; bigger ones stay blob files


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class CompactReport:
    packs_before: int
    packs_after: int
    bytes_before: int
    bytes_after: int
    entries_dropped: int

    @property
    def reclaimed(self) -> int:
        return self.bytes_before - self.bytes_after


class PackStore:
    """Pack files in one folder; every method that writes takes the caller's open write transaction."""

    def __init__(self, root: Path, max_pack_bytes: int = MAX_PACK_BYTES) -> None:
        self.root = Path(root)
        self.max_pack_bytes = int(max_pack_bytes)
        self._maps: dict[int, mmap.mmap] = {}
        self._fds: dict[int, int] = {}  # pack -> read-only descriptor for positioned reads
        self._lock = threading.Lock()
        self.fault: str | None = None  # tests: "after_write" raises once the bytes are fsynced, before commit

    # --- files ---------------------------------------------------------------------------------
    def path(self, pack: int) -> Path:
        return self.root / f"pack-{pack:06d}.lmp"

    def pack_numbers(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for f in self.root.iterdir() if (m := _PACK_RE.match(f.name)))

    def disk_bytes(self) -> int:
        return sum(self.path(n).stat().st_size for n in self.pack_numbers())

    def _current(self, extra: int) -> int:
        nums = self.pack_numbers()
        if not nums:
            return 1
        last = nums[-1]
        size = self.path(last).stat().st_size
        return last if size == 0 or size + extra <= self.max_pack_bytes else last + 1

    # --- writing (inside the caller's BEGIN IMMEDIATE transaction) -----------------------------
    def append(self, c: sqlite3.Connection, items: Sequence[tuple[str, bytes]]) -> list[str]:
        """Append blobs not yet packed, fsync, and insert their entries; returns the shas written.

        On any error the pack is truncated back to where it was (the caller rolls back its rows)."""
        new: list[tuple[str, bytes]] = []
        seen: set[str] = set()
        for sha, data in items:
            if sha in seen:
                continue
            seen.add(sha)
            if c.execute("SELECT 1 FROM pack_entries WHERE sha = ?", (sha,)).fetchone() is None:
                new.append((sha, data))
        if not new:
            return []
        self.root.mkdir(parents=True, exist_ok=True)
        total = sum(len(d) for _, d in new)
        pack = self._current(total)
        path = self.path(pack)
        created = not path.exists()
        rows = []
        with open(path, "ab") as f:
            start = f.seek(0, os.SEEK_END)
            try:
                pos = start
                for sha, data in new:
                    f.write(data)
                    rows.append((sha, pack, pos, len(data), zlib.crc32(data)))
                    pos += len(data)
                f.flush()
                os.fsync(f.fileno())
                if created:
                    _fsync_dir(self.root)
                if self.fault == "after_write":
                    raise OSError("injected fault: pack written, rows not committed")
                c.executemany("INSERT INTO pack_entries (sha, pack, offset, length, crc) VALUES (?, ?, ?, ?, ?)", rows)
            except BaseException:
                with contextlib.suppress(OSError):
                    f.truncate(start)
                raise
        return [r[0] for r in rows]

    # --- reading -------------------------------------------------------------------------------
    def _map(self, pack: int, end: int) -> mmap.mmap:
        with self._lock:
            mm = self._maps.get(pack)
            if mm is None or len(mm) < end:
                if mm is not None:
                    with contextlib.suppress(BufferError):
                        mm.close()
                with open(self.path(pack), "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps[pack] = mm
            return mm

    def read(self, c: sqlite3.Connection, sha: str, verify: bool = True) -> bytes | None:
        """The blob's bytes from its pack, or None when it is not packed."""
        row = c.execute("SELECT pack, offset, length, crc FROM pack_entries WHERE sha = ?", (sha,)).fetchone()
        if row is None:
            return None
        return self.read_entry(sha, int(row[0]), int(row[1]), int(row[2]), int(row[3]), verify)

    def read_entry(self, sha: str, pack: int, off: int, length: int, crc: int, verify: bool = True) -> bytes:
        """The bytes of a pack entry whose location the caller already looked up (one query less per load)."""
        try:  # a positioned read, not a memory map: mapped pages would count in the process's RSS
            data = os.pread(self._fd(pack), length, off)  # (the kernel maps ~64 KB around each fault)
        except OSError as e:
            raise LibraryError(f"pack {self.path(pack)} holding blob {sha} is unreadable ({e}); the library is "
                               "damaged (was the packs folder edited?)") from e
        if len(data) < length:
            raise LibraryError(f"pack {self.path(pack)} ends before blob {sha} does (at {off + length}); "
                               "the pack was truncated")
        if verify and zlib.crc32(data) != crc:
            raise LibraryError(f"blob {sha} in {self.path(pack)} fails its crc32 check; the pack is corrupt")
        return data

    def _fd(self, pack: int) -> int:
        with self._lock:
            fd = self._fds.get(pack)
            if fd is None:
                fd = self._fds[pack] = os.open(self.path(pack), os.O_RDONLY)
            return fd

    def close(self) -> None:
        with self._lock:
            for mm in self._maps.values():
                with contextlib.suppress(BufferError):
                    mm.close()
            self._maps.clear()
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()

    # --- compaction ----------------------------------------------------------------------------
    def compact(self, c: sqlite3.Connection, live_sql: str = "SELECT 1 FROM adapters WHERE blob = ? LIMIT 1",
                min_dead_share: float = 0.0) -> tuple[CompactReport, list[Path]]:
        """Inside the caller's write transaction: copy live entries of packs with dead bytes into a new
        pack, drop dead entries; returns the report and the old pack files to unlink *after* commit."""
        nums = self.pack_numbers()
        before = sum(self.path(n).stat().st_size for n in nums)
        dropped = 0
        old: list[Path] = []
        moved: list[tuple[str, bytes]] = []
        for n in nums:
            size = self.path(n).stat().st_size
            entries = c.execute("SELECT sha, offset, length, crc FROM pack_entries WHERE pack = ?", (n,)).fetchall()
            live = [e for e in entries if c.execute(live_sql, (e[0],)).fetchone() is not None]
            live_bytes = sum(int(e[2]) for e in live)
            dead = size - live_bytes
            if dead <= 0 or dead / size <= min_dead_share:
                continue  # nothing (or too little) to reclaim in this pack
            for e in live:
                data = self.read(c, e[0])
                assert data is not None
                moved.append((e[0], data))
            dropped += len(entries) - len(live)
            c.execute("DELETE FROM pack_entries WHERE pack = ?", (n,))
            old.append(self.path(n))
        if moved:
            self._append_fresh(c, moved, (nums[-1] if nums else 0) + 1)
        after_nums = set(self.pack_numbers())
        bytes_after = sum(self.path(n).stat().st_size for n in after_nums if self.path(n) not in old)
        report = CompactReport(len(nums), len(after_nums) - len(old), before, bytes_after, dropped)
        return report, old

    def _append_fresh(self, c: sqlite3.Connection, items: list[tuple[str, bytes]], first: int) -> None:
        pack, i = first, 0
        while i < len(items):
            path = self.path(pack)
            rows, pos = [], 0
            with open(path, "wb") as f:
                while i < len(items) and (pos == 0 or pos + len(items[i][1]) <= self.max_pack_bytes):
                    sha, data = items[i]
                    f.write(data)
                    rows.append((sha, pack, pos, len(data), zlib.crc32(data)))
                    pos += len(data)
                    i += 1
                f.flush()
                os.fsync(f.fileno())
            c.executemany("INSERT INTO pack_entries (sha, pack, offset, length, crc) VALUES (?, ?, ?, ?, ?)", rows)
            pack += 1
        _fsync_dir(self.root)

    def drop_maps(self, paths: list[Path]) -> None:
        with self._lock:
            for p in paths:
                m = _PACK_RE.match(p.name)
                if m:
                    mm = self._maps.pop(int(m.group(1)), None)
                    if mm is not None:
                        with contextlib.suppress(BufferError):
                            mm.close()
                    fd = self._fds.pop(int(m.group(1)), None)
                    if fd is not None:
                        with contextlib.suppress(OSError):
                            os.close(fd)
