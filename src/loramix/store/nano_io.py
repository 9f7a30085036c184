"""Nano adapter blobs and the library's nano bases (kept under ``meta/nano``).

A nano blob is a safetensors file with one tensor ``cores`` (L, r, r) and one metadata key holding
``{"rank", "basis", "layers"}``, where ``layers`` are indices into the basis's sorted layer paths: about
``L * r * r * itemsize`` bytes plus a few hundred, small enough to live in pack files by the million.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from loramix.errors import InvalidAdapter, LibraryError

if TYPE_CHECKING:
    from loramix.nano import NanoBasis, NanoWeights

NANO_META_KEY = "loramix_nano"
BASIS_SUFFIX = ".safetensors"


def nano_blob_bytes(w: NanoWeights, basis: NanoBasis) -> bytes:
    """Canonical safetensors bytes of a nano adapter (deterministic)."""
    import torch
    from safetensors.torch import save

    order = sorted(basis.layers)
    pos = {p: i for i, p in enumerate(order)}
    paths = sorted(w.cores, key=lambda p: pos[p])
    cores = torch.stack([w.cores[p].detach().cpu() for p in paths]).contiguous()  # (L, r, r)
    meta = {"rank": w.rank, "basis": w.basis_id, "layers": [pos[p] for p in paths], "extra": w.extra_config}
    return save({"cores": cores}, metadata={NANO_META_KEY: json.dumps(meta, sort_keys=True)})


def is_nano_blob(data: bytes) -> bool:
    return NANO_META_KEY.encode() in data[:4096]


def read_nano_bytes(data: bytes, basis_of: object) -> NanoWeights:
    """Decode a nano blob; ``basis_of(basis_id) -> NanoBasis`` resolves the layer indices."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from loramix.nano import NanoWeights

    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        meta = json.loads(header["__metadata__"][NANO_META_KEY])
        cores = load(data)["cores"]  # (L, r, r)
    except (SafetensorError, KeyError, ValueError, TypeError) as e:
        raise LibraryError(f"a nano blob is unreadable ({e}); expected one written by loramix") from e
    basis = basis_of(meta["basis"])  # type: ignore[operator]
    order = sorted(basis.layers)
    paths = [order[i] for i in meta["layers"]]
    return NanoWeights(rank=int(meta["rank"]), basis_id=str(meta["basis"]),
                       cores={p: cores[i] for i, p in enumerate(paths)}, extra_config=dict(meta.get("extra") or {}))


class BasisStore:
    """Nano bases by id, as safetensors files in one folder, cached in memory once read."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._cache: dict[str, NanoBasis] = {}
        self._lock = threading.Lock()

    def path(self, basis_id: str) -> Path:
        if not basis_id or not all(c.isalnum() or c in "-_" for c in basis_id):
            raise LibraryError(f"{basis_id!r} is not a nano basis id; expected '<base fingerprint>-r<rank>'")
        return self.folder / f"{basis_id}{BASIS_SUFFIX}"

    def put(self, basis: NanoBasis) -> str:
        """Store a basis (atomically; a no-op when present) and return its id."""
        from safetensors.torch import save_file

        dest = self.path(basis.id)
        if not dest.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            save_file(basis.state_dict(), str(tmp), metadata={"rank": str(basis.rank), "base_id": basis.base_id})
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        with self._lock:
            self._cache[basis.id] = basis
        return basis.id

    def ids(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.name[: -len(BASIS_SUFFIX)] for p in self.folder.glob(f"*{BASIS_SUFFIX}"))

    def get(self, basis_id: str) -> NanoBasis:
        with self._lock:
            hit = self._cache.get(basis_id)
        if hit is not None:
            return hit
        from safetensors import safe_open
        from safetensors.torch import load_file

        from loramix.nano import NanoBasis

        p = self.path(basis_id)
        if not p.is_file():
            raise InvalidAdapter(f"nano basis {basis_id!r} is not in this library ({p} is missing); expected a basis "
                                 "stored with Library.put_basis (training a nano adapter stores it)")
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        basis = NanoBasis.from_state_dict(load_file(str(p)), rank=int(meta["rank"]), base_id=meta["base_id"])
        with self._lock:
            self._cache[basis_id] = basis
        return basis
