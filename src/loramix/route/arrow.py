"""Arrow: zero-shot routing from the adapters' own weights (Ostapenko et al., 2024).

For every adapter and adapted layer, the *prototype* is the top right singular vector ``v`` (n_in)
of the layer's update ``scale * B @ A``; it is the input direction the update amplifies most. It is
computed from the factors alone (QR of ``B`` and ``A.T``, then an SVD of the small core), never from
the dense matrix, and cached on disk under ``lib.meta_path("arrow")`` as one safetensors file per
adapter, named by adapter id and blob hash (so new adapters are computed incrementally and a changed
blob is never served stale).

Scoring a query: the base model runs once on the query's tokens with forward pre-hooks on the
adapted linear layers, capturing their inputs ``h_t`` (T, n_in). As in Arrow, each token is scored
on its own, ``|cos(h_t, v)|`` (the sign of a singular vector is arbitrary), and the query's score for
an adapter is the mean over its adapted layers and over the query's tokens; it lies in [0, 1].
(Arrow routes per token; loramix mixes per batch row, so the per-token scores are averaged.)

The strategy needs the base model: the engine hands it over with :func:`attach_base`, which keeps
the getter on the router object itself.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loramix.config import RouteConfig
from loramix.errors import LoramixError, RoutingError
from loramix.lora import LoraWeights
from loramix.route.router import Candidates, Router, register_strategy

CACHE_VERSION = "1"
MAX_TOKENS = 256  # longer queries are cut to their first MAX_TOKENS tokens

Prototypes = dict[str, torch.Tensor]  # module path -> unit vector (n_in,)


# --- prototypes --------------------------------------------------------------------------------
def top_right_singular(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of ``B @ A`` from the factors: A (r, n_in), B (n_out, r) -> (n_in,).

    ``B = Qb Rb`` and ``A.T = Qa Ra`` give ``B @ A = Qb (Rb Ra.T) Qa.T``; with ``Rb Ra.T = U S Vh`` the
    right singular vectors are ``Qa Vh.T``. Positive scales don't change it; its sign is arbitrary.
    """
    qb, rb = torch.linalg.qr(b.double())  # (n_out, r'), (r', r)
    qa, ra = torch.linalg.qr(a.double().T)  # (n_in, r''), (r'', r)
    core = rb @ ra.T  # (r', r'')
    _, _, vh = torch.linalg.svd(core)  # vh: (r'', r'')
    v = qa @ vh[0]  # (n_in,)
    return (v / v.norm().clamp_min(1e-12)).float()


def compute_prototypes(weights: LoraWeights) -> Prototypes:
    """The prototype of every layer of one adapter."""
    return {path: top_right_singular(a, b) for path, (a, b) in weights.layers.items()}


