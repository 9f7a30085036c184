import itertools

import pytest
import torch

from loramix.mix import kernel, mixed_lora, reference_mix
from loramix.mix.ops import build_factors, dense_is_cheaper, make_plan, slot_kernel

GRID = list(itertools.product([1, 3, 16], [1, 2, 3], [1, 4, 16], [torch.float32, torch.bfloat16], [1, 7]))


@pytest.mark.parametrize("batch,k,rank,dtype,tokens", GRID)
def test_fast_path_matches_reference(batch: int, k: int, rank: int, dtype: torch.dtype, tokens: int) -> None:
    g = torch.Generator().manual_seed(batch * 100 + k * 10 + rank)
    slots, n_in, n_out = 6, 24, 40
    x = torch.randn(batch, tokens, n_in, generator=g).to(dtype)  # (B, T, n_in)
    a = torch.randn(slots, rank, n_in, generator=g).to(dtype)  # (S, r, n_in)
    b = torch.randn(slots, rank, n_out, generator=g).to(dtype)  # (S, r, n_out)
    idx = torch.randint(0, slots, (batch, k), generator=g)  # (B, k)
    w = torch.rand(batch, k, generator=g)  # (B, k)
    w[0, -1] = 0.0  # a padding entry
    got = mixed_lora(x, a, b, idx, w)
    want = reference_mix(x, a, b, idx, w)
    assert got.shape == (batch, tokens, n_out)
    tol = 1e-4 if dtype == torch.float32 else 0.05
    scale = want.float().abs().max().clamp(min=1.0)
    assert torch.allclose(got.float(), want.float(), atol=tol * float(scale), rtol=tol)


def test_rows_do_not_leak() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g)
    a, b = torch.randn(3, 2, 8, generator=g), torch.randn(3, 2, 4, generator=g)
    idx = torch.tensor([[1], [2]])
    w = torch.ones(2, 1)
    both = mixed_lora(x, a, b, idx, w)
    x2 = x.clone()
    x2[1] = 1000.0  # changing row 1 must not move row 0
    again = mixed_lora(x2, a, b, idx, w)
    assert torch.equal(both[0], again[0])
    assert not torch.allclose(both[1], again[1])


def _slots(g: torch.Generator, n_slots: int, rank: int, n_in: int, n_out: int, dtype: torch.dtype):
    """Slot tensors at slot rank ``rank`` holding adapters of true rank 1..rank (zero-padded), one slot empty."""
    a = torch.zeros(n_slots, rank, n_in)  # (S, R, n_in)
    b = torch.zeros(n_slots, rank, n_out)  # (S, R, n_out)
    ranks = []
    for s in range(n_slots):
        r = 0 if s == n_slots - 1 else 1 + s % rank
        a[s, :r] = torch.randn(r, n_in, generator=g)
        b[s, :r] = torch.randn(r, n_out, generator=g)
        ranks.append(r)
    return a.to(dtype), b.to(dtype), ranks


def _reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: list[dict[int, float]]) -> torch.Tensor:
    k = max(1, max(len(r) for r in rows))
    idx = torch.zeros(len(rows), k, dtype=torch.long)  # (B, k)
    w = torch.zeros(len(rows), k)  # (B, k)
    for i, row in enumerate(rows):
        for j, (s, v) in enumerate(row.items()):
            idx[i, j], w[i, j] = s, v
    return reference_mix(x, a, b, idx, w)


@pytest.mark.parametrize("batch,k,rank,dtype,tokens", GRID)
def test_every_plan_matches_reference(batch: int, k: int, rank: int, dtype: torch.dtype, tokens: int) -> None:
    """Each path (same mixture; rows differing, dense and gather forms) against the float64 loops;
    a base-only row in a mixed batch gets exactly the base output."""
    g = torch.Generator().manual_seed(batch * 100 + k * 10 + rank + 7)
    n_slots, n_in, n_out = 7, 24, 40
    a, b, ranks = _slots(g, n_slots, rank, n_in, n_out, dtype)
    x = torch.randn(batch, tokens, n_in, generator=g).to(dtype)  # (B, T, n_in)
    y0 = torch.randn(batch, tokens, n_out, generator=g).to(dtype)  # (B, T, n_out) a base layer's output
    tol = 1e-4 if dtype == torch.float32 else 0.05

    def check(rows: list[dict[int, float]], kind: str) -> None:
        plan = make_plan(rows)
        assert plan is not None and plan.kind == kind
        factors = build_factors(plan, a, b, ranks)
        want = _reference(x, a, b, rows).float()  # (B, T, n_out)
        if factors is None:  # only the empty slot was drawn: the layer stays the base layer
            assert all(ranks[s] == 0 for row in rows for s in row) and not want.any()
            return
        scale = float(want.abs().max().clamp(min=1.0))
        forms = [None] if kind == "same" else [None, True, False]
        for dense in forms:
            got = factors.add_to(y0.clone(), x, dense=dense)  # (B, T, n_out)
            assert got.dtype == dtype and got.shape == (batch, tokens, n_out)
            assert torch.allclose((got - y0).float(), want, atol=tol * scale, rtol=tol), (kind, dense)
            for i, row in enumerate(rows):
                if not row:
                    assert torch.equal(got[i], y0[i]), "a base-only row must be exactly the base"

    chosen = torch.randperm(n_slots, generator=g)[:k]
    same = {int(s): float(v) for s, v in zip(chosen, torch.rand(k, generator=g), strict=True)}
    check([dict(same) for _ in range(batch)], "same")
    rows = []
    for _ in range(batch):
        chosen = torch.randperm(n_slots, generator=g)[:k]
        rows.append({int(s): float(v) for s, v in zip(chosen, torch.rand(k, generator=g) - 0.3, strict=True)})
    if batch > 1:
        rows[1] = {}  # a base-only row inside a mixed batch
        check(rows, "rows")


