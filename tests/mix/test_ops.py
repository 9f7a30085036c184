import itertools

import pytest
import torch

from loramix.mix import mixed_lora, reference_mix

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