class PrototypeCache:
    """Prototypes per adapter: in memory, then on disk (``lib.meta_path("arrow")``), else computed.

    ``computed`` and ``loaded`` count adapters computed from weights and read from disk.
    """

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        self.folder: Path = lib.meta_path("arrow")
        self._mem: dict[str, tuple[str, Prototypes]] = {}  # id -> (blob, prototypes)
        self._lock = threading.Lock()
        self.computed = 0
        self.loaded = 0

    def _file(self, adapter_id: str, blob: str) -> Path:
        return self.folder / f"{adapter_id}-{blob[:16]}.safetensors"

    def get(self, adapter_id: str, blob: str | None = None) -> Prototypes:
        """The prototypes of one adapter (``blob``: its hash if known, saving a registry read)."""
        from safetensors.torch import load_file, save_file

        blob = blob or self.lib.get(adapter_id).blob
        with self._lock:
            hit = self._mem.get(adapter_id)
            if hit is not None and hit[0] == blob:
                return hit[1]
            path = self._file(adapter_id, blob)
            protos: Prototypes | None = None
            if path.is_file():
                with contextlib.suppress(Exception):  # a damaged file is recomputed
                    protos = load_file(str(path))
                    self.loaded += 1
            if protos is None:
                protos = compute_prototypes(self.lib.load(adapter_id))
                self.computed += 1
                for old in self.folder.glob(f"{adapter_id}-*.safetensors"):
                    old.unlink(missing_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file({k: v.contiguous() for k, v in protos.items()}, str(tmp),
                          metadata={"adapter_id": adapter_id, "blob": blob, "version": CACHE_VERSION})
                tmp.replace(path)
            self._mem[adapter_id] = (blob, protos)
            return protos

    def get_many(self, ids: Sequence[str], blobs: dict[str, str] | None = None) -> dict[str, Prototypes]:
        blobs = blobs or {}
        return {a: self.get(a, blobs.get(a)) for a in ids}

    def prune(self, keep: set[str]) -> int:
        """Delete cached files of adapters not in ``keep``; returns how many."""
        n = 0
        with self._lock:
            for f in self.folder.glob("*.safetensors"):
                if f.name.split("-", 1)[0] not in keep:
                    f.unlink(missing_ok=True)
                    n += 1
            for a in [a for a in self._mem if a not in keep]:
                del self._mem[a]
        return n


# --- hidden states -----------------------------------------------------------------------------
class _Captured(Exception):
    """Raised by the last capture hook to end the forward pass early."""


@torch.inference_mode()
def layer_inputs(model: nn.Module, tokenizer: Any, queries: Sequence[str], paths: Sequence[str],
                 max_tokens: int = MAX_TOKENS) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Inputs of the linear layers at ``paths`` for each query: ({path: (B, T, n_in)}, mask (B, T)).

    Runs the model as it is (no mixture must be active) and stops once every input is captured;
    padded positions have mask 0.
    """
    enc = tokenizer(list(queries), return_tensors="pt", padding=True, truncation=True, max_length=max_tokens)
    ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, T), (B, T)
    if ids.shape[1] == 0:
        raise RoutingError("the query has no tokens; arrow routing needs some text")
    captured: dict[str, torch.Tensor] = {}
    handles = []
    modules = dict(model.named_modules())
    wanted = [p for p in dict.fromkeys(paths) if p in modules]

    def hook(_m: nn.Module, args: tuple[Any, ...], _p: str) -> None:
        captured[_p] = args[0].detach().float()  # (B, T, n_in)
        if len(captured) == len(wanted):
            raise _Captured  # later layers and the LM head are not needed

    for path in wanted:
        handles.append(modules[path].register_forward_pre_hook(lambda m, a, _p=path: hook(m, a, _p)))
    try:
        device = next(model.parameters()).device
        model(input_ids=ids.to(device), attention_mask=mask.to(device))
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    return {p: x.cpu() for p, x in captured.items()}, mask.float()


def arrow_scores(inputs: dict[str, torch.Tensor], mask: torch.Tensor,
                 protos: dict[str, Prototypes]) -> torch.Tensor:
    """Mean over layers and tokens of ``|cos(h_t, v)|``: (B, n_adapters), in the order of ``protos``."""
    ids = list(protos)
    n_q = mask.shape[0]
    total = torch.zeros(n_q, len(ids))  # (B, N)
    count = torch.zeros(len(ids))  # (N,)
    tokens = mask.sum(1).clamp_min(1.0)  # (B,)
    by_layer: dict[str, list[int]] = {}
    for j, a in enumerate(ids):
        for path in protos[a]:
            if path in inputs:
                by_layer.setdefault(path, []).append(j)
    for path, cols in by_layer.items():
        h = torch.nn.functional.normalize(inputs[path], dim=-1)  # (B, T, n_in)
        v = torch.stack([protos[ids[j]][path] for j in cols]).to(h.dtype)  # (n, n_in)
        cos = (h @ v.T).abs() * mask[..., None]  # (B, T, n)
        total[:, cols] += cos.sum(1) / tokens[:, None]  # (B, n)
        count[cols] += 1
    return total / count.clamp_min(1.0)  # (B, N)


# --- the engine hand-over -----------------------------------------------------------------------
BaseGetter = Callable[[], Any]  # returns a loramix.base.BaseModel


@dataclass
class _Attached:
    get_base: BaseGetter
    lock: Any = None  # held around the forward pass (the engine's lock: no mixture is set under it)
    cache: PrototypeCache | None = None


_ATTR = "_loramix_arrow"  # kept on the router itself: it dies with the router (a registry would pin engines)


def _state(router: Router) -> _Attached | None:
    return getattr(router, _ATTR, None)


def attach_base(router: Router, get_base: BaseGetter, lock: Any = None) -> None:
    """Give ``router`` the base model (loaded lazily by ``get_base``) that the arrow strategy runs.

    ``lock``: a lock held during arrow's forward pass, e.g. the one serialising the mixer's passes.
    """
    old = _state(router)
    setattr(router, _ATTR, _Attached(get_base, lock, old.cache if old else None))


def base_getter(router: Router) -> BaseGetter | None:
    """The base-model getter attached to ``router``, if any."""
    state = _state(router)
    return state.get_base if state else None


def prototypes(router: Router) -> PrototypeCache:
    """The prototype cache of a router (made on first use)."""
    state = _state(router)
    if state is None:
        raise RoutingError(_NO_BASE)
    if state.cache is None:
        state.cache = PrototypeCache(router.lib)
    return state.cache


_NO_BASE = ("the 'arrow' strategy routes with the base model's hidden states, but this router has no base "
            "model; use it through loramix.app.Loramix, or call loramix.route.arrow.attach_base(router, get_base)")


@contextlib.contextmanager
def _held(lock: Any) -> Iterator[None]:
    if lock is None:
        yield
    else:
        with lock:
            yield


def arrow(router: Router, queries: list[str], qvecs: np.ndarray, cfg: RouteConfig,
          allowed: set[str] | None) -> list[Candidates]:
    """Rank adapters by how much the query's hidden states align with their prototypes."""
    state = _state(router)
    if state is None:
        raise RoutingError(_NO_BASE)
    pool = sorted(allowed) if allowed is not None else router.keyed_ids()
    if not pool:
        return [[] for _ in queries]
    cache = prototypes(router)
    blobs = {}
    for a in pool:
        with contextlib.suppress(KeyError):
            blobs[a] = router.record(a).blob
    protos = cache.get_many(pool, blobs)
    paths = sorted({p for pr in protos.values() for p in pr})
    try:
        base = state.get_base()
    except LoramixError as e:
        raise RoutingError(f"the 'arrow' strategy needs the base model, which could not be loaded: {e}") from e
    with _held(state.lock):
        inputs, mask = layer_inputs(base.model, base.tokenizer, queries, paths)
    scores = arrow_scores(inputs, mask, protos)  # (B, N)
    out: list[Candidates] = []
    for row in scores.tolist():
        ranked = sorted(zip(pool, row, strict=True), key=lambda kv: (-kv[1], kv[0]))
        out.append([(a, float(s)) for a, s in ranked])
    return out


register_strategy("arrow", arrow, replace=True)
