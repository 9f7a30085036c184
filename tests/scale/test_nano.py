"""Nano adapters: basis, exact LoRA export (PEFT loads it), library round trip, training, mixing."""

from __future__ import annotations

import json

import pytest
import torch

from loramix.config import MixConfig, TrainConfig
from loramix.errors import InvalidAdapter
from loramix.mix import MixedModel
from loramix.nano import NanoWeights, base_fingerprint, compute_basis
from loramix.store import Library


def random_nano(basis, seed: int = 0, scale: float = 0.5, paths=None) -> NanoWeights:
    g = torch.Generator().manual_seed(seed)
    paths = paths or sorted(basis.layers)
    return NanoWeights(rank=basis.rank, basis_id=basis.id,
                       cores={p: torch.randn(basis.rank, basis.rank, generator=g) * scale for p in paths})


@pytest.fixture
def basis(tiny_base):
    return compute_basis(tiny_base.model, 4)


def test_basis_is_truncated_svd(tiny_base, basis):
    path = "model.layers.0.self_attn.q_proj"
    w = dict(tiny_base.model.named_modules())[path].weight.detach().float()  # (n_out, n_in)
    u, vh = basis.layers[path]
    assert u.shape == (w.shape[0], 4) and vh.shape == (4, w.shape[1])
    torch.testing.assert_close(u.T @ u, torch.eye(4), atol=1e-5, rtol=0)  # orthonormal columns
    s = torch.linalg.svdvals(w)
    torch.testing.assert_close(torch.linalg.svdvals(u.T @ w @ vh.T), s[:4], atol=1e-4, rtol=1e-4)
    assert basis.id == f"{base_fingerprint(tiny_base.model)}-r4"
    assert "lm_head" not in " ".join(basis.layers)


def test_export_delta_equals_nano_delta_exactly(basis):
    nano = random_nano(basis)
    lora = nano.to_lora(basis)
    assert lora.scale == 1.0 and lora.rank == 4
    for path in nano.cores:
        assert torch.equal(lora.delta(path), nano.delta(path, basis))


