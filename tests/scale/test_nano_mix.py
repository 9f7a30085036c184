"""The summed-core nano mixing op equals applying each adapter's delta, and equals the LoRA mixer on
the same adapters expanded to LoRA form."""

from __future__ import annotations

import torch

from loramix.mix.nano import nano_mix, nano_mix_reference
from loramix.mix.ops import mixed_lora


def test_nano_mix_matches_reference_and_lora_form():
    g = torch.Generator().manual_seed(0)
    n_in, n_out, r, s, b, t, k = 48, 40, 6, 7, 5, 9, 3
    u, _ = torch.linalg.qr(torch.randn(n_out, r, generator=g))  # (n_out, r)
    v, _ = torch.linalg.qr(torch.randn(n_in, r, generator=g))  # (n_in, r)
    vh = v.T.contiguous()  # (r, n_in)
    cores = torch.randn(s, r, r, generator=g)  # (S, r, r)
    x = torch.randn(b, t, n_in, generator=g)  # (B, T, n_in)
    idx = torch.randint(0, s, (b, k), generator=g)  # (B, k)
    w = torch.rand(b, k, generator=g)  # (B, k)
    w[1, 2] = 0.0  # padding entry
    got = nano_mix(x, u, vh, cores, idx, w)
    torch.testing.assert_close(got, nano_mix_reference(x, u, vh, cores, idx, w), atol=1e-4, rtol=1e-4)
    a_slots = vh.expand(s, r, n_in)  # (S, r, n_in): A = Vh for every nano adapter
    b_slots = (u @ cores).transpose(1, 2)  # (S, r, n_out): (B = U M) stored transposed, scale 1
    torch.testing.assert_close(got, mixed_lora(x, a_slots, b_slots, idx, w), atol=1e-4, rtol=1e-4)
