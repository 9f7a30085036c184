"""merge() against PEFT's add_weighted_adapter, method by method, plus argument errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import merge_utils

from loramix.base import load_base
from loramix.errors import MergeError
from loramix.lora import LoraWeights
from loramix.mix.merge import FACTOR_METHODS, MERGE_METHODS, SVD_METHODS, merge

# name -> (r, alpha, targets, seed, use_rslora)
SPECS: dict[str, tuple[int, int, tuple[str, ...], int, bool]] = {
    "one": (4, 8, ("q_proj", "v_proj"), 1, False),
    "two": (4, 8, ("q_proj", "v_proj"), 2, False),
    "three": (4, 4, ("q_proj", "v_proj"), 3, False),  # another scale
    "r8qk": (8, 8, ("q_proj", "k_proj"), 4, False),  # another rank and other targets
    "qk": (4, 8, ("q_proj", "k_proj"), 5, False),  # same rank, other targets
    "rs": (4, 8, ("q_proj", "v_proj"), 6, True),  # rslora
}
TRIO = (("one", "two", "three"), (0.7, -0.4, 0.5))
_names = itertools.count()


@pytest.fixture(scope="module")
def peft_model(tiny_base_dir: Path) -> PeftModel:
    """The tiny base with every adapter of SPECS loaded (random, non-zero A and B)."""
    base = load_base(tiny_base_dir)
    model: PeftModel | None = None
    for name, (r, alpha, targets, seed, rslora) in SPECS.items():
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                         use_rslora=rslora)
        torch.manual_seed(seed)
        if model is None:
            model = get_peft_model(base.model, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    assert model is not None
    return model.eval()


@pytest.fixture(scope="module")
def loras(peft_model: PeftModel) -> dict[str, LoraWeights]:
    out = {}
    for name, (r, alpha, _, _, rslora) in SPECS.items():
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model, adapter_name=name).items()}
        out[name] = LoraWeights.from_peft_state_dict(state, {"r": r, "lora_alpha": alpha, "use_rslora": rslora})
    return out


@pytest.fixture(scope="module")
def module_order(peft_model: PeftModel) -> list[str]:
    return [n for n, _ in peft_model.base_model.model.named_modules()]


def peft_merge(model: PeftModel, names: list[str], weights: list[float], method: str,
               **kw: object) -> tuple[dict[str, torch.Tensor], LoraConfig, dict[str, torch.Tensor]]:
    """PEFT's merged adapter: its deltas (with its own scaling), config and plain B @ A products."""
    name = f"merged{next(_names)}"
    model.add_weighted_adapter(names, weights, name, combination_type=method, **kw)
    deltas, products = {}, {}
    try:
        with torch.no_grad():
            for path, mod in model.base_model.model.named_modules():
                if isinstance(mod, LoraLayer) and name in mod.lora_A:
                    prod = mod.lora_B[name].weight @ mod.lora_A[name].weight  # (n_out, n_in)
                    products[path] = prod
                    deltas[path] = mod.scaling[name] * prod  # (n_out, n_in)
        cfg = model.peft_config[name]
    finally:
        model.delete_adapter(name)
    return deltas, cfg, products