def test_plan_picks_dense_for_shared_decode_and_gather_for_prefill() -> None:
    assert dense_is_cheaper(16, 1, 20, 8)  # decode, 8-adapter mixtures over 20 adapters: read each once
    assert not dense_is_cheaper(16, 32, 20, 3)  # prefill: per-row flops dominate
    assert not dense_is_cheaper(16, 1, 48, 3)  # every row its own adapters: nothing shared


def test_no_adapter_and_absent_layer() -> None:
    assert make_plan([{}, {}]) is None
    a, b = torch.zeros(3, 4, 8), torch.zeros(3, 4, 5)
    plan = make_plan([{0: 1.0}, {1: 0.5}])
    assert plan is not None and build_factors(plan, a, b, [0, 0, 0]) is None  # no batch adapter targets it


KERNEL_GRID = list(itertools.product([1, 3, 16], [1, 3, 8], [1, 8, 16], [1, 7],
                                     [(24, 40), (100, 130), (576, 192), (1536, 576)]))


@pytest.mark.parametrize("batch,k,rank,tokens,shape", KERNEL_GRID)
def test_kernel_matches_reference(batch: int, k: int, rank: int, tokens: int, shape: tuple[int, int]) -> None:
    """The compiled per-row kernel against the float64 loops, on small and real layer shapes (a
    partial 64-wide output block included), with weight-0 padding and a base-only row."""
    assert kernel.available(), "the C kernel must compile here (setup.sh installs gcc)"
    n_in, n_out = shape
    g = torch.Generator().manual_seed(batch * 1000 + k * 100 + rank * 10 + tokens)
    u = max(k, 5)
    a = torch.randn(u, rank, n_in, generator=g) / n_in ** 0.5  # (U, r, n_in)
    b = torch.randn(u, rank, n_out, generator=g)  # (U, r, n_out)
    x = torch.randn(batch, tokens, n_in, generator=g)  # (B, T, n_in)
    y0 = torch.randn(batch, tokens, n_out, generator=g)  # (B, T, n_out)
    idx = torch.stack([torch.randperm(u, generator=g)[:k] for _ in range(batch)])  # (B, K)
    w = torch.rand(batch, k, generator=g) - 0.3  # (B, K)
    w[0, -1] = 0.0  # padding
    if batch > 1:
        w[1] = 0.0  # a base-only row
    got = kernel.bgmv(y0.clone(), x, a, b, idx, w)  # (B, T, n_out)
    want = y0.double() + reference_mix(x.double(), a.double(), b.double(), idx, w).double()
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4)
    if batch > 1:
        assert torch.equal(got[1], y0[1]), "a base-only row must be exactly the base"


def test_kernel_rejects_wrong_shapes() -> None:
    assert kernel.available()
    a, b, idx, w = torch.zeros(2, 4, 8), torch.zeros(2, 4, 6), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    with pytest.raises(ValueError, match="expected x"):
        kernel.bgmv(torch.zeros(3, 1, 6), torch.zeros(2, 1, 8), a, b, idx, w)  # 2 rows for a 3-row batch
    with pytest.raises(ValueError, match="float32"):
        kernel.bgmv(torch.zeros(3, 1, 6, dtype=torch.float64), torch.zeros(3, 1, 8), a, b, idx, w)


@pytest.mark.parametrize("batch,k,tokens", [(1, 1, 1), (5, 3, 1), (16, 3, 4), (16, 6, 1)])
def test_slot_kernel_reads_true_ranks_in_place(batch: int, k: int, tokens: int) -> None:
    """The kernel on slot tensors as the mixer holds them (slot rank 16, adapters of rank 1..16 and an
    empty slot), through the plan, against the float64 loops."""
    assert kernel.available()
    g = torch.Generator().manual_seed(batch + k)
    n_slots, n_in, n_out = 7, 100, 130
    a, b, ranks = _slots(g, n_slots, 16, n_in, n_out, torch.float32)
    rows = [{int(s): float(v) for s, v in zip(torch.randperm(n_slots, generator=g)[:k], torch.rand(k, generator=g) + 0.1,
                                               strict=True)} for _ in range(batch)]
    if batch > 1:
        rows[1] = {}
        rows[0] = dict(rows[2])  # two rows share a mixture
    plan = make_plan(rows, kernel=True)
    assert plan is not None
    x = torch.randn(batch, tokens, n_in, generator=g)  # (B, T, n_in)
    y0 = torch.randn(batch, tokens, n_out, generator=g)  # (B, T, n_out)
    op = slot_kernel(plan, a, b, ranks)
    if all(ranks[s] == 0 for s in plan.slots):
        assert op is None
        return
    assert op is not None
    got = op.run(y0.clone(), x)
    want = y0.double() + _reference(x, a, b, rows).double()
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4)
