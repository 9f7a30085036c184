"""Content-addressed blob store: ``<root>/<sha[:2]>/<sha>.safetensors``, temp files in ``<root>/tmp``.

A blob is written to a temp file, fsynced, then renamed into place, so a reader never sees half a
file. Placing and deleting are meant to run while the registry holds its SQLite write lock, which is
what keeps rows and files consistent across threads and processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from loramix.errors import LibraryError

SUFFIX = ".safetensors"
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_sha(s: str) -> bool:
    """True for a blob id: 64 lowercase hex digits."""
    return bool(_SHA_RE.fullmatch(s))


class BlobStore:
    """Files named by the sha256 of their bytes."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        if not _SHA_RE.fullmatch(sha):
            raise LibraryError(f"{sha!r} is not a blob id; expected 64 lowercase hex digits (sha256)")
        return self.root / sha[:2] / f"{sha}{SUFFIX}"

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def write_temp(self, data: bytes) -> tuple[Path, str]:
        """Write ``data`` to a fsynced temp file; return (temp path, sha256 hex)."""
        sha = hashlib.sha256(data).hexdigest()
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix=f"{sha[:16]}-", suffix=".part")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, sha

    def place(self, tmp: Path, sha: str) -> bool:
        """Move a temp file to its blob path. False (and the temp file removed) if the blob already exists."""
        dest = self.path(sha)
        if dest.is_file():
            tmp.unlink(missing_ok=True)
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        return True

    def put(self, data: bytes) -> tuple[str, bool]:
        """Store ``data``; return (sha, whether a new file was written)."""
        tmp, sha = self.write_temp(data)
        try:
            return sha, self.place(tmp, sha)
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, sha: str) -> bool:
        p = self.path(sha)
        if not p.exists():
            return False
        p.unlink()
        return True

    def trash(self, sha: str) -> Path | None:
        """Move a blob aside (into tmp) so a failed transaction can :meth:`restore` it."""
        p = self.path(sha)
        if not p.exists():
            return None
        dest = self.tmp / f"{sha}.trash-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(p, dest)
        return dest

    def restore(self, trashed: Path, sha: str) -> None:
        dest = self.path(sha)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(trashed, dest)

    def iter_shas(self) -> Iterator[str]:
        """The sha of every blob on disk (walks the folder: for gc, never at open)."""
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir() and len(sub.name) == 2:
                for f in sorted(sub.iterdir()):
                    stem = f.name[: -len(SUFFIX)] if f.name.endswith(SUFFIX) else ""
                    if _SHA_RE.fullmatch(stem) and stem[:2] == sub.name:
                        yield stem

    def stale_temps(self, older_than: float) -> list[Path]:
        """Temp and trash files not modified for ``older_than`` seconds."""
        now = time.time()
        out = []
        for f in self.tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if f.is_file() and now - f.stat().st_mtime >= older_than:
                    out.append(f)
        return out
