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
from typing import TYPE_CHECKING, Any

from loramix.errors import InvalidAdapter, LibraryError

if TYPE_CHECKING:
    from loramix.nano import NanoBasis, NanoStack, NanoWeights

NANO_META_KEY = "loramix_nano"
BASIS_SUFFIX = ".safetensors"


_HEADERS: dict[tuple[str, tuple[int, ...], str], bytes] = {}  # (dtype, shape, metadata) -> safetensors header
_PARSED: dict[bytes, tuple[dict, str, tuple[int, ...], int]] = {}  # header -> (meta, dtype, shape, data offset)
_CACHE_MAX = 4096


def _header(dtype: Any, shape: tuple[int, ...], meta_json: str) -> bytes:
    """The safetensors header (length prefix + JSON) of a file holding one tensor ``cores``: it depends only on
    dtype, shape and metadata, so it is made once by safetensors itself and reused."""
    import torch
    from safetensors.torch import save

    key = (str(dtype), shape, meta_json)
    head = _HEADERS.get(key)
    if head is None:
        blob = save({"cores": torch.zeros(shape, dtype=dtype)}, metadata={NANO_META_KEY: meta_json})
        head = blob[:8 + int.from_bytes(blob[:8], "little")]
        if len(_HEADERS) >= _CACHE_MAX:
            _HEADERS.clear()
        _HEADERS[key] = head
    return head


_ORDERS: dict[str, tuple[list[str], dict[str, int]]] = {}  # basis id -> (sorted layer paths, their positions)


def _order(basis: NanoBasis) -> tuple[list[str], dict[str, int]]:
    hit = _ORDERS.get(basis.id)
    if hit is None or len(hit[0]) != len(basis.layers):
        order = sorted(basis.layers)
        hit = _ORDERS[basis.id] = (order, {p: i for i, p in enumerate(order)})
    return hit


def nano_blob_bytes(w: NanoWeights | NanoStack, basis: NanoBasis) -> bytes:
    """Canonical safetensors bytes of a nano adapter (deterministic; the same bytes safetensors.save writes)."""
    import torch

    pos = _order(basis)[1]
    st = w.stacked()
    paths, stack = st.paths, st.stack
    layers = [pos[p] for p in paths]
    if layers != sorted(layers):  # canonical order: the basis's sorted layer paths
        perm = sorted(range(len(paths)), key=lambda i: layers[i])
        layers, stack = [layers[i] for i in perm], stack[torch.tensor(perm)]
    cores = stack.detach().cpu().contiguous()  # (L, r, r)
    meta = json.dumps({"rank": w.rank, "basis": w.basis_id, "layers": layers, "extra": w.extra_config},
                      sort_keys=True)
    return _header(cores.dtype, tuple(cores.shape), meta) + cores.view(torch.uint8).numpy().tobytes()


def is_nano_blob(data: bytes) -> bool:
    return NANO_META_KEY.encode() in data[:4096]


def _parse(data: bytes) -> tuple[dict, str, tuple[int, ...], int]:
    n = int.from_bytes(data[:8], "little")
    head = bytes(data[:8 + n])
    hit = _PARSED.get(head)
    if hit is None:
        header = json.loads(head[8:])
        meta = json.loads(header["__metadata__"][NANO_META_KEY])
        t = header["cores"]
        start, end = t["data_offsets"]
        if start != 0:
            raise ValueError("the cores do not start the data section")
        hit = (meta, str(t["dtype"]), tuple(int(x) for x in t["shape"]), 8 + n)
        if len(_PARSED) >= _CACHE_MAX:
            _PARSED.clear()
        _PARSED[head] = hit
    return hit


_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def read_nano_bytes(data: bytes, basis_of: object) -> NanoWeights:
    """Decode a nano blob; ``basis_of(basis_id) -> NanoBasis`` resolves the layer indices."""
    return read_nano_stack(data, basis_of).to_weights()


def read_nano_stack(data: bytes, basis_of: object) -> NanoStack:
    """Decode a nano blob into its stacked form (no per-layer tensors)."""
    import torch

    from loramix.nano import NanoStack

    try:
        meta, dtype, shape, off = _parse(data)
        dt = getattr(torch, _DTYPES[dtype])
        count = 1
        for s in shape:
            count *= s
        if len(data) - off != count * dt.itemsize:
            raise ValueError(f"{len(data) - off} data bytes for a {dtype} tensor of shape {shape}")
        cores = torch.frombuffer(bytearray(data[off:]), dtype=dt).reshape(shape)  # (L, r, r)
    except (KeyError, ValueError, TypeError) as e:
        raise LibraryError(f"a nano blob is unreadable ({e}); expected one written by loramix") from e
    basis = basis_of(meta["basis"])  # type: ignore[operator]
    order = _order(basis)[0]
    paths = [order[i] for i in meta["layers"]]
    return NanoStack(int(meta["rank"]), str(meta["basis"]), tuple(paths), cores, dict(meta.get("extra") or {}))


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
