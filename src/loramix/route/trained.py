"""The learned routers: strategy "trained" (perplexity-distilled head) and "supervised" (a classifier).

Both live in ``lib.meta_path("router")``, written by ``loramix train router`` (see
:mod:`loramix.train.router`) as safetensors whose metadata holds the JSON config (never pickle):

* ``head.safetensors``: ``proj_weight`` (d, d), ``proj_bias`` (d,), ``keys`` (n, d) (the adapters'
  stored keys at training time), ``key_delta`` (n, d), ``log_temperature`` (); metadata
  ``config`` with ``adapter_ids`` (the n rows). ``head.json`` repeats the config for people.
  A query ``q`` (unit MiniLM embedding) maps to ``q' = normalize(q + W q + b)``; an adapter's key to
  ``k' = normalize(key + delta)`` (adapters trained after the head: their stored key, zero delta).
  Score = cosine ``<q', k'>``; the head's training logits were that divided by its learned temperature.
* ``supervised.safetensors``: ``weight`` (C, d), ``bias`` (C,); metadata ``config`` with ``adapter_ids``.
  Score = the classifier's softmax probability among the allowed adapters it knows.

Routing with the head is exact, yet uses faiss for the bulk: the m adapters with a learned key are
scored directly (an (m, d) product); the others' effective key is their stored key, so a faiss search
of the stored-key index with ``q'`` ranks them exactly. Fetching ``k + m`` from faiss guarantees the
top-k untrained adapters are among the hits. Heads are cached per file mtime.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loramix.config import RouteConfig
from loramix.errors import RoutingError
from loramix.route.router import Candidates, Router, register_strategy

ROUTER_DIR = "router"
HEAD_FILE = "head.safetensors"
SUPERVISED_FILE = "supervised.safetensors"
ENCODER_DIR = "encoder"
FORMAT = 1
NOT_TRAINED = "no trained router in this library; run `loramix train router --data SOURCE` first"
NOT_TRAINED_SUPERVISED = (
    "no supervised router in this library; run `loramix train router --labels` (labels = adapter names) first"
)


# --- the trainable module (used by loramix.train.router) --------------------------------------
class RouterHead(nn.Module):
    """Projection head over frozen query embeddings plus learnable per-adapter key deltas."""

    keys: torch.Tensor
    log_temperature: torch.Tensor

    def __init__(self, keys: torch.Tensor, temperature: float = 0.05, learn_temperature: bool = True) -> None:
        super().__init__()
        n, d = keys.shape
        self.register_buffer("keys", keys.float().clone())  # (n, d) stored keys
        self.proj = nn.Linear(d, d)
        nn.init.zeros_(self.proj.weight)  # starts as the untrained router: q' = q
        nn.init.zeros_(self.proj.bias)
        self.key_delta = nn.Parameter(torch.zeros(n, d))  # (n, d)
        log_t = torch.tensor(math.log(temperature))
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.clamp(math.log(0.005), math.log(5.0)).exp()

    def project(self, q: torch.Tensor) -> torch.Tensor:
        return F.normalize(q + self.proj(q), dim=-1)  # (B, d)

    def effective_keys(self) -> torch.Tensor:
        return F.normalize(self.keys + self.key_delta, dim=-1)  # (n, d)

    def forward(self, q: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Router logits ``(B, K)`` of queries ``q`` (B, d) over candidate rows ``cand`` (B, K)."""
        qp = self.project(q)  # (B, d)
        k = self.effective_keys()[cand]  # (B, K, d)
        return torch.einsum("bd,bkd->bk", qp, k) / self.temperature  # (B, K)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"proj_weight": self.proj.weight.detach(), "proj_bias": self.proj.bias.detach(),
                "keys": self.keys.detach(), "key_delta": self.key_delta.detach(),
                "log_temperature": self.log_temperature.detach().reshape(())}


# --- files ------------------------------------------------------------------------------------
def router_dir(lib: Any) -> Path:
    return Path(lib.meta_path(ROUTER_DIR))


def _write(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"config": json.dumps(config)})
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(config, indent=2, default=str))


def save_head(lib: Any, head: RouterHead, adapter_ids: list[str], config: dict[str, Any]) -> Path:
    """Write ``head.safetensors`` (+ ``head.json``); ``adapter_ids`` name the rows of the key tables."""
    if len(adapter_ids) != head.keys.shape[0]:
        raise ValueError("adapter_ids must name every row of the head's key table")
    path = router_dir(lib) / HEAD_FILE
    _write(path, head.tensors(), {**config, "format": FORMAT, "adapter_ids": list(adapter_ids),
                                  "dim": int(head.keys.shape[1])})
    return path


