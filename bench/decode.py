"""Decode throughput of per-row adapter mixtures against the plain base model, in one run.

Workload: greedy generation of ``--new-tokens`` (64) tokens after a ``--prompt`` (32) token prompt, with
a KV cache (one loop over ``forward`` with a ``DynamicCache``, the same loop for every setting), at
batch 1, 4 and 16. A real library (SQLite + blobs in a temp home) of ``--adapters`` (20) rank-8
adapters on all seven projections of the top half of the layers, like the experts
`loramix train adapter` makes; their weights are SYNTHETIC (random, at a trained adapter's scale:
A ~ N(0, 1/n_in), B ~ N(0, 0.005^2), alpha = 2 r), which does not change the arithmetic timed.
Settings, each timed round-robin with the others (median of ``--repeats``):

  base   the PLAIN base model (a separate copy with no injected layers)
  one    loramix, a different adapter per row
  mix3   loramix, a different 3-adapter weighted mixture per row
  mix8   loramix, a different 8-adapter weighted mixture per row

Each loramix generation prepares its batch, runs prefill and decode, and releases it (all timed;
the adapters are already in their slots). Before timing, the run checks that the mixer's logits at
every one of 16 decode steps (folded and kernel paths included) equal those of a copy of the base
with the row's mixture merged into its weights, fed the same tokens.

Run: ``python bench/decode.py [--json] [--repeats 3] [--batches 1,4,16] [--base PATH]``
(``PYTHONPATH=<tree>/src`` picks which loramix mixer is measured, e.g. main's for a before figure).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

import loramix
from loramix.base import load_base
from loramix.config import MixConfig
from loramix.lora import LoraWeights
from loramix.mix import MixedModel
from loramix.store import Library

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SETTINGS = ("base", "one", "mix3", "mix8")
Forward = Callable[..., Any]


def synthetic_adapter(shapes: dict[str, tuple[int, int]], n_layers: int, rank: int, seed: int) -> LoraWeights:
    """Rank-``rank`` adapter on every projection of the top half of the layers, at a trained scale."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for path, (n_in, n_out) in shapes.items():
        if path.rsplit(".", 1)[-1] in TARGETS and int(path.split(".")[2]) >= n_layers // 2:
            a = torch.randn(rank, n_in, generator=g) / n_in ** 0.5  # (r, n_in)
            b = torch.randn(n_out, rank, generator=g) * 0.005  # (n_out, r)
            layers[path] = (a, b)
    return LoraWeights(rank=rank, alpha=2.0 * rank, layers=layers)


