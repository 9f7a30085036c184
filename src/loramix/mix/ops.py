"""The per-row LoRA mixture op: per-batch plans with cached factors, a one-shot op and a reference.

Every row ``b`` of a batch applies its own weighted mixture of up to ``k`` adapters that sit in
fixed-capacity stacked tensors (slots)::

    y[b] = sum_j  w[b, j] * (x[b] @ A[s_bj].T) @ B[s_bj].T        s_bj = idx[b, j]

A slot holds ``A: (r, n_in)`` and ``B * scale: (n_out, r)``, zero-padded to the slot rank, so
adapters of smaller rank and weight-0 padding entries contribute exactly zero.

A row's mixture does not change while it decodes, so :func:`make_plan` decides once per batch
composition how the batch is computed, and :func:`build_factors` copies each layer's share of the
batch's adapters (true rank only) into small contiguous tensors, once per batch and layer:

- ``same``: every row has the same mixture: one pair of plain matmuls on ``(B*T, n)`` with the
  mixture's stacked factors, the weights folded into ``B``; once the batch has made ``fold_after``
  calls (it is decoding, so it will make many more) the mixture's delta is folded into a copy of the
  layer's weight and every later call is the base layer's single matmul against ``W + delta``.
- ``rows``: rows differ: decode calls (at most ``KERNEL_MAX_TOKENS`` tokens per row) go to the
  compiled kernel over the slots (:func:`slot_kernel`, :mod:`loramix.mix.kernel`) where it runs;
  otherwise either ``dense`` (one matmul against the batch's U distinct adapters,
  a per-row weight mask, one matmul back; reads each adapter once per call, best for decode) or
  ``gather`` (each row's own k adapters, weights folded into B, two batched matmuls; fewer flops,
  best when a call has many tokens per row, as in prefill).

Rows without an adapter get weight 0 everywhere, so their output is exactly the base layer's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from loramix.mix import kernel

DENSE_READ_COST = 16.0  # reading one adapter weight costs about this many multiply-adds (CPU, measured end to end)
KERNEL_MAX_TOKENS = 4  # calls with at most this many tokens per row (decode) take the compiled kernel (measured: it's level with bmm at 4, behind at 8)
GATHER_CACHE_RATIO = 4  # keep a layer's per-row gathered factors only up to this many times the distinct ones


@dataclass(eq=False)
class MixPlan:
    """How one batch is computed, decided once per batch composition (by :func:`make_plan`)."""

    kind: str  # "same" (every row the same mixture) or "rows" (rows differ, or some rows are base-only)
    slots: tuple[int, ...]  # the batch's distinct adapters (U) by slot number
    wu: torch.Tensor  # (B, U) float32: each row's weight on each distinct adapter, 0 where unused
    uidx: torch.Tensor  # (B, K) long: each row's adapters as positions in ``slots`` (padding: 0)
    gw: torch.Tensor  # (B, K) float32: their weights (padding: 0)
    fold_after: int = 0  # ``same`` plans: fold the delta into the weight after this many calls (0: never)
    kernel: bool = False  # ``rows`` plans: use the compiled kernel (loramix.mix.kernel) for decode calls
    # ``same`` plans: each layer's folded weight (W + delta) by layer key, shared by every batch with this
    # mixture (rows joining and leaving keep it); None: never fold
    folds: dict[int, torch.Tensor] | None = None
    slot_idx: torch.Tensor | None = None  # (B, K) on the CPU: each row's adapters by slot number (for the kernel)

    @property
    def n_rows(self) -> int:
        return int(self.wu.shape[0])

    def dense_for(self, tokens: int) -> bool:
        """Whether a call with ``tokens`` tokens per row takes the dense form (``rows`` plans)."""
        return dense_is_cheaper(self.n_rows, tokens, len(self.slots), int(self.uidx.shape[1]))


def dense_is_cheaper(nb: int, nt: int, u: int, k: int) -> bool:
    """Dense (all nb*nt tokens against the u distinct adapters, each read once) vs gather (each row's
    nt tokens against its own k adapters, read once per row): multiply-adds plus weighted reads, per
    unit of rank and width. Decode (nt = 1) with shared adapters favours dense, prefill gather."""
    return u * (nb * nt + DENSE_READ_COST) <= k * nb * (nt + DENSE_READ_COST)


def make_plan(rows: list[dict[int, float]], device: torch.device | None = None, fold_after: int = 0,
              kernel: bool = False) -> MixPlan | None:
    """The plan for a batch whose row ``b`` mixes slots ``rows[b]`` ({slot: weight}, weights != 0).
    None when no row uses an adapter (the base model alone). ``fold_after``, ``kernel``: see :class:`MixPlan`."""
    slots = tuple(dict.fromkeys(s for row in rows for s in row))
    if not slots:
        return None
    pos = {s: i for i, s in enumerate(slots)}
    nb, k = len(rows), max(len(row) for row in rows)
    wu = torch.zeros(nb, len(slots), dtype=torch.float32)  # (B, U)
    uidx = torch.zeros(nb, k, dtype=torch.long)  # (B, K)
    gw = torch.zeros(nb, k, dtype=torch.float32)  # (B, K)
    for i, row in enumerate(rows):
        for j, (s, w) in enumerate(row.items()):
            wu[i, pos[s]], uidx[i, j], gw[i, j] = w, pos[s], w
    same = all(row == rows[0] for row in rows)
    slot_idx = torch.tensor(slots, dtype=torch.long)[uidx]  # (B, K)
    return MixPlan(kind="same" if same else "rows", slots=slots, wu=wu.to(device), uidx=uidx.to(device),
                   gw=gw.to(device), fold_after=fold_after, kernel=kernel, slot_idx=slot_idx)


@dataclass(eq=False)
class Factors:
    """One layer's share of one batch's adapters, copied once and reused every step.

    ``a``: (U, r, n_in) and ``b``: (U, r, n_out) hold the distinct adapters that target this layer,
    trimmed to the largest true rank among them; for a ``same`` plan ``b`` already carries the
    mixture weights and ``w`` is None, otherwise ``w``: (B, 1, U*r) holds each row's weights.
    """

    plan: MixPlan
    a: torch.Tensor  # (U, r, n_in)
    b: torch.Tensor  # (U, r, n_out)
    w: torch.Tensor | None  # (B, 1, U*r) per-row weights, or None when folded into b
    uidx: torch.Tensor  # (B, K) positions in a/b of each row's adapters
    gw: torch.Tensor  # (B, K) their weights
    _by_dtype: dict[torch.dtype, Factors] = field(default_factory=dict)
    _gathered: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, K*r, n_in), (B, K*r, n_out) weights folded
    key: int = 0  # the layer's key in ``plan.folds``
    calls: int = 0  # calls made with these factors (``same`` plans fold after ``plan.fold_after``)

    def __call__(self, base: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """The injected layer's output for this batch: ``base(x) + mixture(x)``; x: (B, T, n_in).

        A ``same`` plan's folded weight is made and used under inference mode only (it is an
        inference tensor that autograd could not use)."""
        folds = self.plan.folds if torch.is_inference_mode_enabled() else None
        if folds is not None:
            wf = folds.get(self.key)
            if wf is not None:
                return F.linear(x, wf, base.bias)  # (B, T, n_out)
        self.calls += 1
        if folds is not None and self.w is None and 0 < self.plan.fold_after < self.calls:
            wf = folds[self.key] = self.fold(base.weight)  # (n_out, n_in)
            return F.linear(x, wf, base.bias)  # (B, T, n_out)
        return self.add_to(base(x), x)  # (B, T, n_out)

    def fold(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + sum_j w_j B_j A_j`` for a ``same`` plan: (n_out, n_in), a new tensor (W is untouched)."""
        u, r, n_out = self.b.shape
        a = self.a.reshape(u * r, -1).float()  # (U*r, n_in)
        b = self.b.reshape(u * r, n_out).float()  # (U*r, n_out) weights and scale already in
        return torch.addmm(weight.float(), b.T, a).to(weight.dtype)  # (n_out, n_in)

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's own adapters: A (B, K*r, n_in) and weight-folded B (B, K*r, n_out); kept when small."""
        if self._gathered is not None:
            return self._gathered
        (nb, k), (u, r, n_out) = self.uidx.shape, self.b.shape
        a_sel = self.a[self.uidx].view(nb, k * r, self.a.shape[2])  # (B, K*r, n_in)
        b_sel = (self.b[self.uidx] * self.gw.to(self.b.dtype)[:, :, None, None]).view(nb, k * r, n_out)  # (B, K*r, n_out)
        if nb * k <= GATHER_CACHE_RATIO * u:
            self._gathered = (a_sel, b_sel)
        return a_sel, b_sel

    def to(self, dtype: torch.dtype) -> Factors:
        """These factors in ``dtype`` (converted once, then kept)."""
        if dtype == self.a.dtype:
            return self
        got = self._by_dtype.get(dtype)
        if got is None:
            got = Factors(self.plan, self.a.to(dtype), self.b.to(dtype), None if self.w is None else self.w.to(dtype),
                          self.uidx, self.gw)
            self._by_dtype[dtype] = got
        return got

    def add_to(self, y: torch.Tensor, x: torch.Tensor, dense: bool | None = None) -> torch.Tensor:
        """``y += mixture(x)`` in place and return ``y``; x: (B, T, n_in), y: (B, T, n_out).

        ``dense`` forces the torch form of a ``rows`` plan (tests); None lets the plan choose.
        """
        f = self.to(y.dtype)
        nb, nt, n_in = x.shape
        u, r, n_out = f.b.shape
        y2 = y.view(nb * nt, n_out)  # (B*T, n_out)
        if f.w is None:  # same mixture on every row: weights already in b
            h = F.linear(x.reshape(nb * nt, n_in), f.a.view(u * r, n_in))  # (B*T, U*r)
            y2.addmm_(h.to(y.dtype), f.b.view(u * r, n_out))
        elif self.plan.dense_for(nt) if dense is None else dense:  # every row against every distinct adapter, masked by its weights
            h = F.linear(x, f.a.view(u * r, n_in)).to(y.dtype)  # (B, T, U*r)
            h.mul_(f.w)  # (B, T, U*r)
            y2.addmm_(h.view(nb * nt, u * r), f.b.view(u * r, n_out))
        else:  # each row against its own adapters, weights folded into its B
            a_sel, b_sel = f.gathered()  # (B, K*r, n_in), (B, K*r, n_out)
            h = torch.bmm(x.to(y.dtype), a_sel.transpose(1, 2))  # (B, T, K*r)
            y.baddbmm_(h, b_sel)
        return y


