"""Throughput of the continuous-batching scheduler on the real base, with and without batching.

Workload: ``--requests`` greedy requests submitted at once, each with a chat prompt and its own
3-adapter weighted mixture over a pool of ``--adapters`` random adapters (rank 8, q/k/v/o/up/down of
every layer), ``--new-tokens`` tokens each (eos ignored). Settings, timed round-robin ``--repeats``
times in one process (median wall time per setting):

  batched    SchedulerConfig(max_batch=requests): every request decodes in one batch
  nobatch    SchedulerConfig(max_batch=1): requests run one after another
  base       batched, every request on the base model (no adapter)

Check: every request's tokens are the same in ``batched`` and ``nobatch`` (greedy parity).
Run: ``python bench/scheduler.py [--requests 16] [--new-tokens 32] [--repeats 3] [--json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from loramix.base import load_base
from loramix.config import MixConfig
from loramix.mix import MixedModel
from loramix.serve.scheduler import (
    FinishEvent,
    GenRequest,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    TokenEvent,
)
from loramix.testing import random_lora

TOPICS = ["the sea", "a city at night", "bread", "rain", "mountains", "a library", "trains", "winter",
          "bees", "the moon", "coffee", "a river", "chess", "old maps", "gardens", "thunder"]


def run(sched: Scheduler, reqs: list[GenRequest]) -> tuple[float, list[list[int]]]:
    """Submit all at once, wait for all; wall seconds and each request's tokens."""
    toks: list[list[int]] = [[] for _ in reqs]
    fins: list[FinishEvent] = []

    def on_event(i: int):  # noqa: ANN202
        def cb(ev: TokenEvent | FinishEvent) -> None:
            if isinstance(ev, FinishEvent):
                fins.append(ev)
            else:
                toks[i].append(ev.id)
        return cb

    t = time.perf_counter()
    handles = [sched.submit(r, on_event(i)) for i, r in enumerate(reqs)]
    for h in handles:
        h.done.wait()
    wall = time.perf_counter() - t
    assert all(f.reason == "length" for f in fins), [f.error for f in fins if f.reason != "length"]
    return wall, toks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--base", default=None)
    ap.add_argument("--json", action="store_true", help="only the JSON line")
    args = ap.parse_args()

    base = load_base(args.base)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    pool = {f"x{i}": random_lora(base, rank=8, alpha=16, seed=i, std=0.01, targets=targets)
            for i in range(args.adapters)}
    mm = MixedModel(base, pool.__getitem__, MixConfig(capacity=64))
    g = torch.Generator().manual_seed(0)
    reqs, base_reqs = [], []
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    for i in range(args.requests):
        ids = base.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Write a short poem about {TOPICS[i % len(TOPICS)]}."}],
            add_generation_prompt=True, return_dict=True)["input_ids"]
        pick = torch.randperm(args.adapters, generator=g)[:3].tolist()
        w = torch.softmax(torch.randn(3, generator=g), 0).tolist()
        reqs.append(GenRequest(list(ids), [(f"x{j}", wj) for j, wj in zip(pick, w, strict=True)], params))
        base_reqs.append(GenRequest(list(ids), [], params))

    scheds = {"batched": Scheduler(mm, SchedulerConfig(max_batch=args.requests)),
              "nobatch": Scheduler(mm, SchedulerConfig(max_batch=1))}
    for s in scheds.values():
        s.start()
    settings = {"batched": (scheds["batched"], reqs), "nobatch": (scheds["nobatch"], reqs),
                "base": (scheds["batched"], base_reqs)}
    run(scheds["batched"], reqs[:2])  # warm-up: loads adapters, first-call costs
    times: dict[str, list[float]] = {k: [] for k in settings}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, (s, rs) in settings.items():
            wall, tokens[name] = run(s, rs)
            times[name].append(wall)
    for s in scheds.values():
        s.stop()
    same = tokens["batched"] == tokens["nobatch"]
    n_tok = args.requests * args.new_tokens
    tok_s = {k: n_tok / statistics.median(v) for k, v in times.items()}
    res = {"requests": args.requests, "new_tokens": args.new_tokens, "adapters": args.adapters,
           "repeats": args.repeats, "threads": torch.get_num_threads(),
           **{f"tok_s_{k}": round(v, 1) for k, v in tok_s.items()},
           "speedup_batched_vs_nobatch": round(tok_s["batched"] / tok_s["nobatch"], 2),
           "mix_vs_base": round(tok_s["batched"] / tok_s["base"], 3),
           "batched_equals_nobatch": same}
    if not args.json:
        for k, v in tok_s.items():
            print(f"{k:8s} {v:8.1f} tok/s  (median of {args.repeats}: "
                  f"{', '.join(f'{t:.2f}s' for t in times[k])})")
        print(f"greedy tokens batched == nobatch: {same}")
    print(json.dumps(res))
    if not same:
        raise SystemExit("batched and unbatched runs generated different tokens")


if __name__ == "__main__":
    main()
