"""The injected layer: a frozen base linear plus a per-row mixture of slotted LoRA adapters."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from loramix.errors import MixError
from loramix.mix.ops import mixed_lora


@dataclass(eq=False)
class MixBatch:
    """One batch's per-row adapter metadata, built once per batch composition by
    :meth:`MixedModel.prepare` and handed to :meth:`MixedModel.forward` for every step that uses it.

    ``idx`` and ``w`` address slots; the slots they name stay pinned (never evicted or rewritten)
    until :meth:`MixedModel.release`. ``cache`` is for per-layer tensors derived from this batch
    (e.g. each layer's gathered adapters), valid for as long as the batch lives.
    """

    rows: tuple[tuple[tuple[str, float], ...], ...]  # per row: (adapter id, weight) pairs as given
    ids: tuple[str, ...]  # distinct adapter ids used (weight != 0), pinned while the batch lives
    idx: torch.Tensor | None  # (B, k) slot numbers; None when no row uses an adapter
    w: torch.Tensor | None  # (B, k) weights; 0 for padding
    cache: dict[int, object] = field(default_factory=dict)  # id(layer) -> derived tensors
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

    def write_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        """Load one adapter's pair into a slot; ``None`` clears it (the adapter lacks this layer)."""
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        if a is None or b is None:
            return
        r = a.shape[0]
        self.lora_A[slot, :r] = a.to(self.lora_A.dtype)  # (r, n_in)
        self.lora_B[slot, :r] = (b.float() * scale).T.to(self.lora_B.dtype)  # (r, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (B, T, n_out)
        batch = self.state.batch
        if batch is None or batch.idx is None or batch.w is None:
            return y
        if x.dim() != 3 or x.shape[0] != batch.idx.shape[0]:
            raise MixError(f"input has shape {tuple(x.shape)} but the mixture was set for {batch.idx.shape[0]} rows; "
                           "expected (rows, tokens, features)")
        return y + mixed_lora(x, self.lora_A, self.lora_B, batch.idx, batch.w).to(y.dtype)  # (B, T, n_out)
