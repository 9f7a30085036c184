"""Nano adapters (LoRA-XS style): a frozen shared basis per base layer plus a tiny trainable core.

For a base linear layer ``W: (n_out, n_in)`` the truncated SVD ``W ~ U S Vh`` gives a basis of rank ``r``:
``U_r: (n_out, r)`` and ``Vh_r: (r, n_in)`` (orthonormal columns / rows), computed once per base model and
shared by every nano adapter of that rank. A nano adapter is one core ``M: (r, r)`` per adapted layer::

    delta_W = U_r @ M @ Vh_r          (r*r parameters per layer instead of LoRA's r*(n_in + n_out))

which is an ordinary LoRA with ``A = Vh_r`` and ``B = U_r @ M`` at ``alpha = r`` (scale 1): that is how it
is exported, mixed by the LoRA mixer and merged, with exactly the same delta. Because the basis is shared,
a weighted mixture of nano adapters is a nano adapter: ``sum_j w_j delta_j = U_r (sum_j w_j M_j) Vh_r``.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loramix.errors import InvalidAdapter
from loramix.lora import LoraWeights

__all__ = ["NANO_KIND", "NanoBasis", "NanoStack", "NanoWeights", "base_fingerprint", "compute_basis"]

NANO_KIND = "nano"
LORA_KIND = "lora"
KINDS = (LORA_KIND, NANO_KIND)
_SAMPLE = 4096  # weight values per layer hashed into the base fingerprint


def linear_paths(model: nn.Module) -> list[str]:
    """The paths of the base's linear layers a nano adapter may adapt (all but ``lm_head``)."""
    return sorted(p for p, m in model.named_modules() if isinstance(m, nn.Linear) and not p.endswith("lm_head"))


@functools.lru_cache(maxsize=256)
def _module_names(paths: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted({path.rsplit(".", 1)[-1] for path in paths}))


def base_fingerprint(model: nn.Module) -> str:
    """A short id of a base model's linear weights: paths, shapes and a strided sample of each weight."""
    mods = dict(model.named_modules())
    h = hashlib.blake2b(digest_size=8)
    for path in linear_paths(model):
        w = mods[path].weight.detach()
        flat = w.reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        h.update(f"{path}:{tuple(w.shape)};".encode())
        h.update(flat[::step][:_SAMPLE].float().cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass
class NanoBasis:
    """The frozen basis of one base model at one rank: per layer ``(U_r (n_out, r), Vh_r (r, n_in))``."""

    rank: int
    base_id: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    _plans: dict[tuple[str, ...], Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.base_id}-r{self.rank}"

    def plan(self, paths: tuple[str, ...]) -> tuple[torch.Tensor, list[tuple[int, int, list[str], torch.Tensor,
                                                                              list[torch.Tensor]]]]:
        """How to expand cores over ``paths`` in a few batched products (built once per paths tuple, kept):
        a permutation of the cores grouping layers of one shape, and per group ``(lo, hi, names, U^T (g, r, n_out),
        [Vh (r, n_in)] * g)`` where rows ``lo:hi`` of the permuted cores belong to ``names``. ``U`` is kept
        transposed (``B^T = M^T U^T`` is a wide product, ~30% faster than ``U M`` at r = 8) and the ``Vh`` as
        per-layer views made once (they are every adapter's ``A``)."""
        hit = self._plans.get(paths)
        if hit is not None:
            return hit
        members: dict[tuple[int, int], list[int]] = {}
        for i, path in enumerate(paths):
            u, vh = self.layers[path]
            members.setdefault((int(u.shape[0]), int(vh.shape[1])), []).append(i)
        perm: list[int] = []
        groups = []
        for rows in members.values():
            names = [paths[i] for i in rows]
            groups.append((len(perm), len(perm) + len(rows), names,
                           torch.stack([self.layers[p][0].t() for p in names]),  # (g, r, n_out)
                           [self.layers[p][1] for p in names]))  # g x (r, n_in)
            perm += rows
        if len(self._plans) >= 8:
            self._plans.pop(next(iter(self._plans)))
        plan = self._plans[paths] = (torch.tensor(perm), groups)
        return plan

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for path, (u, vh) in self.layers.items():
            out[f"{path}.U"] = u.contiguous()
            out[f"{path}.Vh"] = vh.contiguous()
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], rank: int, base_id: str) -> NanoBasis:
        paths = sorted({k.rsplit(".", 1)[0] for k in state})
        return cls(rank=rank, base_id=base_id, layers={p: (state[f"{p}.U"], state[f"{p}.Vh"]) for p in paths})


