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

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loramix.errors import InvalidAdapter
from loramix.lora import LoraWeights

__all__ = ["NANO_KIND", "NanoBasis", "NanoWeights", "base_fingerprint", "compute_basis"]

NANO_KIND = "nano"
LORA_KIND = "lora"
KINDS = (LORA_KIND, NANO_KIND)
_SAMPLE = 4096  # weight values per layer hashed into the base fingerprint


def linear_paths(model: nn.Module) -> list[str]:
    """The paths of the base's linear layers a nano adapter may adapt (all but ``lm_head``)."""
    return sorted(p for p, m in model.named_modules() if isinstance(m, nn.Linear) and not p.endswith("lm_head"))


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

    @property
    def id(self) -> str:
        return f"{self.base_id}-r{self.rank}"

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
        return sorted({path.rsplit(".", 1)[-1] for path in self.cores})

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

        if not bool(torch.isfinite(torch.stack([m.float() for m in self.cores.values()])).all()):  # one check
            bad = next(p for p, m in self.cores.items() if not bool(torch.isfinite(m).all()))
            raise InvalidAdapter(f"nano core of {bad} holds NaN or infinite values; expected finite numbers")

    def to_lora(self, basis: NanoBasis) -> LoraWeights:
        """The equal LoRA: ``A = Vh_r``, ``B = U_r @ M``, ``alpha = r`` (scale 1); same delta, PEFT-loadable."""
        if basis.id != self.basis_id:
            raise InvalidAdapter(f"nano adapter uses basis {self.basis_id!r}, not {basis.id!r}")
        layers = {}
        for path, m in self.cores.items():
            u, vh = basis.layers[path]
            layers[path] = (vh.clone(), u @ m.to(u.dtype))  # (r, n_in), (n_out, r)
        return LoraWeights(rank=self.rank, alpha=float(self.rank), layers=layers, use_rslora=False,
                           extra_config=dict(self.extra_config))

    def delta(self, path: str, basis: NanoBasis) -> torch.Tensor:
        u, vh = basis.layers[path]
        return u.float() @ self.cores[path].float() @ vh.float()  # (n_out, n_in)
