"""Decode with a KV cache, rows joining and leaving between steps: the planned, cached mixer against
the mixer as it was before plans (its op kept here as the oracle)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from transformers import DynamicCache

from loramix.base import BaseModel
from loramix.config import MixConfig
from loramix.mix import MixedModel, kernel, ops
from loramix.mix.layers import MixedLoraLinear
from loramix.mix.ops import mixed_lora  # the pre-plan op, kept unchanged: the oracle
from loramix.testing import random_lora


def _old_forward(self: MixedLoraLinear, x: torch.Tensor) -> torch.Tensor:
    y = self.base_layer(x)  # (B, T, n_out)
    batch = self.state.batch
    if batch is None or batch.idx is None or batch.w is None:
        return y
    return y + mixed_lora(x, self.lora_A, self.lora_B, batch.idx, batch.w).to(y.dtype)  # (B, T, n_out)


@dataclass
class Row:
    mixture: list[tuple[str, float]]
    seq: list[int]  # every token so far; the cache holds all but the last
    logits: list[torch.Tensor] = field(default_factory=list)  # (V,) per decode step


def _merge(cache: DynamicCache, other: DynamicCache) -> None:
    for mine, theirs in zip(cache.layers, other.layers, strict=True):
        mine.keys = torch.cat([mine.keys, theirs.keys], 0)  # (B+1, H, L, D)
        mine.values = torch.cat([mine.values, theirs.values], 0)


def _keep(cache: DynamicCache, keep: list[int]) -> None:
    idx = torch.tensor(keep)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[idx], layer.values[idx]


def _decode(mm: MixedModel, vocab: int, steps: int = 32) -> list[Row]:
    """Greedy decode of a changing batch: rows leave and join (prefilled alone to the batch's length,
    then their KV appended) between steps; a new MixBatch is prepared at every change only."""
    g = torch.Generator().manual_seed(0)
    mixes = [[("a", 0.5), ("b", 0.3), ("c", 0.2)], [], [("d", 1.0)], [("c", 0.6), ("e", 0.4)],
             [("f", 0.7), ("a", 0.3)], [("b", 0.5), ("d", 0.25), ("f", 0.25)], [("e", 1.0)]]
    prompt = 6
    active = [Row(m, torch.randint(5, vocab, (prompt,), generator=g).tolist()) for m in mixes[:4]]
    done: list[Row] = []
    leave_at = {6: [1], 13: [0, 2], 25: [1]}
    join_at = {9: [4], 14: [5, 6], 20: [1]}
    cache = DynamicCache()
    with torch.inference_mode():
        batch = mm.prepare([r.mixture for r in active])
        mm.forward(batch, input_ids=torch.tensor([r.seq[:-1] for r in active]), past_key_values=cache, use_cache=True)
        for step in range(steps):
            if step in leave_at or step in join_at:
                mm.release(batch)
                gone = set(leave_at.get(step, []))
                done += [r for i, r in enumerate(active) if i in gone]
                keep = [i for i in range(len(active)) if i not in gone]
                _keep(cache, keep)
                active = [active[i] for i in keep]
                for m in join_at.get(step, []):
                    row = Row(mixes[m], torch.randint(5, vocab, (cache.get_seq_length() + 1,), generator=g).tolist())
                    alone, own = mm.prepare([row.mixture]), DynamicCache()
                    mm.forward(alone, input_ids=torch.tensor([row.seq[:-1]]), past_key_values=own, use_cache=True)
                    mm.release(alone)
                    _merge(cache, own)
                    active.append(row)
                batch = mm.prepare([r.mixture for r in active])
            ids = torch.tensor([[r.seq[-1]] for r in active])  # (B, 1)
            logits = mm.forward(batch, input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]  # (B, V)
            for r, lg in zip(active, logits, strict=True):
                r.logits.append(lg.clone())
                r.seq.append(int(lg.argmax()))
        mm.release(batch)
    return done + active


@pytest.mark.parametrize("form", ["planned", "kernel", "dense", "gather"])
def test_decode_with_rows_joining_and_leaving_matches_old_path(tiny_base: BaseModel, form: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    adapters = {n: random_lora(tiny_base, seed=i, std=0.2, targets=("q_proj", "v_proj", "o_proj", "up_proj",
                                                                     "down_proj")) for i, n in enumerate("abcdef")}
    cfg = MixConfig(capacity=8, max_rank=8, kernel=form in ("planned", "kernel"))
    mm = MixedModel(tiny_base, adapters.__getitem__, cfg)
    vocab = tiny_base.model.config.vocab_size
    calls = [0]
    if form in ("planned", "kernel"):
        assert kernel.available()
        real = kernel.SlotBgmv.run

        def counted(self: kernel.SlotBgmv, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            return real(self, y, x)

        monkeypatch.setattr(kernel.SlotBgmv, "run", counted)
    if form == "kernel":  # every call with differing rows through the kernel, prefill included
        monkeypatch.setattr(ops, "KERNEL_MAX_TOKENS", 1 << 30)
    if form in ("dense", "gather"):  # force one torch form of the differing-rows plan for every call
        monkeypatch.setattr(ops.MixPlan, "dense_for", lambda self, tokens: form == "dense")
    new = _decode(mm, vocab)
    assert (calls[0] > 0) == (form in ("planned", "kernel")), calls
    with monkeypatch.context() as m:
        m.setattr(MixedLoraLinear, "forward", _old_forward)
        old = _decode(mm, vocab)
    assert len(new) == len(old) == 8
    changed = 0
    for n, o in zip(new, old, strict=True):
        assert n.seq == o.seq  # greedy tokens identical
        assert len(n.logits) == len(o.logits) > 0
        for a, b in zip(n.logits, o.logits, strict=True):
            assert torch.allclose(a, b, atol=1e-4, rtol=0)
        changed += bool(n.mixture)
    assert changed == 6
    assert mm.stats()["pinned"] == 0


def test_mixture_moves_the_logits(tiny_base: BaseModel) -> None:
    """The decode comparison above is not vacuous: the adapters change what the rows produce."""
    a = random_lora(tiny_base, seed=1, std=0.2)
    mm = MixedModel(tiny_base, {"a": a}.__getitem__, MixConfig(capacity=2, max_rank=4))
    ids = torch.randint(5, tiny_base.model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        batch = mm.prepare([[("a", 1.0)], []])
        got = mm.forward(batch, input_ids=ids).logits  # (2, T, V)
        plain = mm.model(input_ids=ids).logits
    assert torch.equal(got[1], plain[1])
    assert not torch.allclose(got[0], plain[0], atol=1e-3)


@pytest.mark.parametrize("fold_after", [0, 1, 3])
def test_same_mixture_decode_folds_and_matches_old_path(tiny_base: BaseModel, fold_after: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row the same mixture: after ``fold_after`` calls the delta is folded into a copy of each
    layer's weight; 32 greedy decode steps with a KV cache give the old path's tokens and logits, and
    the base weights are untouched."""
    adapters = {n: random_lora(tiny_base, seed=i, std=0.2) for i, n in enumerate("abc")}
    mm = MixedModel(tiny_base, adapters.__getitem__, MixConfig(capacity=4, max_rank=8, fold_after=fold_after))
    weights = {n: p.detach().clone() for n, p in tiny_base.model.named_parameters()}
    ids = torch.randint(5, tiny_base.model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(2))
    mix = [("a", 0.5), ("b", 0.3), ("c", 0.2)]

    def run() -> tuple[torch.Tensor, list[torch.Tensor], int]:
        batch, cache, seen = mm.prepare([mix] * 3), DynamicCache(), []
        with torch.inference_mode():
            step = ids
            for _ in range(32):
                logits = mm.forward(batch, input_ids=step, past_key_values=cache, use_cache=True).logits[:, -1]  # (B, V)
                seen.append(logits.clone())
                step = logits.argmax(-1, keepdim=True)  # (B, 1)
        folded = len(batch.plan.folds or {}) if batch.plan is not None else 0
        mm.release(batch)
        return torch.stack([s.argmax(-1) for s in seen], 1), seen, folded

    new_tokens, new_logits, folded = run()
    assert (folded > 0) == (fold_after > 0), folded
    with monkeypatch.context() as m:
        m.setattr(MixedLoraLinear, "forward", _old_forward)
        old_tokens, old_logits, _ = run()
    assert torch.equal(new_tokens, old_tokens)
    for a, b in zip(new_logits, old_logits, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=0)
    for n, p in tiny_base.model.named_parameters():
        assert torch.equal(p, weights[n.replace(".base_layer", "")]), n


