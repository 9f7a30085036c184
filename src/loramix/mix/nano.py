"""Per-row mixing of nano adapters that share one basis: sum each row's cores, then touch the activations once.

For a layer with basis ``U_r (n_out, r)``, ``Vh_r (r, n_in)`` and slotted cores ``M (S, r, r)``, row ``b``
mixing slots ``idx[b, :]`` with weights ``w[b, :]`` adds::

    y[b] += U_r (sum_j w[b, j] M[idx[b, j]]) Vh_r x[b]

so the per-token cost is ``r * (n_in + n_out) + r * r`` whatever ``k`` is, against ``k * r * (n_in + n_out)``
for ``k`` LoRA adapters of rank ``r`` (the same mixture expanded to LoRA form).
"""

from __future__ import annotations

import torch

__all__ = ["nano_mix", "nano_mix_reference"]


def nano_mix(x: torch.Tensor, u: torch.Tensor, vh: torch.Tensor, cores: torch.Tensor, idx: torch.Tensor,
             w: torch.Tensor) -> torch.Tensor:
    """x: (B, T, n_in); u: (n_out, r); vh: (r, n_in); cores: (S, r, r); idx, w: (B, k). Returns (B, T, n_out)."""
    m = (cores[idx] * w.to(cores.dtype)[:, :, None, None]).sum(dim=1)  # (B, r, r): each row's summed core
    h = x @ vh.T  # (B, T, r)
    h = torch.bmm(h, m.transpose(1, 2))  # (B, T, r)
    return h @ u.T  # (B, T, n_out)


def nano_mix_reference(x: torch.Tensor, u: torch.Tensor, vh: torch.Tensor, cores: torch.Tensor, idx: torch.Tensor,
                       w: torch.Tensor) -> torch.Tensor:
    """Plain float64 reference: each adapter's dense delta ``U M Vh`` applied one at a time."""
    out = torch.zeros(x.shape[0], x.shape[1], u.shape[0], dtype=torch.float64)  # (B, T, n_out)
    for b in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            delta = u.double() @ cores[int(idx[b, j])].double() @ vh.double()  # (n_out, n_in)
            out[b] += float(w[b, j]) * (x[b].double() @ delta.T)  # (T, n_out)
    return out.to(x.dtype)
