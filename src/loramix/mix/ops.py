"""The per-row LoRA mixture op: a fast batched path and a plain-torch reference.

Every row ``b`` of a batch applies its own weighted mixture of up to ``k`` adapters that sit in
fixed-capacity stacked tensors (slots)::

    y[b] = sum_j  w[b, j] * (x[b] @ A[s_bj].T) @ B[s_bj].T        s_bj = idx[b, j]

A slot holds ``A: (r, n_in)`` and ``B * scale: (n_out, r)``, zero-padded to the slot rank, so
adapters of smaller rank and weight-0 padding entries contribute exactly zero.
"""

from __future__ import annotations

import torch


def mixed_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Fast path: gather each row's adapters and apply them with two batched matmuls.

    x: (B, T, n_in); a: (S, r, n_in); bt: b is (S, r, n_out) — B stored transposed;
    idx: (B, k) slot numbers; w: (B, k) mixture weights.  Returns the LoRA part only: (B, T, n_out).
    """
    nb, k = idx.shape
    r = a.shape[1]
    a_sel = a[idx].reshape(nb, k * r, a.shape[2])  # (B, k*r, n_in)
    b_sel = b[idx].reshape(nb, k * r, b.shape[2])  # (B, k*r, n_out)
    h = torch.bmm(x, a_sel.transpose(1, 2))  # (B, T, k*r)
    h = h * w.to(h.dtype).repeat_interleave(r, dim=1).unsqueeze(1)  # (B, T, k*r)
    return torch.bmm(h, b_sel)  # (B, T, n_out)


def reference_mix(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference of :func:`mixed_lora`: one row, one adapter at a time, in float64."""
    nb, k = idx.shape
    out = torch.zeros(x.shape[0], x.shape[1], b.shape[2], dtype=torch.float64)  # (B, T, n_out)
    for row in range(nb):
        for j in range(k):
            s = int(idx[row, j])
            xa = x[row].double() @ a[s].double().T  # (T, r)
            out[row] += float(w[row, j]) * (xa @ b[s].double())  # (T, n_out)
    return out.to(x.dtype)