def save_supervised(lib: Any, linear: nn.Linear, adapter_ids: list[str], config: dict[str, Any]) -> Path:
    """Write ``supervised.safetensors`` (+ ``supervised.json``)."""
    path = router_dir(lib) / SUPERVISED_FILE
    _write(path, {"weight": linear.weight, "bias": linear.bias},
           {**config, "format": FORMAT, "adapter_ids": list(adapter_ids), "dim": int(linear.in_features)})
    return path


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        config = json.loads((f.metadata() or {}).get("config", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)
    if config.get("format") != FORMAT or "adapter_ids" not in config:
        raise RoutingError(f"{path} is not a loramix router file of format {FORMAT}; retrain with `loramix train router`")
    return tensors, config


@dataclass
class TrainedHead:
    """A loaded head, ready for numpy inference."""

    adapter_ids: list[str]
    proj_weight: np.ndarray  # (d, d)
    proj_bias: np.ndarray  # (d,)
    keys: np.ndarray  # (n, d) effective keys, unit rows
    temperature: float
    config: dict[str, Any]
    encoder: Any = None  # the fine-tuned SentenceTransformer, when one was trained
    row: dict[str, int] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.proj_weight.shape[0])

    def project(self, qvecs: np.ndarray) -> np.ndarray:
        q = np.asarray(qvecs, dtype=np.float32)  # (n, d)
        q = q + q @ self.proj_weight.T + self.proj_bias  # (n, d)
        return (q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def encode(self, queries: list[str]) -> np.ndarray:
        return np.asarray(self.encoder.encode(queries, convert_to_numpy=True, normalize_embeddings=True,
                                              show_progress_bar=False), dtype=np.float32)


@dataclass
class SupervisedHead:
    adapter_ids: list[str]
    weight: np.ndarray  # (C, d)
    bias: np.ndarray  # (C,)
    config: dict[str, Any]


_CACHE: dict[str, tuple[tuple[int, int], Any]] = {}
_LOCK = threading.Lock()


def _cached(path: Path, build: Any) -> Any:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    sig = (st.st_mtime_ns, st.st_size)
    with _LOCK:
        hit = _CACHE.get(str(path))
        if hit is not None and hit[0] == sig:
            return hit[1]
        obj = build(path)
        _CACHE[str(path)] = (sig, obj)
        return obj


def _build_head(path: Path) -> TrainedHead:
    t, config = _read(path)
    keys = t["keys"] + t["key_delta"]  # (n, d)
    keys = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
    ids = [str(a) for a in config["adapter_ids"]]
    head = TrainedHead(ids, t["proj_weight"].astype(np.float32), t["proj_bias"].astype(np.float32),
                       keys.astype(np.float32), float(np.exp(float(t["log_temperature"]))), config,
                       row={a: i for i, a in enumerate(ids)})
    if config.get("finetuned_encoder"):
        from loramix.config import offline_env

        offline_env()
        from sentence_transformers import SentenceTransformer

        enc_dir = path.parent / ENCODER_DIR
        if not enc_dir.is_dir():
            raise RoutingError(f"the trained router uses a fine-tuned encoder but {enc_dir} is missing; retrain it")
        head.encoder = SentenceTransformer(str(enc_dir), device="cpu", local_files_only=True)
    return head


def _build_supervised(path: Path) -> SupervisedHead:
    t, config = _read(path)
    return SupervisedHead([str(a) for a in config["adapter_ids"]], t["weight"].astype(np.float32),
                          t["bias"].astype(np.float32), config)


def load_head(lib: Any) -> TrainedHead | None:
    """The library's trained head (None when none was trained), re-read when the file changes."""
    return _cached(router_dir(lib) / HEAD_FILE, _build_head)


def load_supervised(lib: Any) -> SupervisedHead | None:
    return _cached(router_dir(lib) / SUPERVISED_FILE, _build_supervised)


def head_beats_keys(lib: Any) -> bool:
    """Whether the library's trained head holds a validation verdict that it routes better than the keys.

    :func:`loramix.train.router.train_router` stores ``validation.beats_keys`` with the head: True
    only when, on its held-out pairs, the head's routed loss was lower than the untrained keys'. A
    head without a verdict (older files) or an unreadable one does not count.
    """
    try:
        head = load_head(lib)
    except (RoutingError, OSError, ValueError):
        return False
    return bool(head is not None and (head.config.get("validation") or {}).get("beats_keys") is True)


def default_rerank(lib: Any) -> str:
    """The CLI's and server's default ``RouteConfig.rerank``: "none" where the library's trained head stores a
    held-out verdict that the likelihood re-ranking hurts (``validation.rerank.hurts``), else "auto"."""
    try:
        head = load_head(lib)
    except (RoutingError, OSError, ValueError):
        return RouteConfig().rerank
    verdict = ((head.config.get("validation") or {}).get("rerank") or {}) if head is not None else {}
    return "none" if verdict.get("hurts") is True else RouteConfig().rerank


def default_strategy(lib: Any) -> str:
    """The CLI's default strategy: "trained" only where the head's own validation says it beats the keys,
    else "semantic" (untrained keys)."""
    return "trained" if head_beats_keys(lib) else RouteConfig().strategy


# --- strategies -------------------------------------------------------------------------------
def _check_dim(dim: int, qvecs: np.ndarray, what: str) -> None:
    if qvecs.shape[1] != dim:
        raise RoutingError(f"the {what} router was trained on {dim}-dim embeddings but the encoder gives "
                           f"{qvecs.shape[1]}; retrain it with `loramix train router`")


def trained(router: Router, queries: list[str], qvecs: np.ndarray, cfg: RouteConfig,
            allowed: set[str] | None) -> list[Candidates]:
    """Cosine of the head-projected query with learned keys (stored keys for adapters added later)."""
    head = load_head(router.lib)
    if head is None:
        raise RoutingError(NOT_TRAINED)
    if head.encoder is not None:
        qvecs = head.encode(queries)
    _check_dim(head.dim, qvecs, "trained")
    q = head.project(qvecs)  # (n, d)
    mix = float(head.config.get("mix", 1.0))
    if mix < 1.0:
        return _interpolated(router, head, np.asarray(qvecs, np.float32), q, mix, cfg, allowed)
    rows = [i for i, a in enumerate(head.adapter_ids) if a in router.index and (allowed is None or a in allowed)]
    tab_ids = [head.adapter_ids[i] for i in rows]
    exact = q @ head.keys[rows].T if rows else np.zeros((len(q), 0), np.float32)  # (n, m)
    dense = router.dense_search(q, cfg.k + len(rows), allowed)
    learned = set(tab_ids)
    out: list[Candidates] = []
    for i, hits in enumerate(dense):
        cands = [(a, s) for a, s in hits if a not in learned]
        cands += list(zip(tab_ids, exact[i].astype(float).tolist(), strict=True))
        cands.sort(key=lambda kv: -kv[1])
        out.append(cands[: cfg.k])
    return out


def _interpolated(router: Router, head: TrainedHead, qvecs: np.ndarray, q: np.ndarray, mix: float, cfg: RouteConfig,
                  allowed: set[str] | None) -> list[Candidates]:
    """``mix * <q', k'> + (1 - mix) * <q, key>`` over every allowed keyed adapter (exact, no faiss)."""
    ids = [a for a in router.index.ids() if allowed is None or a in allowed]
    if not ids:
        return [[] for _ in range(len(q))]
    stored = router.index.vectors(ids)  # (m, d) stored keys
    learned = stored.copy()
    for j, a in enumerate(ids):
        if a in head.row:
            learned[j] = head.keys[head.row[a]]
    scores = mix * (q @ learned.T) + (1.0 - mix) * (qvecs @ stored.T)  # (n, m)
    out: list[Candidates] = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[: cfg.k]
        out.append([(ids[j], float(row[j])) for j in order])
    return out


def supervised(router: Router, queries: list[str], qvecs: np.ndarray, cfg: RouteConfig,
               allowed: set[str] | None) -> list[Candidates]:
    """Softmax probability of the supervised classifier, over the allowed adapters it was trained on."""
    head = load_supervised(router.lib)
    if head is None:
        raise RoutingError(NOT_TRAINED_SUPERVISED)
    _check_dim(head.weight.shape[1], qvecs, "supervised")
    rows = [i for i, a in enumerate(head.adapter_ids) if a in router.index and (allowed is None or a in allowed)]
    if not rows:
        return [[] for _ in queries]
    logits = np.asarray(qvecs, np.float32) @ head.weight[rows].T + head.bias[rows]  # (n, m)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)  # (n, m)
    ids = [head.adapter_ids[i] for i in rows]
    out: list[Candidates] = []
    for row in p:
        order = np.argsort(-row)[: cfg.k]
        out.append([(ids[j], float(row[j])) for j in order])
    return out


register_strategy("trained", trained, replace=True)
register_strategy("supervised", supervised, replace=True)
