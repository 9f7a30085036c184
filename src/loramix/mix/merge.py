"""Merge several LoRA adapters into one, with the semantics of PEFT's ``add_weighted_adapter``.

``merge(adapters, weights, method)`` returns an ordinary :class:`LoraWeights` whose per-layer delta
``scale * B @ A`` equals the delta of the adapter PEFT builds with
``PeftModel.add_weighted_adapter(names, weights, name, combination_type=method, ...)`` (PEFT 0.21).
Like PEFT, the result has ``alpha == rank`` so ``scale == 1``. The methods, per layer:

- ``cat``: stack the factors, ``A = [w_i s_i A_i]``, ``B = [B_i]``; rank = sum of ranks. The exact weighted
  sum of deltas ``sum_i w_i s_i B_i A_i`` (``s_i`` = adapter scale).
- ``linear`` / ``ties`` / ``dare_linear`` / ``dare_ties`` / ``magnitude_prune``: combine the A factors and the
  B factors *separately* (equal ranks needed) with weights ``+-sqrt(|w_i s_i|)`` (the sign goes on A). For
  ``linear`` the delta is ``(sum_i sqrt|w_i s_i| B_i) @ (sum_i sign_i sqrt|w_i s_i| A_i)``: it has cross terms,
  so it is only an approximation of the weighted sum; prefer ``cat`` or ``svd`` when that matters.
- ``svd`` / ``ties_svd`` / ``dare_linear_svd`` / ``dare_ties_svd`` / ``magnitude_prune_svd``: combine the dense
  deltas ``s_i B_i A_i`` (task arithmetic / TIES / DARE / magnitude pruning), then truncate with an SVD to
  ``svd_rank`` (default: the largest input rank); ``svd_clamp`` clamps the factors at that quantile.

As in PEFT, a single adapter is always merged with ``linear``, and a layer only some adapters adapt is
merged from those adapters alone. DARE's random drops come from a generator seeded with ``seed``, drawn
layer by layer in ``layer_order`` (A factors before B factors, adapters in order) exactly as PEFT draws
them, so ``seed=s`` reproduces PEFT when its global RNG holds seed ``s`` at its first draw. ``seed=None``
uses torch's global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from loramix.errors import MergeError
from loramix.lora import LoraWeights

MERGE_METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                 "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # need equal ranks
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
# config fields of the first adapter that no longer describe the merged one (PEFT resets the patterns)
_DROPPED_CONFIG = frozenset({"rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
                             "exclude_modules"})

Pair = tuple[torch.Tensor, torch.Tensor]  # (A (r, n_in), B (n_out, r))


class _Rng:
    """Per-device generators seeded with ``seed`` (``None``: torch's global RNG)."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._gens: dict[torch.device, torch.Generator] = {}

    def get(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if device not in self._gens:
            self._gens[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._gens[device]


def _prune(t: torch.Tensor, density: float, how: str, rng: _Rng) -> torch.Tensor:
    """PEFT's ``prune``: keep the top-``density`` magnitudes, or a random ``density`` share rescaled."""
    if density >= 1:
        return t
    if how == "magnitude":
        mask = torch.zeros_like(t).reshape(-1)  # (numel,)
        k = int(density * t.numel())
        top = torch.topk(t.abs().reshape(-1), k=k, largest=True).indices  # (k,)
        mask[top] = 1
        return t * mask.reshape(t.shape)
    mask = torch.bernoulli(torch.full_like(t, density), generator=rng.get(t.device))  # same shape as t
    return t * mask / density


def _combine(kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
             sign_method: str, rng: _Rng) -> torch.Tensor:
    """One of PEFT's ``merge_utils`` functions (task_arithmetic, ties, dare_*, magnitude_prune)."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [_prune(t, density, "magnitude", rng) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [_prune(t, density, "random", rng) for t in tensors]
    stacked = torch.stack(tensors, dim=0)  # (k, *shape)
    w = weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))  # (k, 1, ...)
    weighted = stacked * w  # (k, *shape)
    if kind not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)  # (*shape)
    sign = stacked.sign()  # (k, *shape); the sign election ignores the weights, as in PEFT
    magnitude = stacked.sum(dim=0) if sign_method == "total" else sign.sum(dim=0)  # (*shape)
    keep = sign == torch.where(magnitude >= 0, 1, -1)  # (k, *shape) bool
    return (weighted * keep).sum(dim=0) / torch.clamp(keep.sum(dim=0), min=1.0)  # (*shape)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _merge_factors(kind: str, present: list[tuple[LoraWeights, float]], path: str, density: float,
                   sign_method: str, rng: _Rng) -> Pair:
    """The linear family: A and B combined separately with weights +-sqrt(|w * scale|)."""
    a0 = present[0][0].layers[path][0]
    device, work = a0.device, _work_dtype(a0)
    scaled = [w * ad.scale for ad, w in present]
    w_a = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled]).to(device)  # (k,)
    w_b = torch.tensor([math.sqrt(abs(x)) for x in scaled]).to(device)  # (k,)
    a_list = [ad.layers[path][0].to(device, work) for ad, _ in present]  # k x (r, n_in)
    b_list = [ad.layers[path][1].to(device, work) for ad, _ in present]  # k x (n_out, r)
    a = _combine(kind, a_list, w_a, density, sign_method, rng)  # (r, n_in)
    b = _combine(kind, b_list, w_b, density, sign_method, rng)  # (n_out, r)
    return a.to(a0.dtype), b.to(a0.dtype)


def _merge_cat(present: list[tuple[LoraWeights, float]], path: str) -> Pair:
    """Concatenate ranks: A = [w_i s_i A_i] (sum r, n_in), B = [B_i] (n_out, sum r)."""
    a0 = present[0][0].layers[path][0]
    device, work = a0.device, _work_dtype(a0)
    a = torch.cat([ad.layers[path][0].to(device, work) * w * ad.scale for ad, w in present], dim=0)  # (R, n_in)
    b = torch.cat([ad.layers[path][1].to(device, work) for ad, _ in present], dim=1)  # (n_out, R)
    return a.to(a0.dtype), b.to(a0.dtype)


def _merge_svd(kind: str, present: list[tuple[LoraWeights, float]], path: str, rank: int, density: float,
               sign_method: str, clamp: float | None, rng: _Rng) -> Pair:
    """Combine the dense deltas, then keep the top ``rank`` singular directions (A = Vh, B = U S)."""
    a0 = present[0][0].layers[path][0]
    device, work = a0.device, _work_dtype(a0)
    deltas = [(b.to(device, work) @ a.to(device, work)) * ad.scale  # (n_out, n_in)
              for ad, _ in present for a, b in [ad.layers[path]]]
    weights = torch.tensor([w for _, w in present]).to(device)  # (k,)
    delta = _combine(kind, deltas, weights, density, sign_method, rng)  # (n_out, n_in)
    # full matrices only when clamping: the clamp quantile depends on the singular vectors' signs,
    # which then follow PEFT's (full) call exactly; the reduced SVD gives the same truncated delta
    u, s, vh = torch.linalg.svd(delta, full_matrices=clamp is not None)  # U (n_out, .), S (m,), Vh (., n_in)
    k = min(rank, s.numel())
    u = u[:, :k] @ torch.diag(s[:k])  # (n_out, k)
    vh = vh[:k, :]  # (k, n_in)
    if clamp is not None:
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)  # ()
        u = u.clamp(-hi, hi)  # (n_out, k)
        vh = vh.clamp(-hi, hi)  # (k, n_in)
    return vh.to(a0.dtype), u.to(a0.dtype)


def _pad(pair: Pair, rank: int) -> Pair:
    """Zero-pad a pair of lower rank up to ``rank`` (the delta is unchanged)."""
    a, b = pair
    missing = rank - a.shape[0]
    if missing <= 0:
        return a, b
    a = torch.cat([a, a.new_zeros(missing, a.shape[1])], dim=0)  # (rank, n_in)
    b = torch.cat([b, b.new_zeros(b.shape[0], missing)], dim=1)  # (n_out, rank)
    return a, b


def _ranks(adapters: list[LoraWeights]) -> list[int]:
    """Each adapter's rank, at least its largest layer rank (PEFT: max of r and the rank pattern)."""
    return [max([ad.rank] + [a.shape[0] for a, _ in ad.layers.values()]) for ad in adapters]


def _validate(adapters: list[LoraWeights], weights: list[float], method: str, density: float,
              majority_sign_method: str, svd_rank: int | None, svd_clamp: float | None) -> None:
    if not adapters:
        raise MergeError("merge needs at least one adapter, got none")
    if len(weights) != len(adapters):
        raise MergeError(f"got {len(adapters)} adapters but {len(weights)} weights; expected one weight per adapter")
    for i, w in enumerate(weights):
        if not math.isfinite(float(w)):
            raise MergeError(f"weight {i} is {w}; weights must be finite numbers")
    if method not in MERGE_METHODS:
        raise MergeError(f"unknown merge method {method!r}; expected one of: {', '.join(MERGE_METHODS)}")
    if not 0 < density <= 1:
        raise MergeError(f"density must be in (0, 1] (the fraction of values kept), got {density}")
    if majority_sign_method not in ("total", "frequency"):
        raise MergeError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise MergeError(f"svd_rank must be a positive integer or None (largest input rank), got {svd_rank!r}")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise MergeError(f"svd_clamp is a quantile and must be in [0, 1], got {svd_clamp}")
    for i, ad in enumerate(adapters):
        for path, (a, b) in ad.layers.items():
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise MergeError(f"adapter {i}, layer {path}: A {tuple(a.shape)} and B {tuple(b.shape)} are not a "
                                 "LoRA pair; expected A (r, n_in) and B (n_out, r)")


def _check_layer(path: str, present: list[tuple[int, LoraWeights]], same_rank: bool) -> None:
    """Adapters merged on one layer must adapt the same base shape (and rank, for the factor methods)."""
    i0, ad0 = present[0]
    a0, b0 = ad0.layers[path]
    for i, ad in present[1:]:
        a, b = ad.layers[path]
        if a.shape[1] != a0.shape[1] or b.shape[0] != b0.shape[0] or (same_rank and a.shape != a0.shape):
            raise MergeError(
                f"layer {path}: adapter {i} has A {tuple(a.shape)}, B {tuple(b.shape)} but adapter {i0} has "
                f"A {tuple(a0.shape)}, B {tuple(b0.shape)}; adapters merged on one layer must adapt the same "
                "base shape" + (" with the same rank" if same_rank else ""))


def _layer_paths(adapters: list[LoraWeights], layer_order: Sequence[str] | None) -> list[str]:
    """The union of adapted layers: in ``layer_order`` where listed, then in order of first appearance."""
    paths = list(dict.fromkeys(p for ad in adapters for p in ad.layers))
    if layer_order is None:
        return paths
    pos = {p: i for i, p in enumerate(layer_order)}
    return sorted(paths, key=lambda p: pos.get(p, len(pos)))  # stable: unlisted keep their order


def merge(adapters: list[LoraWeights], weights: list[float], method: str = "linear", *, density: float = 0.5,
          majority_sign_method: Literal["total", "frequency"] = "total", svd_rank: int | None = None,
          svd_clamp: float | None = None, seed: int | None = None,
          layer_order: Sequence[str] | None = None) -> LoraWeights:
    """Merge ``adapters`` with ``weights`` (negative allowed) by ``method``; see the module docstring.

    ``density`` is the kept fraction for ties/dare/magnitude methods, ``majority_sign_method`` the TIES sign
    election, ``svd_rank`` / ``svd_clamp`` shape the svd methods, ``seed`` drives DARE's drops and
    ``layer_order`` (e.g. ``[n for n, _ in model.named_modules()]``) the order layers draw them in.
    Raises :class:`MergeError` on bad arguments or adapters the method can't combine.
    """
    _validate(adapters, weights, method, density, majority_sign_method, svd_rank, svd_clamp)
    if len(adapters) == 1:
        method = "linear"  # as PEFT: one adapter is always merged linearly
    ranks = _ranks(adapters)
    if method in FACTOR_METHODS:
        if len(set(ranks)) > 1:
            i = next(j for j, r in enumerate(ranks) if r != ranks[0])
            accept = ", ".join(m for m in MERGE_METHODS if m not in FACTOR_METHODS)
            raise MergeError(f"method {method!r} needs adapters of equal rank, but adapter {i} has rank {ranks[i]} "
                             f"while adapter 0 has rank {ranks[0]} (ranks: {ranks}); methods that accept different "
                             f"ranks: {accept}")
        new_rank = ranks[0]
    elif method == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    rng = _Rng(seed)
    kind = "linear" if method == "svd" else method.removesuffix("_svd")
    layers: dict[str, Pair] = {}
    for path in _layer_paths(adapters, layer_order):
        indexed = [(i, ad) for i, ad in enumerate(adapters) if path in ad.layers]
        _check_layer(path, indexed, same_rank=method in FACTOR_METHODS)
        present = [(ad, float(weights[i])) for i, ad in indexed]
        if method == "cat":
            pair = _merge_cat(present, path)
        elif method in SVD_METHODS:
            pair = _merge_svd(kind, present, path, new_rank, density, majority_sign_method, svd_clamp, rng)
        else:
            pair = _merge_factors(kind, present, path, density, majority_sign_method, rng)
        layers[path] = _pad(pair, new_rank)
    extra = {k: v for k, v in adapters[0].extra_config.items() if k not in _DROPPED_CONFIG}
    return LoraWeights(rank=new_rank, alpha=float(new_rank), layers=layers, use_rslora=False, extra_config=extra)