def test_library_round_trip_pack_and_peft_load(tmp_path, tiny_base, tiny_base_dir, basis):
    from peft import PeftModel

    from loramix.base import load_base

    lib = Library(tmp_path / "lib")
    lib.put_basis(basis)
    nano = random_nano(basis, paths=[p for p in basis.layers if p.endswith(("q_proj", "v_proj"))])
    rec = lib.add_weights(nano, "tiny-nano", description="a nano adapter", domain_tags=["zoo"])
    assert rec.kind == "nano" and rec.rank == 4 and rec.n_params == 4 * 4 * len(nano.cores)
    assert not any((lib.home / "blobs").rglob("*.safetensors"))  # packed, not a file of its own
    assert lib.packs.disk_bytes() > 0
    back = lib.load_nano(rec.id)
    assert all(torch.equal(back.cores[p], nano.cores[p]) for p in nano.cores)
    lora = lib.load(rec.id)
    for p in nano.cores:
        assert torch.equal(lora.delta(p), nano.delta(p, basis))
    out = lib.export(rec.id, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 4
    # PEFT loads it, and its outputs equal the base with the nano delta added to each weight
    pm = PeftModel.from_pretrained(load_base(tiny_base_dir).model, str(out)).eval()
    ref = load_base(tiny_base_dir).model.eval()
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for p in nano.cores:
            mods[p].weight += nano.delta(p, basis)
        x = torch.randint(0, 300, (2, 12))
        torch.testing.assert_close(pm(input_ids=x).logits, ref(input_ids=x).logits, atol=1e-4, rtol=1e-4)
    # a second library reads the same adapter back from disk (basis from meta/nano)
    lib.close()
    lib2 = Library(tmp_path / "lib")
    for p in nano.cores:
        assert torch.equal(lib2.load(rec.id).delta(p), nano.delta(p, basis))
    lib2.close()


def test_nano_validation(tmp_path, basis):
    lib = Library(tmp_path / "lib")
    with pytest.raises(InvalidAdapter, match="basis"):
        lib.add_weights(random_nano(basis), "no-basis")  # the basis was never stored
    lib.put_basis(basis)
    bad = random_nano(basis)
    bad.cores[next(iter(bad.cores))] = torch.full((4, 4), float("nan"))
    with pytest.raises(InvalidAdapter, match="NaN"):
        lib.add_weights(bad, "nan-nano")
    wrong = random_nano(basis)
    wrong.cores[next(iter(wrong.cores))] = torch.zeros(3, 4)
    with pytest.raises(InvalidAdapter, match=r"\(4, 4\)"):
        lib.add_weights(wrong, "shape-nano")
    assert len(lib) == 0


def test_mixing_nano_rows_equals_summed_cores(tmp_path, tiny_base, basis):
    """Per-row mixtures of nano adapters through the LoRA mixer equal one nano adapter with the row's
    weighted core sum U (sum_j w_j M_j) Vh applied to the weights."""
    lib = Library(tmp_path / "lib")
    lib.put_basis(basis)
    nanos = [random_nano(basis, seed=i, scale=0.2) for i in range(3)]
    ids = [lib.add_weights(n, f"n{i}").id for i, n in enumerate(nanos)]
    mm = MixedModel(tiny_base, lib.load, MixConfig(capacity=4))
    x = torch.randint(0, 300, (2, 10))
    rows = [[(ids[0], 0.5), (ids[1], 0.3), (ids[2], 0.2)], [(ids[2], 1.0)]]
    with torch.no_grad():
        got = mm.logits(x, rows=rows)
        mm.remove()
    from loramix.base import load_base

    for r, row in enumerate(rows):
        ref = load_base(tiny_base.path).model.eval()
        mods = dict(ref.named_modules())
        with torch.no_grad():
            for p in basis.layers:
                core = sum(w * nanos[ids.index(a)].cores[p] for a, w in row)  # (r, r)
                u, vh = basis.layers[p]
                mods[p].weight += u @ core @ vh
            want = ref(input_ids=x[r:r + 1]).logits
        torch.testing.assert_close(got[r:r + 1], want, atol=1e-4, rtol=1e-4)


def test_train_nano_learns_and_reuses_basis(tmp_path, tiny_base_dir):
    from loramix.app import Loramix

    texts = [f"the {w} is a word about plants and trees number {i}." for i, w in
             enumerate(["oak", "elm", "fir", "ash", "yew", "pine"] * 6)]
    eng = Loramix(tmp_path / "lib", base=str(tiny_base_dir))
    from loramix.route import Router
    from loramix.testing import HashEncoder  # no MiniLM in unit tests

    eng._router = Router(eng.library, HashEncoder())
    cfg = TrainConfig(kind="nano", rank=4, steps=12, batch_size=4, seq_len=16, nano_lr=2e-2, layers_from=0.0)
    rec, report = eng.train_adapter("trees", texts, cfg, progress=False)
    assert rec.kind == "nano" and rec.n_params == 16 * 7 * 2  # 7 linear layers x 2 blocks, r x r each
    assert report["eval_loss_after"] < report["eval_loss_before"]
    assert len(eng.library.bases.ids()) == 1
    rec2, _ = eng.train_adapter("trees2", texts, TrainConfig(kind="nano", rank=4, steps=2, batch_size=4, seq_len=16,
                                                             layers_from=0.0), progress=False)
    assert len(eng.library.bases.ids()) == 1  # the cached basis is reused
    assert eng.library.load_nano(rec2.id).basis_id == eng.library.load_nano(rec.id).basis_id


def test_engine_tiers_and_stats_snapshot(tmp_path, tiny_base_dir, basis):
    """The engine's mixer loads through the in-memory tier; stats() counts slots, tier and routing cache,
    and `loramix stats` shows the snapshot write_stats() left."""
    from typer.testing import CliRunner

    from loramix.app import Loramix
    from loramix.cli import app
    from loramix.route import Router
    from loramix.testing import HashEncoder

    eng = Loramix(tmp_path / "lib", base=str(tiny_base_dir), mix=MixConfig(capacity=2, memory_bytes=1 << 20))
    eng.library.put_basis(basis)
    eng._router = Router(eng.library, HashEncoder())
    ids = [eng.add_weights(random_nano(basis, seed=i), f"n{i}", examples=[f"topic {i}"]).id for i in range(3)]
    for aid in (ids[0], ids[1], ids[2], ids[0]):  # 2 slots: the 4th request evicts and reloads from memory
        eng.score("the oak", adapters=[(aid, 1.0)])
    eng.route("topic 1")
    eng.route("topic 1")
    st = eng.stats()
    assert st["memory_tier"]["misses"] == 3 and st["memory_tier"]["hits"] == 1
    assert st["slots"]["evictions"] >= 1 and st["route_cache"]["hits"] == 1
    eng.write_stats()
    res = CliRunner().invoke(app, ["stats", "--home", str(tmp_path / "lib"), "--json"])
    out = json.loads(res.stdout)
    assert out["adapters"] == 3 and out["engine"]["memory_tier"]["hits"] == 1


def test_stacked_form_equals_per_layer_form(tmp_path, basis):
    """NanoStack (the bulk form) serialises to the very bytes of NanoWeights, expands to the same LoRA, and is
    what the library reads back; order of the given paths does not matter."""
    from safetensors.torch import save

    from loramix.nano import NanoStack
    from loramix.store.nano_io import NANO_META_KEY, nano_blob_bytes, read_nano_stack

    w = random_nano(basis, seed=3)
    paths = tuple(reversed(sorted(w.cores)))  # not the basis's order
    st = NanoStack(basis.rank, basis.id, paths, torch.stack([w.cores[p] for p in paths]).half())
    w16 = NanoWeights(basis.rank, basis.id, {p: m.half() for p, m in w.cores.items()})
    order = sorted(basis.layers)
    ref = save({"cores": torch.stack([w16.cores[p] for p in order if p in w16.cores])},
               metadata={NANO_META_KEY: json.dumps({"rank": 4, "basis": basis.id, "extra": {},
                                                    "layers": [order.index(p) for p in order if p in w16.cores]},
                                                   sort_keys=True)})
    assert nano_blob_bytes(st, basis) == nano_blob_bytes(w16, basis) == ref  # what safetensors itself writes
    back = read_nano_stack(ref, lambda _: basis)
    assert back.to_weights().cores.keys() == w16.cores.keys()
    assert all(torch.equal(back.to_weights().cores[p], w16.cores[p]) for p in w16.cores)
    a, b = st.to_lora(basis), w16.to_lora(basis)
    for p in paths:
        assert torch.equal(a.delta(p), b.delta(p))
        u, vh = basis.layers[p]
        assert torch.allclose(a.delta(p), u @ w16.cores[p].float() @ vh, atol=1e-6)
        assert torch.equal(a.layers[p][0], vh)
    lib = Library(tmp_path / "lib")
    lib.put_basis(basis)
    from loramix.store import NewAdapter

    ids = lib.add_many([NewAdapter("stacked", st), NewAdapter("dict", w16)])
    assert lib.get(ids[0]).blob == lib.get(ids[1]).blob and lib.get(ids[0]).n_params == st.n_params == 16 * len(paths)
    got = lib.load(ids[0])
    assert all(torch.equal(got.delta(p), b.delta(p)) for p in paths)


def test_stacked_form_validation(tmp_path, basis):
    from loramix.nano import NanoStack
    from loramix.store import NewAdapter

    lib = Library(tmp_path / "lib")
    lib.put_basis(basis)
    paths = tuple(sorted(basis.layers))[:3]
    good = torch.zeros(3, 4, 4)
    bad = good.clone()
    bad[1, 0, 0] = float("inf")
    cases = [(NanoStack(4, basis.id, paths, bad), f"{paths[1]} holds NaN or infinite"),
             (NanoStack(4, basis.id, paths, torch.zeros(3, 4, 3)), r"\(3, 4, 3\)"),
             (NanoStack(4, basis.id, paths[:2], good), r"\(2, 4, 4\)"),
             (NanoStack(4, basis.id, (paths[0], paths[0], paths[1]), good), "twice"),
             (NanoStack(4, basis.id, (*paths[:2], "model.nowhere"), good), "model.nowhere"),
             (NanoStack(4, basis.id, paths, torch.zeros(3, 4, 4, dtype=torch.long)), "floating-point"),
             (NanoStack(4, "other-r4", paths, good), "basis")]
    for w, msg in cases:
        with pytest.raises(InvalidAdapter, match=msg):
            lib.add_many([NewAdapter("x", w)])
    assert len(lib) == 0