def test_kernel_stays_out_of_autograd(tiny_base: BaseModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """With gradients on, differing rows take the torch forms (the kernel writes outside autograd):
    gradients flow and the logits equal the kernel's."""
    adapters = {n: random_lora(tiny_base, seed=i, std=0.2) for i, n in enumerate("ab")}
    mm = MixedModel(tiny_base, adapters.__getitem__, MixConfig(capacity=4, max_rank=8))
    ids = torch.randint(5, tiny_base.model.config.vocab_size, (2, 1), generator=torch.Generator().manual_seed(3))
    rows = [[("a", 1.0)], [("b", 0.5), ("a", 0.5)]]
    calls = [0]
    real = kernel.SlotBgmv.run

    def counted(self: kernel.SlotBgmv, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return real(self, y, x)

    monkeypatch.setattr(kernel.SlotBgmv, "run", counted)
    batch = mm.prepare(rows)
    with torch.inference_mode():
        fast = mm.forward(batch, input_ids=ids).logits.clone()
    assert calls[0] > 0
    calls[0] = 0
    emb = tiny_base.model.get_input_embeddings()(ids).detach().requires_grad_()  # (B, 1, d)
    mm.release(batch)
    batch = mm.prepare(rows)  # factors built outside inference mode, as autograd needs
    with torch.enable_grad():
        slow = mm.forward(batch, inputs_embeds=emb).logits
        slow.sum().backward()
    mm.release(batch)
    assert calls[0] == 0
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert torch.allclose(fast, slow.detach(), atol=1e-5)


def test_folded_weights_carry_over_to_the_next_batch_with_the_same_mixture(tiny_base: BaseModel) -> None:
    adapters = {n: random_lora(tiny_base, seed=i, std=0.2) for i, n in enumerate("abc")}
    mm = MixedModel(tiny_base, adapters.__getitem__, MixConfig(capacity=4, max_rank=8, fold_after=2))
    ids = torch.randint(5, tiny_base.model.config.vocab_size, (3, 1), generator=torch.Generator().manual_seed(4))
    mix = [("a", 0.7), ("b", 0.3)]
    with torch.inference_mode():
        first = mm.prepare([mix] * 3)
        for _ in range(3):
            mm.forward(first, input_ids=ids)
        assert first.plan is not None and first.plan.folds
        mm.release(first)
        joined = mm.prepare([list(reversed(mix))] * 2)  # a row left; the same mixture, named in another order
        assert joined.plan is not None and joined.plan.folds is first.plan.folds
        got = mm.forward(joined, input_ids=ids[:2]).logits  # folded from the first call
        mm.release(joined)
        other = mm.prepare([[("c", 1.0)]])
        assert other.plan is not None and other.plan.folds is not first.plan.folds and not other.plan.folds
        mm.release(other)
    mm.cfg.fold_after = 0
    with torch.inference_mode():
        plain = mm.prepare([mix] * 2)
        want = mm.forward(plain, input_ids=ids[:2]).logits
        mm.release(plain)
    assert torch.allclose(got, want, atol=1e-4)