def assert_deltas(ours: LoraWeights, theirs: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    assert set(ours.layers) == set(theirs)
    for path, want in theirs.items():
        got = ours.delta(path)  # (n_out, n_in)
        atol = rtol * float(want.abs().max()) + 1e-9
        assert torch.allclose(got, want, atol=atol, rtol=0), f"{path}: max diff {float((got - want).abs().max()):.3g}"


def seed_first_draw(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Seed torch's global RNG right before PEFT's first DARE draw (its adapter init draws before)."""
    orig = merge_utils.random_pruning
    state = {"first": True}

    def seeded(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
        if state["first"]:
            torch.manual_seed(seed)
            state["first"] = False
        return orig(tensor, density, rescale)

    monkeypatch.setattr(merge_utils, "random_pruning", seeded)


CASES = (
    [(m, *TRIO, {}) for m in MERGE_METHODS]
    + [(m, ("one", "r8qk"), (0.6, 0.8), {}) for m in ("cat", *SVD_METHODS)]  # different ranks and targets
    + [(m, ("one", "qk"), (1.0, 0.5), {}) for m in FACTOR_METHODS]  # same rank, different targets
    + [("ties", *TRIO, {"majority_sign_method": "frequency"}),
       ("dare_ties_svd", *TRIO, {"majority_sign_method": "frequency", "density": 0.3}),
       ("magnitude_prune", *TRIO, {"density": 1.0}),
       ("svd", *TRIO, {"svd_rank": 2}),
       ("svd", *TRIO, {"svd_rank": 6, "svd_clamp": 0.9}),
       ("magnitude_prune_svd", ("one", "r8qk"), (0.6, 0.8), {"svd_rank": 3, "svd_clamp": 0.95}),
       ("svd", ("one",), (0.5,), {}),  # one adapter: PEFT (and merge) fall back to linear
       ("ties", ("r8qk",), (-2.0,), {})]
)


@pytest.mark.parametrize("method,names,weights,kw", CASES,
                         ids=[f"{m}-{'+'.join(n)}-{i}" for i, (m, n, _, _) in enumerate(CASES)])
def test_matches_peft(peft_model: PeftModel, loras: dict[str, LoraWeights], module_order: list[str],
                      monkeypatch: pytest.MonkeyPatch, method: str, names: tuple[str, ...],
                      weights: tuple[float, ...], kw: dict) -> None:
    kw = {"density": 0.6, **kw}
    if method.startswith("dare"):
        seed_first_draw(monkeypatch, 123)
    theirs, cfg, _ = peft_merge(peft_model, list(names), list(weights), method, **kw)
    ours = merge([loras[n] for n in names], list(weights), method, seed=123, layer_order=module_order, **kw)
    assert (ours.rank, ours.alpha, ours.scale) == (cfg.r, cfg.lora_alpha, 1.0)
    assert all(a.shape == (ours.rank, a.shape[1]) and b.shape == (b.shape[0], ours.rank)
               for a, b in ours.layers.values())
    assert_deltas(ours, theirs, rtol=1e-4 if method in SVD_METHODS else 1e-5)


def test_cat_is_exact_weighted_sum(loras: dict[str, LoraWeights]) -> None:
    ads, w = [loras[n] for n in TRIO[0]], list(TRIO[1])
    out = merge(ads, w, "cat")
    assert out.rank == 12
    for path in out.layers:
        want = sum(wi * ad.delta(path) for ad, wi in zip(ads, w, strict=True))  # (n_out, n_in)
        assert torch.allclose(out.delta(path), want, atol=1e-6)


def test_rslora_result_has_scale_one(peft_model: PeftModel, loras: dict[str, LoraWeights]) -> None:
    """PEFT copies use_rslora from the first adapter, so its merged scaling is sqrt(r), not 1; we keep 1."""
    names, w = ["rs", "one"], [0.5, 0.5]
    theirs, cfg, products = peft_merge(peft_model, names, w, "cat")
    assert cfg.use_rslora and cfg.r == 8
    ours = merge([loras[n] for n in names], w, "cat")
    assert not ours.use_rslora and ours.scale == 1.0
    assert_deltas(ours, products)  # the intended merge: PEFT's B @ A at scale 1
    path = next(iter(theirs))
    assert torch.allclose(theirs[path], 8**0.5 * products[path])


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_logits_match_peft(tiny_base_dir: Path, peft_model: PeftModel, loras: dict[str, LoraWeights],
                           method: str) -> None:
    names, w = list(TRIO[0]), list(TRIO[1])
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))  # (B, T)
    name = f"e2e_{method}"
    peft_model.add_weighted_adapter(names, w, name, combination_type=method)
    try:
        peft_model.set_adapter(name)
        with torch.no_grad():
            want = peft_model(input_ids=ids).logits  # (B, T, V)
            with peft_model.disable_adapter():
                base = peft_model(input_ids=ids).logits  # (B, T, V)
    finally:
        peft_model.set_adapter("one")
        peft_model.delete_adapter(name)
    ours = merge([loras[n] for n in names], w, method)
    cfg = {k: v for k, v in ours.peft_config().items() if k != "peft_type"}
    fresh = get_peft_model(load_base(tiny_base_dir).model, LoraConfig(**cfg)).eval()
    loaded = set_peft_model_state_dict(fresh, ours.to_peft_state_dict())
    assert not loaded.unexpected_keys
    with torch.no_grad():
        got = fresh(input_ids=ids).logits  # (B, T, V)
    assert not torch.allclose(base, want, atol=1e-3)  # the adapter matters
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_dare_seeds(loras: dict[str, LoraWeights]) -> None:
    ads, w = [loras["one"], loras["two"]], [0.7, 0.5]
    one = merge(ads, w, "dare_ties", seed=7)
    path = next(iter(one.layers))
    assert torch.equal(one.delta(path), merge(ads, w, "dare_ties", seed=7).delta(path))
    assert not torch.equal(one.delta(path), merge(ads, w, "dare_ties", seed=8).delta(path))
    torch.manual_seed(7)  # seed=None draws from the global RNG
    assert torch.equal(one.delta(path), merge(ads, w, "dare_ties").delta(path))


def test_dare_linear_is_unbiased(loras: dict[str, LoraWeights]) -> None:
    """DARE rescales kept values by 1/density, so its mean over seeds tends to the plain merge."""
    ads, w = [loras["one"], loras["two"]], [0.7, 0.5]
    for method, plain in (("dare_linear", "linear"), ("dare_linear_svd", "cat")):
        want = merge(ads, w, plain)
        path = next(iter(want.layers))
        n = 300
        mean = sum(merge(ads, w, method, density=0.5, seed=s, svd_rank=8).delta(path) for s in range(n)) / n
        err = float((mean - want.delta(path)).norm() / want.delta(path).norm())
        single = merge(ads, w, method, density=0.5, seed=0, svd_rank=8).delta(path)
        assert err < 0.15 < float((single - want.delta(path)).norm() / want.delta(path).norm()), (method, err)


def test_result_is_plain_lora(loras: dict[str, LoraWeights]) -> None:
    out = merge([loras["one"], loras["r8qk"]], [1.0, 1.0], "svd", svd_rank=5)
    assert out.rank == 5 and out.alpha == 5.0 and out.target_modules == ["k_proj", "q_proj", "v_proj"]
    back = LoraWeights.from_peft_state_dict(out.to_peft_state_dict(), out.peft_config())
    assert back.rank == 5 and set(back.layers) == set(out.layers)


def test_svd_rank_above_layer_size_pads(loras: dict[str, LoraWeights]) -> None:
    out = merge([loras["one"], loras["two"]], [1.0, 1.0], "svd", svd_rank=100)
    a, b = next(iter(out.layers.values()))
    assert a.shape[0] == 100 and b.shape[1] == 100
    path = next(iter(out.layers))
    want = loras["one"].delta(path) + loras["two"].delta(path)  # (n_out, n_in)
    assert torch.allclose(out.delta(path), want, atol=1e-5)


@pytest.mark.parametrize("method", ["linear", "cat", "ties_svd"])
def test_half_precision_keeps_dtype(loras: dict[str, LoraWeights], method: str) -> None:
    ads = [loras["one"], loras["two"]]
    half = [LoraWeights(ad.rank, ad.alpha, {p: (a.bfloat16(), b.bfloat16()) for p, (a, b) in ad.layers.items()})
            for ad in ads]
    back = [LoraWeights(ad.rank, ad.alpha, {p: (a.float(), b.float()) for p, (a, b) in ad.layers.items()})
            for ad in half]  # the same values in float32: merge computes in float32 and rounds at the end
    got, want = merge(half, [0.7, 0.5], method), merge(back, [0.7, 0.5], method)
    for path, (a, b) in got.layers.items():
        assert a.dtype == b.dtype == torch.bfloat16
        tol = 0.03 * float(want.delta(path).abs().max())
        assert torch.allclose(got.delta(path), want.delta(path), atol=tol)


@pytest.mark.parametrize("args,kw,match", [
    (([], []), {}, "at least one adapter"),
    ((["one", "two"], [1.0]), {}, "2 adapters but 1 weights"),
    ((["one"], [float("nan")]), {}, "finite"),
    ((["one", "two"], [1.0, 1.0]), {"method": "mean"}, "unknown merge method 'mean'.*linear, cat, svd, ties"),
    ((["one", "two"], [1.0, 1.0]), {"method": "ties", "density": 0.0}, r"density must be in \(0, 1\]"),
    ((["one", "two"], [1.0, 1.0]), {"method": "ties", "density": 1.5}, r"density must be in \(0, 1\]"),
    ((["one", "two"], [1.0, 1.0]), {"majority_sign_method": "vote"}, "'total' or 'frequency'"),
    ((["one", "two"], [1.0, 1.0]), {"method": "svd", "svd_rank": 0}, "svd_rank must be a positive integer"),
    ((["one", "two"], [1.0, 1.0]), {"method": "svd", "svd_clamp": 2.0}, r"svd_clamp .* \[0, 1\]"),
    ((["one", "r8qk"], [1.0, 1.0]), {"method": "ties"},
     r"'ties' needs adapters of equal rank, but adapter 1 has rank 8 while adapter 0 has rank 4.*cat, svd"),
])
def test_errors(loras: dict[str, LoraWeights], args: tuple, kw: dict, match: str) -> None:
    names, w = args
    with pytest.raises(MergeError, match=match):
        merge([loras[n] for n in names], w, **kw)


def test_shape_mismatch_names_layer(loras: dict[str, LoraWeights]) -> None:
    path = next(iter(loras["one"].layers))
    other = LoraWeights(rank=4, alpha=8.0, layers={path: (torch.zeros(4, 10), torch.zeros(7, 4))})  # (r, n_in), (n_out, r)
    with pytest.raises(MergeError, match=f"layer {path}: adapter 1 has A \\(4, 10\\).*same base shape"):
        merge([loras["one"], other], [1.0, 1.0], "cat")