def generate(fwd: Forward, ids: torch.Tensor, new_tokens: int, keep: int | None = None,
             seen: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Greedy tokens (B, new_tokens) with a KV cache; ``fwd`` is the model call. With ``seen``, row
    ``keep``'s logits at every step are appended to it (for the check)."""
    cache = DynamicCache()
    with torch.inference_mode():
        logits = fwd(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]  # (B, V)
        out = [logits.argmax(-1, keepdim=True)]  # (B, 1) each
        if seen is not None:
            seen.append(logits[keep].clone())
        for _ in range(new_tokens - 1):
            logits = fwd(input_ids=out[-1], past_key_values=cache, use_cache=True).logits[:, -1]  # (B, V)
            out.append(logits.argmax(-1, keepdim=True))
            if seen is not None:
                seen.append(logits[keep].clone())
    return torch.cat(out, 1)  # (B, new)


def mixer_run(mm: MixedModel, rows: list[list[tuple[str, float]]], ids: torch.Tensor, new_tokens: int,
              kernel: bool | None = None) -> torch.Tensor:
    if kernel is not None:  # this generation with or without the compiled kernel (the batch's plan keeps it)
        mm.cfg.kernel = kernel
    batch = mm.prepare(rows)
    try:
        return generate(lambda **kw: mm.forward(batch, **kw), ids, new_tokens)
    finally:
        mm.release(batch)


def merged_check(plain: torch.nn.Module, lib: Library, mm: MixedModel, rows: list[list[tuple[str, float]]],
                 ids: torch.Tensor, i: int, steps: int) -> float:
    """Max |logit difference| for row ``i`` over ``steps`` greedy decode steps between the mixer (the
    whole batch, every path it takes: folding, the kernel) and a copy of the base with row i's
    mixture merged into its weights, fed the same tokens (teacher forcing)."""
    merged = copy.deepcopy(plain)
    mods = dict(merged.named_modules())
    with torch.no_grad():
        for aid, w in rows[i]:
            weights = lib.load(aid)
            for path in weights.layers:
                mods[path].weight += w * weights.delta(path)  # (n_out, n_in)
    seen: list[torch.Tensor] = []
    batch = mm.prepare(rows)
    try:
        toks = generate(lambda **kw: mm.forward(batch, **kw), ids, steps, keep=i, seen=seen)  # (B, steps)
    finally:
        mm.release(batch)
    with torch.inference_mode():
        full = torch.cat([ids[i], toks[i, :-1]])[None]  # (1, P + steps - 1)
        want = merged(input_ids=full).logits[0, ids.shape[1] - 1:]  # (steps, V)
    return float((torch.stack(seen) - want).abs().max())


def note(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=20)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--base", default=None, help="base model folder (default SmolLM2-135M-Instruct)")
    ap.add_argument("--home", default=None, help="library home (default: a new temp dir)")
    ap.add_argument("--no-kernel", action="store_true", help="the mixer's torch forms only (no compiled kernel)")
    ap.add_argument("--no-fold", action="store_true", help="never fold a shared mixture into the weights")
    ap.add_argument("--compare-kernel", action="store_true",
                    help="also time mix3/mix8 at the largest batch with the torch forms (no kernel), round-robin")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    load0 = os.getloadavg()

    base = load_base(args.base)
    plain = copy.deepcopy(base.model)  # the base model with no injected layer, for the base setting
    n_layers = base.model.config.num_hidden_layers
    home = Path(args.home or tempfile.mkdtemp(prefix="loramix-bench-decode-"))
    lib = Library(home / "library", base_shapes=base.linear_shapes())
    shapes = base.linear_shapes()
    names = [lib.add_weights(synthetic_adapter(shapes, n_layers, args.rank, seed=i), f"decode-{i}").id
             for i in range(args.adapters)]
    cfg = MixConfig(capacity=64)
    for name, off in (("kernel", args.no_kernel), ("fold_after", args.no_fold)):  # older trees lack the switches
        if off and hasattr(cfg, name):
            setattr(cfg, name, type(getattr(cfg, name))(0))
    mm = MixedModel(base, lib.load, cfg)
    kernel_on = getattr(cfg, "kernel", None)
    note(f"library of {len(names)} adapters ready in {home}")

    def rows_for(setting: str, nb: int) -> list[list[tuple[str, float]]]:
        if setting == "one":
            return [[(names[i % len(names)], 1.0)] for i in range(nb)]
        k = 3 if setting == "mix3" else 8
        ws = [0.5 ** j for j in range(k)]
        return [[(names[(k * i + j) % len(names)], w / sum(ws)) for j, w in enumerate(ws)] for i in range(nb)]

    g = torch.Generator().manual_seed(0)
    vocab = base.model.config.vocab_size
    prompts = {nb: torch.randint(0, vocab, (nb, args.prompt), generator=g) for nb in batches}  # (B, P)
    runs: dict[str, Callable[[], torch.Tensor]] = {}
    for nb in batches:
        for setting in SETTINGS:
            if setting == "base":
                runs[f"base_b{nb}"] = lambda nb=nb: generate(plain, prompts[nb], args.new_tokens)
            else:
                runs[f"{setting}_b{nb}"] = (lambda nb=nb, setting=setting:
                                            mixer_run(mm, rows_for(setting, nb), prompts[nb], args.new_tokens, kernel_on))
    if args.compare_kernel and hasattr(cfg, "kernel"):  # the torch forms as peers in the same round-robin
        nb = max(batches)
        for setting in ("mix3", "mix8"):
            runs[f"{setting}_torch_b{nb}"] = (lambda nb=nb, setting=setting:
                                              mixer_run(mm, rows_for(setting, nb), prompts[nb], args.new_tokens, False))

    nb_max = max(batches)
    nb_min = min(batches)
    steps = min(args.new_tokens, 16)
    checks = {f"mix3_b{nb_min}_row0": merged_check(plain, lib, mm, rows_for("mix3", nb_min), prompts[nb_min], 0, steps),
              f"mix8_b{nb_max}_row{nb_max - 1}": merged_check(plain, lib, mm, rows_for("mix8", nb_max), prompts[nb_max],
                                                               nb_max - 1, steps)}
    ok = all(v < 1e-3 for v in checks.values())
    note(f"checks {checks}")

    for fn in runs.values():  # warm-up: loads every adapter into its slot
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(args.repeats):
        note(f"repeat {rep + 1}/{args.repeats}")
        for key, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    res: dict[str, float] = {}
    for key, ts in times.items():
        nb = int(key.rsplit("_b", 1)[1])
        res[key] = nb * args.new_tokens / statistics.median(ts)
    for nb in batches:
        for setting in SETTINGS[1:]:
            res[f"{setting}_b{nb}_x"] = res[f"{setting}_b{nb}"] / res[f"base_b{nb}"]
    for key in [k for k in list(res) if "_torch_" in k]:
        res[key + "_x"] = res[key] / res[f"base_b{key.rsplit('_b', 1)[1]}"]
    load1 = os.getloadavg()

    print("command: python bench/decode.py " + " ".join(sys.argv[1:]))
    print(f"mixer: loramix from the {Path(loramix.__file__).parents[2].name!r} tree; {args.adapters} synthetic rank-{args.rank} "
          f"adapters (random weights at a trained scale) on {len(TARGETS)} projections x top {n_layers - n_layers // 2} "
          f"layers; prompt {args.prompt}, {args.new_tokens} new tokens, greedy, KV cache; "
          f"{torch.get_num_threads()} threads; median of {args.repeats}, round-robin; "
          f"kernel={kernel_on} fold_after={getattr(cfg, 'fold_after', 'n/a')}")
    print(f"load average before {load0[0]:.1f}, after {load1[0]:.1f} (cores: {os.cpu_count()})")
    print(f"check, logits over {steps} greedy steps vs a copy with the row's deltas merged: " + ", ".join(f"{k} max|diff| {v:.2e}" for k, v in checks.items())
          + (" OK" if ok else " MISMATCH"))
    print(f"  {'batch':>5} " + " ".join(f"{s + ' tok/s':>12}" for s in SETTINGS) + "   one/base mix3/base mix8/base")
    for nb in batches:
        print(f"  {nb:>5} " + " ".join(f"{res[f'{s}_b{nb}']:12.1f}" for s in SETTINGS) + "   "
              + " ".join(f"{res[f'{s}_b{nb}_x']:8.3f}" for s in SETTINGS[1:]))
    extra = [k for k in res if "_torch_" in k and not k.endswith("_x")]
    if extra:
        print("  torch forms (no kernel), same round-robin: " + ", ".join(
            f"{k} {res[k]:.1f} tok/s ({res[k + '_x']:.3f}x)" for k in extra))
    targets = {"mix3_b1_x": 0.95, "mix3_b16_x": 0.95, "mix8_b16_x": 0.85}
    print("targets: " + ", ".join(f"{k} >= {v}: {'PASS' if res.get(k, 0) >= v else 'FAIL'} ({res.get(k, 0):.3f})"
                                  for k, v in targets.items() if k in res))
    if args.json:
        out: dict[str, Any] = {k: round(v, 3) for k, v in res.items()}
        out.update(check_ok=ok, check_max_diff=max(checks.values()), load_before=round(load0[0], 1),
                   load_after=round(load1[0], 1), threads=torch.get_num_threads(), repeats=args.repeats)
        print(json.dumps(out))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