def build_factors(plan: MixPlan, lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: list[int],
                  key: int = 0) -> Factors | None:
    """Copy this layer's share of the plan's adapters out of the slots; None when none targets it.
    ``key`` names the layer in ``plan.folds``.

    lora_a: (S, R, n_in); lora_b: (S, R, n_out) (B transposed, scaled); ranks: true rank per slot (0: absent).
    """
    present = [i for i, s in enumerate(plan.slots) if ranks[s] > 0]
    if not present:
        return None
    r = max(ranks[plan.slots[i]] for i in present)
    sel = torch.tensor([plan.slots[i] for i in present], device=lora_a.device)  # (U,)
    a = lora_a[sel, :r].contiguous()  # (U, r, n_in)
    b = lora_b[sel, :r].contiguous()  # (U, r, n_out)
    wu = plan.wu[:, present]  # (B, U)
    remap = torch.zeros(len(plan.slots), dtype=torch.long, device=plan.uidx.device)  # position among present
    remap[present] = torch.arange(len(present), device=plan.uidx.device)
    keep = torch.zeros(len(plan.slots), dtype=torch.bool, device=plan.uidx.device)
    keep[present] = True
    uidx = remap[plan.uidx]  # (B, K)
    gw = torch.where(keep[plan.uidx], plan.gw, torch.zeros_like(plan.gw))  # (B, K)
    if plan.kind == "same":
        b = (b.float() * wu[0, :, None, None]).to(b.dtype)  # (U, r, n_out) weights folded in
        return Factors(plan, a, b, None, uidx, gw, key=key)
    w = wu.repeat_interleave(r, dim=1).unsqueeze(1).to(a.dtype)  # (B, 1, U*r)
    return Factors(plan, a, b, w, uidx, gw, key=key)


def slot_kernel(plan: MixPlan, lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: list[int]) -> kernel.SlotBgmv | None:
    """The compiled kernel over this layer's slots for a ``rows`` plan (nothing copied); None when the
    kernel cannot run here (no compiler, not float32 on the CPU) or no adapter of the batch targets the layer."""
    if lora_a.dtype != torch.float32 or lora_a.device.type != "cpu" or not kernel.available():
        return None
    if all(ranks[s] == 0 for s in plan.slots):
        return None
    assert plan.slot_idx is not None, "plans come from make_plan"
    return kernel.SlotBgmv(lora_a, lora_b, plan.slot_idx, plan.gw.cpu(), ranks)


def mixed_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One-shot op (no plan, nothing cached): gather each row's adapters, two batched matmuls.

    x: (B, T, n_in); a: (S, r, n_in); b: (S, r, n_out) — B stored transposed;
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
