"""Throughput of per-row adapter mixing against the plain base model and PEFT, all in one round-robin.

Workload: a batch of 16 sequences x 128 tokens (one forward pass, like a prefill), 50 adapters in a
real library (rank 8, all seven linear modules of the top half of the layers, like the experts
`loramix train adapter` makes). Every setting below is timed in the same round-robin loop (one call
of each per round, median over rounds), so drift and other load hit all alike:

  base                  the plain base model: no injected layers
  one_adapter           loramix, a different adapter per row
  mix3                  loramix, a different 3-adapter weighted mixture per row
  peft_one_adapter      PEFT mixed-batch inference (``adapter_names``), one adapter per row
  peft_mix3             PEFT doing the mixture workload as a server must when routed weights differ
                        per query: one adapter per row built with ``add_weighted_adapter(...,
                        combination_type="cat")`` (the exact weighted sum of the deltas), the forward,
                        then the built adapters deleted; building counts
  peft_mix3_cached      the same mixtures built once beforehand (mixtures that repeat): forward only
  decode_base           the plain base model generating with its KV cache: batch 16, a 16-token
                        prompt (not timed), then one new token per step for ``--decode-steps`` steps
  decode_mix3           the same decode with a different 3-adapter mixture per row (loramix
                        ``prepare`` once per request, then ``forward`` per step; prepare is timed)

Check in the run: loramix's mix3 and one-adapter logits are compared with PEFT's on the same
mixtures (``logits_max_abs_diff``; the run fails if they differ by more than ``--tol``).

Run: ``python bench/mix_throughput.py [--json] [--repeats 5] [--base PATH]``; the last line with
``--json`` is one JSON object of the figures (tok/s) and the check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from loramix.base import load_base
from loramix.config import MixConfig
from loramix.mix import MixedModel
from loramix.store import Library
from loramix.testing import random_lora

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHTS = (0.5, 0.3, 0.2)


def timed(fns: dict[str, Callable[[], float | None]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, round-robin; a function may return its own timing
    (seconds of the part it measures), else the whole call is timed."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t = time.perf_counter()
            own = fn()
            times[key].append(own if own is not None else time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def decode_loop(step: Callable[..., object], prompt: torch.Tensor, steps: int) -> float:
    """Greedy decode with the KV cache; returns the seconds of the ``steps`` one-token steps."""
    with torch.inference_mode():
        mask = torch.ones_like(prompt)  # (B, T)
        out = step(input_ids=prompt, attention_mask=mask, use_cache=True)
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(dim=-1)  # (B, 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)  # (B, T + s)
            out = step(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=50)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--tol", type=float, default=1e-3, help="max |logit difference| loramix vs PEFT")
    ap.add_argument("--base", default=None, help="base model folder (default SmolLM2-135M-Instruct)")
    args = ap.parse_args()
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    nb, nt = args.batch, args.tokens
    plain = load_base(args.base)  # the base row: no injected layers anywhere
    n_layers = plain.model.config.num_hidden_layers
    tmp = Path(tempfile.mkdtemp(prefix="loramix-bench-"))
    lib = Library(tmp / "library", base_shapes=plain.linear_shapes())
    names = []
    for i in range(args.adapters):
        w = random_lora(plain, rank=args.rank, alpha=2.0 * args.rank, seed=i, targets=TARGETS, std=0.02)
        w.layers = {p: v for p, v in w.layers.items() if int(p.split(".")[2]) >= n_layers // 2}
        names.append(lib.add_weights(w, f"bench-{i}").id)
    ids = torch.randint(0, plain.model.config.vocab_size, (nb, nt))  # (B, T)
    mask = torch.ones_like(ids)  # (B, T)
    prompt = ids[:, :16]  # (B, 16) decode prompt
    one = [[(names[i % len(names)], 1.0)] for i in range(nb)]
    mix3 = [[(names[(3 * i + j) % len(names)], w) for j, w in enumerate(WEIGHTS)] for i in range(nb)]

    mm = MixedModel(load_base(args.base), lib.load, MixConfig(capacity=max(64, 3 * nb)))
    mm.logits(ids, mask, rows=mix3)  # load every adapter used

    cfg = LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank, target_modules=list(TARGETS), lora_dropout=0.0,
                     layers_to_transform=list(range(n_layers // 2, n_layers)))
    pm: PeftModel = get_peft_model(load_base(args.base).model, cfg, adapter_name="unused")
    for aid in names:
        lib.export(aid, tmp / "peft" / aid)
        pm.load_adapter(str(tmp / "peft" / aid), adapter_name=aid)
    pm.eval()
    one_names = [r[0][0] for r in one]

    def build(prefix: str) -> list[str]:
        built = []
        for i, row in enumerate(mix3):
            pm.add_weighted_adapter([a for a, _ in row], [w for _, w in row], f"{prefix}-{i}", combination_type="cat")
            built.append(f"{prefix}-{i}")
        return built

    cached = build("cached")

    def peft(adapter_names: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            return pm(input_ids=ids, attention_mask=mask, adapter_names=adapter_names).logits  # (B, T, V)

    def peft_mix3_rebuilt() -> None:
        built = build("mix")
        peft(built)
        for name in built:
            pm.delete_adapter(name)

    # the check: same mixtures, same logits
    diff = {"mix3": float((mm.logits(ids, mask, rows=mix3) - peft(cached)).abs().max()),
            "one_adapter": float((mm.logits(ids, mask, rows=one) - peft(one_names)).abs().max())}

    def plain_logits() -> None:
        with torch.inference_mode():
            plain.model(input_ids=ids, attention_mask=mask)

    def decode_mix3() -> float:
        t0 = time.perf_counter()
        batch = mm.prepare(mix3)  # per request: timed with the steps
        prep = time.perf_counter() - t0
        try:
            return prep + decode_loop(lambda **kw: mm.forward(batch, **kw), prompt, args.decode_steps)
        finally:
            mm.release(batch)

    def call(fn: Callable[..., object], *a: object, **kw: object) -> Callable[[], None]:
        return lambda: (fn(*a, **kw), None)[1]

    fns: dict[str, Callable[[], float | None]] = {
        "base_tok_s": plain_logits,
        "one_adapter_tok_s": call(mm.logits, ids, mask, rows=one),
        "mix3_tok_s": call(mm.logits, ids, mask, rows=mix3),
        "peft_one_adapter_tok_s": call(peft, one_names),
        "peft_mix3_tok_s": peft_mix3_rebuilt,
        "peft_mix3_cached_tok_s": call(peft, cached),
        "decode_base_tok_s": lambda: decode_loop(plain.model, prompt, args.decode_steps),
        "decode_mix3_tok_s": decode_mix3,
    }
    secs = timed(fns, args.repeats)
    res = {k: (nb * args.decode_steps if k.startswith("decode_") else nb * nt) / v for k, v in secs.items()}

    b, db = res["base_tok_s"], res["decode_base_tok_s"]
    print(f"batch {nb} x {nt} tokens (decode: {args.decode_steps} steps after a 16-token prompt), {args.adapters} "
          f"adapters in the library (rank {args.rank}), {torch.get_num_threads()} threads, median of {args.repeats} "
          "round-robin rounds")
    for key, val in res.items():
        ref = db if key.startswith("decode_") else b
        print(f"  {key:<24} {val:9.1f} tok/s   {val / ref:5.2f}x base")
    print(f"  loramix mix3 vs PEFT mix3: rebuilt {res['mix3_tok_s'] / res['peft_mix3_tok_s']:.1f}x, cached "
          f"{res['mix3_tok_s'] / res['peft_mix3_cached_tok_s']:.2f}x; one adapter vs PEFT "
          f"{res['one_adapter_tok_s'] / res['peft_one_adapter_tok_s']:.2f}x")
    ok = max(diff.values()) <= args.tol
    print(f"  check: max |logits loramix - PEFT| mix3 {diff['mix3']:.2e}, one adapter {diff['one_adapter']:.2e} "
          f"-> {'OK' if ok else 'MISMATCH'} (tol {args.tol})")
    print(f"  target: decode mix3 >= 0.85x decode base -> "
          f"{'PASS' if res['decode_mix3_tok_s'] >= 0.85 * db else 'FAIL'} ({res['decode_mix3_tok_s'] / db:.2f}x)")
    if args.json:
        print(json.dumps({**{k: round(v, 2) for k, v in res.items()}, "logits_max_abs_diff": diff, "logits_match": ok}))
    if not ok:
        raise SystemExit(f"loramix and PEFT logits differ by {max(diff.values()):.3g} > {args.tol}")


if __name__ == "__main__":
    main()
