"""Invariants of the per-row mixer on a tiny random llama."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from loramix.base import BaseModel, load_base
from loramix.config import MixConfig
from loramix.errors import MixError
from loramix.lora import LoraWeights
from loramix.mix import MixedModel
from loramix.testing import random_lora


def make_mixer(base: BaseModel, adapters: dict[str, LoraWeights], capacity: int = 8) -> MixedModel:
    return MixedModel(base, adapters.__getitem__, MixConfig(capacity=capacity, max_rank=4))


def inputs(base: BaseModel, rows: int = 3, tokens: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, base.model.config.vocab_size, (rows, tokens), generator=g)  # (B, T)


def peft_logits(base_dir: Path, w: LoraWeights, ids: torch.Tensor) -> torch.Tensor:
    model = load_base(base_dir).model
    cfg = LoraConfig(r=w.rank, lora_alpha=w.alpha, target_modules=w.target_modules, lora_dropout=0.0)
    pm = get_peft_model(model, cfg)
    set_peft_model_state_dict(pm, {k.replace("base_model.model.", "base_model.model.", 1): v
                                   for k, v in w.to_peft_state_dict().items()})
    pm.eval()
    with torch.inference_mode():
        return pm(input_ids=ids).logits


def merged_logits(base_dir: Path, parts: list[tuple[LoraWeights, float]], ids: torch.Tensor) -> torch.Tensor:
    model = load_base(base_dir).model
    mods = dict(model.named_modules())
    with torch.no_grad():
        for w, c in parts:
            for path in w.layers:
                mods[path].weight += c * w.delta(path)  # (n_out, n_in)
        return model(input_ids=ids).logits


def test_one_hot_matches_peft(tiny_base: BaseModel, tiny_base_dir: Path) -> None:
    a = random_lora(tiny_base, seed=1, targets=("q_proj", "v_proj", "down_proj"))
    mm = make_mixer(tiny_base, {"a": a})
    ids = inputs(tiny_base)
    got = mm.logits(ids, rows=[[("a", 1.0)]] * 3)
    want = peft_logits(tiny_base_dir, a, ids)
    assert torch.allclose(got, want, atol=1e-5)


def test_weighted_mixture_matches_merged_delta(tiny_base: BaseModel, tiny_base_dir: Path) -> None:
    a = random_lora(tiny_base, seed=1)
    b = random_lora(tiny_base, seed=2, rank=2, targets=("q_proj", "o_proj", "up_proj"))
    c = random_lora(tiny_base, seed=3, alpha=4.0)
    mm = make_mixer(tiny_base, {"a": a, "b": b, "c": c})
    ids = inputs(tiny_base, rows=2)
    got = mm.logits(ids, rows=[[("a", 0.5), ("b", 0.3), ("c", 0.2)]] * 2)
    want = merged_logits(tiny_base_dir, [(a, 0.5), (b, 0.3), (c, 0.2)], ids)
    assert torch.allclose(got, want, atol=1e-4)


def test_empty_row_equals_base_and_rows_do_not_leak(tiny_base: BaseModel, tiny_base_dir: Path) -> None:
    a = random_lora(tiny_base, seed=1, std=0.2)
    b = random_lora(tiny_base, seed=2, std=0.2)
    ids = inputs(tiny_base, rows=3)
    plain = copy.deepcopy(tiny_base.model)
    with torch.inference_mode():
        base_logits = plain(input_ids=ids).logits
    mm = make_mixer(tiny_base, {"a": a, "b": b})
    got = mm.logits(ids, rows=[[("a", 1.0)], [], [("b", 0.6), ("a", 0.4)]])
    assert torch.equal(got[1], base_logits[1])  # no adapter: exactly the base model
    assert not torch.allclose(got[0], base_logits[0], atol=1e-3)
    alone0 = mm.logits(ids[:1], rows=[[("a", 1.0)]])
    alone2 = mm.logits(ids[2:], rows=[[("b", 0.6), ("a", 0.4)]])
    assert torch.allclose(got[0], alone0[0], atol=1e-5)
    assert torch.allclose(got[2], alone2[0], atol=1e-5)
    # with no mixture set at all the injected model is the base model
    with torch.inference_mode():
        assert torch.equal(mm.model(input_ids=ids).logits, base_logits)


def test_lru_eviction_and_lazy_loading(tiny_base: BaseModel) -> None:
    adapters = {f"x{i}": random_lora(tiny_base, seed=i) for i in range(5)}
    mm = make_mixer(tiny_base, adapters, capacity=3)
    ids = inputs(tiny_base, rows=1)
    ref = {name: mm.logits(ids, rows=[[(name, 1.0)]]) for name in adapters}
    assert mm.loads == 5 and len(mm.loaded) == 3
    assert mm.loaded == ["x2", "x3", "x4"]
    mm.logits(ids, rows=[[("x3", 1.0)]])  # hit: no load, becomes most recent
    assert mm.loads == 5 and mm.loaded[-1] == "x3"
    got = mm.logits(ids, rows=[[("x0", 1.0)]])  # miss: evicts x2 (least recent)
    assert mm.loads == 6 and "x2" not in mm.loaded
    assert torch.allclose(got, ref["x0"], atol=1e-6)
    with pytest.raises(MixError, match="slots"):
        mm.set_mixture([[(n, 0.25)] for n in ["x0", "x1", "x2", "x3"]])


def test_rank_growth_keeps_loaded_adapters(tiny_base: BaseModel, tiny_base_dir: Path) -> None:
    small = random_lora(tiny_base, seed=1, rank=2)
    big = random_lora(tiny_base, seed=2, rank=12)
    mm = make_mixer(tiny_base, {"s": small, "b": big})
    ids = inputs(tiny_base, rows=2)
    before = mm.logits(ids, rows=[[("s", 1.0)], [("s", 1.0)]])
    got = mm.logits(ids, rows=[[("s", 1.0)], [("b", 1.0)]])
    assert torch.allclose(got[0], before[0], atol=1e-6)
    assert torch.allclose(got[1:], peft_logits(tiny_base_dir, big, ids[1:]), atol=1e-5)


def test_generation_keeps_each_rows_mixture(tiny_base: BaseModel) -> None:
    a = random_lora(tiny_base, seed=1, std=0.3)
    mm = make_mixer(tiny_base, {"a": a})
    ids = inputs(tiny_base, rows=2, tokens=4)
    with mm.mixture([[("a", 1.0)], []]), torch.inference_mode():
        out = mm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    with mm.mixture([[("a", 1.0)]]), torch.inference_mode():
        solo = mm.model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=5,
                                 do_sample=False)
    plain = mm.model.generate(input_ids=ids[1:], attention_mask=torch.ones_like(ids[1:]), max_new_tokens=5,
                              do_sample=False)
    assert torch.equal(out[0], solo[0])
    assert torch.equal(out[1], plain[0])


def test_bad_mixture_batch_is_an_error(tiny_base: BaseModel) -> None:
    a = random_lora(tiny_base, seed=1)
    mm = make_mixer(tiny_base, {"a": a})
    mm.set_mixture([[("a", 1.0)]] * 2)
    with pytest.raises(MixError, match="rows"):
        mm.model(input_ids=inputs(tiny_base, rows=3))


def test_prepared_batches_pin_their_slots_and_forward_explicitly(tiny_base: BaseModel) -> None:
    adapters = {f"x{i}": random_lora(tiny_base, seed=i) for i in range(3)}
    mm = make_mixer(tiny_base, adapters, capacity=2)
    ids = inputs(tiny_base, rows=1)
    ref = mm.logits(ids, rows=[[("x0", 1.0)]])
    b0 = mm.prepare([[("x0", 1.0)]])
    b1 = mm.prepare([[("x1", 1.0)]])
    assert not mm.fits(["x2"]) and mm.fits(["x0", "x1"])
    with pytest.raises(MixError, match="slots"):
        mm.prepare([[("x2", 1.0)]])  # both slots pinned by live batches: refused, nothing evicted
    with torch.inference_mode():
        got = mm.forward(b0, input_ids=ids).logits
        assert torch.equal(got, ref)
        assert mm._state.batch is None  # the batch is in force for that call only
        plain = mm.model(input_ids=ids).logits
    assert not torch.allclose(plain, got, atol=1e-4)
    mm.release(b0)
    mm.release(b0)  # idempotent
    assert mm.fits(["x2"])
    b2 = mm.prepare([[("x2", 1.0)]])  # evicts x0, the unpinned one
    assert set(mm.loaded) == {"x1", "x2"} and mm.stats()["evictions"] == 1
    with pytest.raises(MixError, match="released"):
        mm.forward(b0, input_ids=ids)
    mm.release(b1)
    mm.release(b2)
    assert mm.stats()["pinned"] == 0


def test_slots_loaded_under_inference_mode_stay_writable_outside_it(tiny_base: BaseModel, tiny_base_dir: Path) -> None:
    """The scheduler runs under torch.inference_mode; scoring or ask may later load adapters outside it."""
    adapters = {f"x{i}": random_lora(tiny_base, seed=i) for i in range(12)}
    mm = make_mixer(tiny_base, adapters, capacity=16)
    ids = inputs(tiny_base, rows=1)
    with torch.inference_mode():
        for i in range(10):  # first loads and slot growth happen inside inference mode
            b = mm.prepare([[(f"x{i}", 1.0)]])
            mm.forward(b, input_ids=ids)
            mm.release(b)
    got = mm.logits(ids, rows=[[("x11", 1.0)]])  # a load (slot write) outside inference mode
    fresh = make_mixer(load_base(tiny_base_dir), adapters).logits(ids, rows=[[("x11", 1.0)]])
    assert torch.allclose(got, fresh, atol=1e-6)


def test_an_adapter_for_another_base_is_refused_by_name(tiny_base: BaseModel) -> None:
    """An adapter whose A or B does not match the layer's in/out features gets a clear error, not a torch one."""
    good = random_lora(tiny_base, rank=2, seed=1)
    path, (a, b) = next(iter(good.layers.items()))
    wide = LoraWeights(rank=2, alpha=4.0, layers={path: (torch.randn(2, a.shape[1] * 3), b)})  # (r, 3 n_in)
    mm = make_mixer(tiny_base, {"good": good, "wide": wide})
    ids = inputs(tiny_base)
    with pytest.raises(MixError, match=r"adapter 'wide' does not fit this base model: layer .* takes \d+ inputs"):
        mm.logits(ids, rows=[[("wide", 1.0)]] * 3)
    assert mm.logits(ids, rows=[[("good", 1.0)]] * 3).shape[0] == 3  # the mixer still works afterwards
