"""Synthetic nano bases and adapters for scale tests (no model needed)."""

from __future__ import annotations

import numpy as np
import torch

from loramix.nano import NanoBasis, NanoWeights

SHAPES = {f"model.layers.{i}.self_attn.{m}": (64, 64) for i in range(2) for m in ("q_proj", "v_proj")}


def synthetic_basis(rank: int = 4, seed: int = 0) -> NanoBasis:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for path, (n_in, n_out) in SHAPES.items():
        u, _ = torch.linalg.qr(torch.randn(n_out, rank, generator=g))  # (n_out, r)
        v, _ = torch.linalg.qr(torch.randn(n_in, rank, generator=g))  # (n_in, r)
        layers[path] = (u.contiguous(), v.T.contiguous())
    return NanoBasis(rank=rank, base_id="synthetic0000000", layers=layers)


def nano(basis: NanoBasis, seed: int) -> NanoWeights:
    g = torch.Generator().manual_seed(seed)
    return NanoWeights(rank=basis.rank, basis_id=basis.id,
                       cores={p: torch.randn(basis.rank, basis.rank, generator=g) for p in basis.layers})


def unit_keys(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)