def compute_basis(model: nn.Module, rank: int, paths: list[str] | None = None) -> NanoBasis:
    """Truncated SVD of every (or each given) linear layer's weight: the rank-``rank`` basis."""
    mods = dict(model.named_modules())
    chosen = sorted(paths if paths is not None else linear_paths(model))
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path in chosen:
        w = mods[path].weight.detach().float().cpu()  # (n_out, n_in)
        if rank > min(w.shape):
            raise InvalidAdapter(f"nano rank {rank} exceeds layer {path}'s size {tuple(w.shape)}; expected a rank "
                                 f"of at most {min(w.shape)}")
        u, _s, vh = torch.linalg.svd(w, full_matrices=False)  # (n_out, m), (m,), (m, n_in)
        u, vh = u[:, :rank], vh[:rank]  # (n_out, r), (r, n_in)
        # canonical signs (each u column's largest entry positive): the same basis from any LAPACK
        sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))  # (1, r)
        sign[sign == 0] = 1
        layers[path] = ((u * sign).contiguous(), (vh * sign.T).contiguous())
    return NanoBasis(rank=rank, base_id=base_fingerprint(model), layers=layers)


@dataclass
class NanoWeights:
    """One nano adapter: a core ``M (r, r)`` per adapted layer over the basis ``basis_id``."""

    rank: int
    basis_id: str
    cores: dict[str, torch.Tensor]  # module path -> M (r, r)
    extra_config: dict[str, Any] = field(default_factory=dict)

    kind = NANO_KIND

    @property
    def n_params(self) -> int:
        return sum(m.numel() for m in self.cores.values())

    @property
    def target_modules(self) -> list[str]:
        return list(_module_names(tuple(self.cores)))

    def stacked(self) -> NanoStack:
        """The same adapter with its cores as one ``(L, r, r)`` tensor (in the cores' order)."""
        paths = tuple(self.cores)
        return NanoStack(self.rank, self.basis_id, paths, torch.stack([self.cores[p].detach() for p in paths]),
                         dict(self.extra_config))

    @property
    def alpha(self) -> float:
        return float(self.rank)

    def validate(self, basis: NanoBasis | None = None) -> None:
        """Check core shapes, dtypes, finiteness, and (given the basis) that every layer is in it."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise InvalidAdapter(f"nano rank is {self.rank!r}; expected a positive integer")
        if not self.cores:
            raise InvalidAdapter("nano adapter has no cores; expected at least one (r, r) core")
        if basis is not None and basis.id != self.basis_id:
            raise InvalidAdapter(f"nano adapter uses basis {self.basis_id!r} but the library's basis is {basis.id!r}; "
                                 "expected an adapter trained on this base model at this rank")
        for path, m in self.cores.items():
            if not isinstance(m, torch.Tensor) or not m.is_floating_point() or tuple(m.shape) != (self.rank, self.rank):
                shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                raise InvalidAdapter(f"nano core of {path} is {shape}; expected a floating-point "
                                     f"({self.rank}, {self.rank}) matrix")
            if basis is not None and path not in basis.layers:
                raise InvalidAdapter(f"nano core targets {path}, which the basis {basis.id} lacks; expected one of "
                                     f"its {len(basis.layers)} layers")

        if not bool(torch.isfinite(torch.stack([m.detach().float() for m in self.cores.values()])).all()):  # one check
            bad = next(p for p, m in self.cores.items() if not bool(torch.isfinite(m).all()))
            raise InvalidAdapter(f"nano core of {bad} holds NaN or infinite values; expected finite numbers")

    def to_lora(self, basis: NanoBasis) -> LoraWeights:
        """The equal LoRA: ``A = Vh_r``, ``B = U_r @ M``, ``alpha = r`` (scale 1); same delta, PEFT-loadable."""
        return self.stacked().to_lora(basis)

    def delta(self, path: str, basis: NanoBasis) -> torch.Tensor:
        u, vh = basis.layers[path]
        return u.float() @ self.cores[path].float() @ vh.float()  # (n_out, n_in)


@dataclass
class NanoStack:
    """A nano adapter with its cores as one tensor ``stack (L, r, r)``, row ``i`` being ``paths[i]``'s core.

    The bulk form: :meth:`Library.add_many` takes it like :class:`NanoWeights` (it validates, serialises and
    expands to LoRA with a few whole-tensor operations instead of one per layer), and the library reads
    nano blobs into it on the way to the mixer. :meth:`to_weights` gives the per-layer form."""

    rank: int
    basis_id: str
    paths: tuple[str, ...]
    stack: torch.Tensor
    extra_config: dict[str, Any] = field(default_factory=dict)

    kind = NANO_KIND

    @property
    def n_params(self) -> int:
        return int(self.stack.numel())

    @property
    def target_modules(self) -> list[str]:
        return list(_module_names(self.paths))

    @property
    def alpha(self) -> float:
        return float(self.rank)

    def stacked(self) -> NanoStack:
        return self

    def to_weights(self) -> NanoWeights:
        return NanoWeights(self.rank, self.basis_id, dict(zip(self.paths, self.stack.unbind(0), strict=True)),
                           dict(self.extra_config))

    def validate(self, basis: NanoBasis | None = None) -> None:
        """The checks of :meth:`NanoWeights.validate`, on the whole stack at once."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise InvalidAdapter(f"nano rank is {self.rank!r}; expected a positive integer")
        st = self.stack
        if not isinstance(st, torch.Tensor) or not st.is_floating_point() or st.dim() != 3 \
                or tuple(st.shape) != (len(self.paths), self.rank, self.rank):
            shape = tuple(st.shape) if isinstance(st, torch.Tensor) else type(st).__name__
            raise InvalidAdapter(f"nano core stack is {shape}; expected a floating-point ({len(self.paths)}, "
                                 f"{self.rank}, {self.rank}) tensor, one core per path")
        if not self.paths:
            raise InvalidAdapter("nano adapter has no cores; expected at least one (r, r) core")
        if len(set(self.paths)) != len(self.paths):
            raise InvalidAdapter("nano core stack names a layer twice; expected one core per layer")
        if basis is not None:
            if basis.id != self.basis_id:
                raise InvalidAdapter(f"nano adapter uses basis {self.basis_id!r} but the library's basis is "
                                     f"{basis.id!r}; expected an adapter trained on this base model at this rank")
            missing = [p for p in self.paths if p not in basis.layers]
            if missing:
                raise InvalidAdapter(f"nano core targets {missing[0]}, which the basis {basis.id} lacks; expected one "
                                     f"of its {len(basis.layers)} layers")
        if not bool(torch.isfinite(st).all()):
            bad = self.paths[int(torch.nonzero(~torch.isfinite(st).flatten(1).all(1))[0])]
            raise InvalidAdapter(f"nano core of {bad} holds NaN or infinite values; expected finite numbers")

    def to_lora(self, basis: NanoBasis) -> LoraWeights:
        """The equal LoRA (``A = Vh_r``, ``B = U_r @ M``, ``alpha = r``): one batched product per layer shape.

        The ``A`` tensors are read-only views shared by every adapter expanded over this basis (they are the
        same for all of them); ``B`` is the adapter's own. Nothing in loramix writes weights in place."""
        if basis.id != self.basis_id:
            raise InvalidAdapter(f"nano adapter uses basis {self.basis_id!r}, not {basis.id!r}")
        perm, groups = basis.plan(self.paths)
        cores = self.stack.index_select(0, perm)  # (L, r, r), grouped by layer shape
        layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for lo, hi, names, ut, vhs in groups:  # ut (g, r, n_out), vhs g x (r, n_in)
            bt = torch.bmm(cores[lo:hi].to(ut.dtype).transpose(1, 2), ut)  # (g, r, n_out) = (U M)^T
            layers.update(zip(names, zip(vhs, bt.transpose(1, 2).unbind(0), strict=True), strict=True))  # B (n_out, r)
        return LoraWeights(rank=self.rank, alpha=float(self.rank), layers=layers, use_rslora=False,
                           extra_config=dict(self.extra_config))
