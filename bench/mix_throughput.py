"""Throughput of per-row adapter mixing against the base model and PEFT, in one run.

Workload: a batch of 16 sequences x 128 tokens (one forward pass, like a prefill), 50 adapters
in a real library (rank 8, all seven linear modules of the top half of the layers, like the
experts `loramix train adapter` makes). Settings:

  base             the base model alone
  one_adapter      loramix, a different adapter per row
  mix3             loramix, a different 3-adapter weighted mixture per row
  peft_one_adapter PEFT mixed-batch inference (``adapter_names``), one adapter per row
  peft_mix3        PEFT doing the mixture workload the only way it can: one weighted adapter
                   built with ``add_weighted_adapter(combination_type="cat")`` per distinct
                   mixture (building time included), then mixed-batch inference over them

Run: ``python bench/mix_throughput.py [--json] [--repeats 5] [--base PATH]``
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


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, run round-robin so drift hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--adapters", type=int, default=50)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--base", default=None, help="base model folder (default SmolLM2-135M-Instruct)")
    ap.add_argument("--skip-peft", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    nb, nt = args.batch, args.tokens

    base = load_base(args.base)
    n_layers = base.model.config.num_hidden_layers
    tmp = Path(tempfile.mkdtemp(prefix="loramix-bench-"))
    lib = Library(tmp / "library", base_shapes=base.linear_shapes())
    names = []
    for i in range(args.adapters):
        w = random_lora(base, rank=args.rank, alpha=2.0 * args.rank, seed=i, targets=TARGETS, std=0.02)
        w.layers = {p: v for p, v in w.layers.items() if int(p.split(".")[2]) >= n_layers // 2}
        names.append(lib.add_weights(w, f"bench-{i}").id)
    ids = torch.randint(0, base.model.config.vocab_size, (nb, nt))  # (B, T)
    mask = torch.ones_like(ids)
    one = [[(names[i % len(names)], 1.0)] for i in range(nb)]
    mix3 = [[(names[(3 * i + j) % len(names)], w) for j, w in enumerate((0.5, 0.3, 0.2))] for i in range(nb)]

    mm = MixedModel(base, lib.load, MixConfig(capacity=max(64, 3 * nb)))
    mm.logits(ids, mask, rows=mix3)  # load every adapter used so both settings are warm
    secs = timed({"base_tok_s": lambda: mm.logits(ids, mask, rows=[[] for _ in range(nb)]),
                  "one_adapter_tok_s": lambda: mm.logits(ids, mask, rows=one),
                  "mix3_tok_s": lambda: mm.logits(ids, mask, rows=mix3)}, args.repeats)
    res: dict[str, float] = {k: nb * nt / v for k, v in secs.items()}
    mm.remove()

    if not args.skip_peft:
        from peft import LoraConfig, PeftModel, get_peft_model

        pbase = load_base(args.base).model
        first = lib.load(names[0])
        cfg = LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank, target_modules=list(TARGETS), lora_dropout=0.0,
                         layers_to_transform=list(range(n_layers // 2, n_layers)))
        pm: PeftModel = get_peft_model(pbase, cfg, adapter_name=names[0])
        out_dir = tmp / "peft"
        for aid in names:
            lib.export(aid, out_dir / aid)
            if aid != names[0]:
                pm.load_adapter(str(out_dir / aid), adapter_name=aid)
        pm.load_adapter(str(out_dir / names[0]), adapter_name="first")
        del first
        pm.eval()
        row_names = [r[0][0] for r in one]

        def peft_one() -> None:
            with torch.inference_mode():
                pm(input_ids=ids, attention_mask=mask, adapter_names=row_names)


        def peft_mix3() -> None:
            built = []
            for i, row in enumerate(mix3):
                name = f"mix-{i}"
                pm.add_weighted_adapter([a for a, _ in row], [w for _, w in row], name, combination_type="cat")
                built.append(name)
            with torch.inference_mode():
                pm(input_ids=ids, attention_mask=mask, adapter_names=built)
            for name in built:
                pm.delete_adapter(name)

        psecs = timed({"peft_one_adapter_tok_s": peft_one, "peft_mix3_tok_s": peft_mix3}, args.repeats)
        res.update({k: nb * nt / v for k, v in psecs.items()})

    b = res["base_tok_s"]
    print(f"batch {nb} x {nt} tokens, {args.adapters} adapters in the library (rank {args.rank}), "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for key, val in res.items():
        print(f"  {key:<24} {val:9.1f} tok/s   {val / b:5.2f}x base")
    if "peft_mix3_tok_s" in res:
        print(f"  loramix mix3 vs PEFT mix3: {res['mix3_tok_s'] / res['peft_mix3_tok_s']:.1f}x; "
              f"one adapter vs PEFT: {res['one_adapter_tok_s'] / res['peft_one_adapter_tok_s']:.2f}x")
    print(f"  target: mix3 >= 0.9x base -> {'PASS' if res['mix3_tok_s'] >= 0.9 * b else 'FAIL'} "
          f"({res['mix3_tok_s'] / b:.2f}x)")
    if args.json:
        print(json.dumps({k: round(v, 2) for k, v in res.items()}))


if __name__ == "__main__":
    main()
