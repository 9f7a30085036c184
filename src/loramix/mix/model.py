"""MixedModel: inject slotted LoRA layers into a base model and route each batch row to its mixture.

Adapters are loaded lazily into a fixed number of slots (LRU eviction) by their string id; slot
numbers never leave this module. Layers are injected on demand: only modules that some loaded
adapter targets carry the mixing cost.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from loramix.base import BaseModel, maybe_autocast
from loramix.config import MixConfig
from loramix.errors import MixError
from loramix.lora import LoraWeights
from loramix.mix.layers import MixBatch, MixedLoraLinear, MixState
from loramix.mix.ops import make_plan

Mixture = Sequence[tuple[str, float]]  # (adapter id, weight) pairs for one row


class MixedModel:
    """A base model whose batch rows each apply their own weighted mixture of library adapters."""

    def __init__(self, base: BaseModel, loader: Callable[[str], LoraWeights], cfg: MixConfig | None = None):
        self.base = base
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.cfg = cfg or MixConfig()
        self._loader = loader
        self._state = MixState()
        self._layers: dict[str, MixedLoraLinear] = {}
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # adapter id -> slot, least recently used first
        self._n_slots = min(self.cfg.capacity, 8)  # allocated slots; grows up to cfg.capacity
        self._rank = self.cfg.max_rank
        self._modules = dict(self.model.named_modules())
        self._pins: Counter[str] = Counter()  # adapter id -> live batches using it (never evicted while > 0)
        self._legacy: MixBatch | None = None  # the batch set by set_mixture / mixture()
        # the last shared mixture's folded weights, kept for the next batch with that mixture
        self._folds: tuple[tuple[tuple[str, float], ...], dict[int, torch.Tensor]] | None = None
        self.loads = 0  # adapters loaded from the library so far (for tests and metrics)
        self.hits = 0  # adapters asked for that were already in a slot
        self.evictions = 0  # adapters pushed out of a slot to make room
        self.load_seconds = 0.0  # time spent reading adapters and writing their slots

    # --- slots -----------------------------------------------------------------------------------
    @property
    def loaded(self) -> list[str]:
        """Ids of the adapters in slots, least recently used first."""
        return list(self._slot_of)

    def _inject(self, path: str) -> MixedLoraLinear:
        layer = self._layers.get(path)
        if layer is not None:
            return layer
        mod = self._modules.get(path)
        if not isinstance(mod, nn.Linear):
            raise MixError(f"the base model has no linear layer {path!r} for an adapter to target")
        layer = MixedLoraLinear(mod, self._state, self._n_slots, self._rank)
        parent_path, _, child = path.rpartition(".")
        setattr(self._modules[parent_path] if parent_path else self.model, child, layer)
        self._layers[path] = layer
        return layer

    def _grow(self, slots: int, rank: int) -> None:
        self._n_slots, self._rank = slots, rank
        for layer in self._layers.values():
            layer.resize(slots, rank)

    def _load(self, adapter_id: str, slot: int) -> None:
        t0 = time.perf_counter()
        weights = self._loader(adapter_id)
        if weights.rank > self._rank:
            self._grow(self._n_slots, weights.rank)
        for path, (wa, wb) in weights.layers.items():
            mod = self._inject(path).base_layer
            if wa.shape[-1] != mod.in_features or wb.shape[0] != mod.out_features:
                raise MixError(f"adapter {adapter_id!r} does not fit this base model: layer {path!r} takes "
                               f"{mod.in_features} inputs and gives {mod.out_features} outputs, but the adapter's "
                               f"A is {tuple(wa.shape)} and B {tuple(wb.shape)}; expected an adapter trained for this "
                               "base (pass --base or set LORAMIX_BASE to the model the library was built for)")
        for path, layer in self._layers.items():
            a, b = weights.layers.get(path, (None, None))
            layer.write_slot(slot, a, b, scale=weights.scale)
        self.loads += 1
        self.load_seconds += time.perf_counter() - t0

    def fits(self, ids: Sequence[str]) -> bool:
        """Whether a batch using ``ids`` could be prepared now, next to the batches alive (their slots
        are pinned). A scheduler admits a request only when this holds, instead of failing it."""
        return len(set(self._pins) | set(ids)) <= self.cfg.capacity

    def _acquire(self, ids: list[str]) -> dict[str, int]:
        """Slots for these ids, loading missing ones and evicting least recently used unpinned others."""
        if not self.fits(ids):
            raise MixError(f"the batch uses {len(set(ids) | set(self._pins))} distinct adapters (counting the "
                           f"batches in flight) but the mixer has {self.cfg.capacity} slots; raise "
                           "MixConfig.capacity or split the batch")
        wanted = set(ids) | set(self._pins)
        for aid in ids:
            if aid in self._slot_of:
                self._slot_of.move_to_end(aid)
                self.hits += 1
        for aid in ids:
            if aid in self._slot_of:
                continue
            used = set(self._slot_of.values())
            free = next((s for s in range(self._n_slots) if s not in used), None)
            if free is None and self._n_slots < self.cfg.capacity:
                free = self._n_slots
                self._grow(min(self.cfg.capacity, self._n_slots * 2), self._rank)
            if free is None:
                victim = next(v for v in self._slot_of if v not in wanted)
                free = self._slot_of.pop(victim)
                self.evictions += 1
            self._load(aid, free)
            self._slot_of[aid] = free
        return {aid: self._slot_of[aid] for aid in ids}

    def evict(self, adapter_id: str) -> None:
        """Forget a loaded adapter (e.g. after it was removed from the library); a pinned one is
        forgotten once its batches are released."""
        if self._folds is not None and any(aid == adapter_id for aid, _ in self._folds[0]):
            self._folds = None  # batches alive keep their own reference
        if not self._pins.get(adapter_id):
            self._slot_of.pop(adapter_id, None)

    def stats(self) -> dict[str, Any]:
        """Slot counters for metrics."""
        return {"loaded": len(self._slot_of), "pinned": len(self._pins), "capacity": self.cfg.capacity,
                "hits": self.hits, "misses": self.loads, "evictions": self.evictions,
                "load_seconds": self.load_seconds}

    # --- batches ---------------------------------------------------------------------------------
    def prepare(self, rows: Sequence[Mixture]) -> MixBatch:
        """Build a batch's per-row adapter metadata once: load its adapters into slots and pin them.

        Each row is a list of (adapter id, weight); an empty row is the base model. Pass the result
        to :meth:`forward` for every step with this batch composition, then :meth:`release` it.
        """
        frozen = tuple(tuple((str(aid), float(w)) for aid, w in row) for row in rows)
        ids = list(dict.fromkeys(aid for row in frozen for aid, w in row if w != 0.0))
        if not ids:
            return MixBatch(rows=frozen, ids=(), idx=None, w=None)
        # Slot tensors stay ordinary tensors whatever mode the caller is in: created or written inside
        # torch.inference_mode they would become inference tensors, which no later write outside it may touch.
        with torch.inference_mode(False), torch.no_grad():
            slots = self._acquire(ids)
        k = max(len(row) for row in frozen)
        idx = torch.zeros(len(frozen), k, dtype=torch.long)  # (B, k)
        w = torch.zeros(len(frozen), k, dtype=torch.float32)  # (B, k)
        for i, row in enumerate(frozen):
            for j, (aid, weight) in enumerate(row):
                if weight != 0.0:
                    idx[i, j], w[i, j] = slots[aid], weight
        device = next(self.model.parameters()).device
        summed = [self._summed(row) for row in frozen]  # an adapter named twice in a row counts once
        per_row = [{slots[aid]: v for aid, v in mix.items()} for mix in summed]  # {slot: summed weight}
        self._pins.update(ids)
        plan = make_plan(per_row, device, fold_after=self.cfg.fold_after, kernel=self.cfg.kernel)
        if plan is not None and plan.kind == "same" and self.cfg.fold_after > 0:
            mix_key = tuple(sorted(summed[0].items()))
            if self._folds is None or self._folds[0] != mix_key:
                self._folds = (mix_key, {})
            plan.folds = self._folds[1]
        return MixBatch(rows=frozen, ids=tuple(ids), idx=idx.to(device), w=w.to(device), plan=plan)

    @staticmethod
    def _summed(row: tuple[tuple[str, float], ...]) -> dict[str, float]:
        """{adapter id: summed weight} of one row, without zero weights."""
        mix: dict[str, float] = {}
        for aid, weight in row:
            if weight != 0.0:
                mix[aid] = mix.get(aid, 0.0) + weight
        return {aid: v for aid, v in mix.items() if v != 0.0}

    def release(self, batch: MixBatch) -> None:
        """Unpin a batch's adapters (idempotent); they stay loaded until evicted."""
        if batch.released:
            return
        batch.released = True
        batch.cache.clear()
        batch.kernels.clear()
        self._pins.subtract(batch.ids)
        for aid in batch.ids:
            if self._pins[aid] <= 0:
                del self._pins[aid]

    def forward(self, batch: MixBatch, **model_kwargs: Any) -> Any:
        """One call of the base model (``input_ids``, ``attention_mask``, ``past_key_values``, ...) with
        each row applying its mixture from ``batch``. Returns what the model returns."""
        if batch.released:
            raise MixError("this batch was released; prepare a new one")
        saved, self._state.batch = self._state.batch, batch
        try:
            return self.model(**model_kwargs)
        finally:
            self._state.batch = saved

    # --- a current mixture, for code that calls the model itself (transformers' generate) ----------
    def set_mixture(self, rows: Sequence[Mixture]) -> None:
        """Make ``rows`` the mixture of every model call until :meth:`clear` (an empty row = base)."""
        self.clear()
        self._legacy = self.prepare(rows)
        self._state.batch = self._legacy

    def clear(self) -> None:
        if self._legacy is not None:
            self.release(self._legacy)
            self._legacy = None
        self._state.batch = None

    @contextlib.contextmanager
    def mixture(self, rows: Sequence[Mixture]) -> Iterator[MixedModel]:
        self.set_mixture(rows)
        try:
            yield self
        finally:
            self.clear()

    # --- running ---------------------------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               rows: Sequence[Mixture] | None = None, bf16: bool | None = None) -> torch.Tensor:
        """Logits (B, T, V) with each row's mixture (``rows`` None: the mixture already set).

        ``bf16`` overrides the config's autocast switch (scoring passes False: it is a measurement).
        """
        ctx = self.mixture(rows) if rows is not None else contextlib.nullcontext()
        with ctx, torch.inference_mode(), maybe_autocast(self.cfg.bf16 if bf16 is None else bf16):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)

    def remove(self) -> None:
        """Put the base model's original linear layers back."""
        for path, layer in self._layers.items():
            parent_path, _, child = path.rpartition(".")
            setattr(self._modules[parent_path] if parent_path else self.model, child, layer.base_layer)
        self.clear()
        self._layers.clear()
        self._slot_of.clear()
        self._pins.clear()
        self._folds = None
