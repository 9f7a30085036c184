"""The injected layer: a frozen base linear plus a per-row mixture of slotted LoRA adapters."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from loramix.errors import MixError
from loramix.mix import ops
from loramix.mix.kernel import SlotBgmv
from loramix.mix.ops import Factors, MixPlan, build_factors, slot_kernel


@dataclass(eq=False)
class MixBatch:
    """One batch's per-row adapter metadata, built once per batch composition by
    :meth:`MixedModel.prepare` and handed to :meth:`MixedModel.forward` for every step that uses it.

    ``idx`` and ``w`` address slots; the slots they name stay pinned (never evicted or rewritten)
    until :meth:`MixedModel.release`. ``plan`` says how the batch is computed (decided once, see
    :mod:`loramix.mix.ops`); ``cache`` holds each layer's share of the batch's adapters, copied out of
    the slots on the batch's first step and reused by every later one while the batch lives.
    """

    rows: tuple[tuple[tuple[str, float], ...], ...]  # per row: (adapter id, weight) pairs as given
    ids: tuple[str, ...]  # distinct adapter ids used (weight != 0), pinned while the batch lives
    idx: torch.Tensor | None  # (B, k) slot numbers; None when no row uses an adapter
    w: torch.Tensor | None  # (B, k) weights; 0 for padding
    plan: MixPlan | None = None  # None: no row uses an adapter (the base model alone)
    cache: dict[int, Factors | None] = field(default_factory=dict)  # id(layer) -> this layer's factors
    kernels: dict[int, SlotBgmv | None] = field(default_factory=dict)  # id(layer) -> the decode kernel on its slots
    # (``rows`` plans: nothing copied, the slots are read in place while pinned)
    released: bool = False

    @property
    def n_rows(self) -> int:
        return len(self.rows)


@dataclass
class MixState:
    """The batch in flight: set by :meth:`MixedModel.forward` for the length of one call, read by
    every injected layer of that model, and cleared afterwards."""

    batch: MixBatch | None = None


class MixedLoraLinear(nn.Module):
    """``y = base_layer(x) + mixture(x)``; the base weights are never changed.

    Slots: ``lora_A`` (S, r, n_in) and ``lora_B`` (S, r, n_out) hold ``A`` and ``(scale * B).T``.
    The names follow PEFT (``base_layer``, ``lora_A``, ``lora_B``).
    """

    def __init__(self, base_layer: nn.Linear, state: MixState, slots: int, rank: int):
        super().__init__()
        self.base_layer = base_layer
        self.state = state
        dtype, device = base_layer.weight.dtype, base_layer.weight.device
        self.lora_A: torch.Tensor
        self.lora_B: torch.Tensor
        self.register_buffer("lora_A", torch.zeros(slots, rank, base_layer.in_features, dtype=dtype, device=device),
                             persistent=False)  # (S, r, n_in)
        self.register_buffer("lora_B", torch.zeros(slots, rank, base_layer.out_features, dtype=dtype, device=device),
                             persistent=False)  # (S, r, n_out)
        self.ranks = [0] * slots  # true rank of the adapter in each slot for this layer (0: none)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def resize(self, slots: int, rank: int) -> None:
        """Grow the slot tensors, keeping what they hold."""
        old_a, old_b = self.lora_A, self.lora_B
        s0, r0 = old_a.shape[0], old_a.shape[1]
        self.lora_A = old_a.new_zeros(slots, rank, old_a.shape[2])  # (S', r', n_in)
        self.lora_B = old_b.new_zeros(slots, rank, old_b.shape[2])  # (S', r', n_out)
        self.lora_A[:s0, :r0] = old_a
        self.lora_B[:s0, :r0] = old_b
        self.ranks += [0] * (slots - len(self.ranks))

    def write_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        """Load one adapter's pair into a slot; ``None`` clears it (the adapter lacks this layer)."""
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.ranks[slot] = 0
        if a is None or b is None:
            return
        r = a.shape[0]
        self.ranks[slot] = r
        self.lora_A[slot, :r] = a.to(self.lora_A.dtype)  # (r, n_in)
        self.lora_B[slot, :r] = (b.float() * scale).T.to(self.lora_B.dtype)  # (r, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.state.batch
        if batch is None or batch.plan is None:
            return self.base_layer(x)  # (B, T, n_out)
        if x.dim() != 3 or x.shape[0] != batch.plan.n_rows:
            raise MixError(f"input has shape {tuple(x.shape)} but the mixture was set for {batch.plan.n_rows} rows; "
                           "expected (rows, tokens, features)")
        key = id(self)
        plan = batch.plan
        if plan.kind == "rows" and plan.kernel and x.shape[1] <= ops.KERNEL_MAX_TOKENS:
            if key in batch.kernels:
                op = batch.kernels[key]
            else:
                op = batch.kernels[key] = slot_kernel(plan, self.lora_A, self.lora_B, self.ranks)
            if op is not None:
                y = self.base_layer(x)  # (B, T, n_out)
                if y.dtype == torch.float32 and not (x.requires_grad or y.requires_grad):  # it writes outside autograd
                    return op.run(y, x)  # (B, T, n_out)
                factors = self._factors(batch, key)
                return y if factors is None else factors.add_to(y, x)
        factors = self._factors(batch, key)
        if factors is None:  # no adapter of this batch targets this layer
            return self.base_layer(x)  # (B, T, n_out)
        return factors(self.base_layer, x)  # (B, T, n_out)

    def _factors(self, batch: MixBatch, key: int) -> Factors | None:
        assert batch.plan is not None
        if key in batch.cache:
            factors = batch.cache[key]
        else:
            factors = batch.cache[key] = build_factors(batch.plan, self.lora_A, self.lora_B, self.ranks, key)
        return factors
