"""The scheduler's passage KV prefix cache: rows with ``prefix_boundaries`` reuse cached passage prefixes
under their own mixture and still give the tokens of a cache-free recompute, alone and in a batch."""

from __future__ import annotations

import threading

from loramix.base import BaseModel
from loramix.documents import PrefixKVCache
from loramix.lora import LoraWeights
from loramix.serve.scheduler import FinishEvent, GenRequest, SamplingParams, Scheduler, TokenEvent
from tests.serve.test_scheduler import adapters, base, greedy, mixer, prompt, reference  # noqa: F401 - fixtures

HEAD, P1, P2 = 6, 12, 10  # template head, two passages (tokens)


def docs_req(bm: BaseModel, passages: list[int], query_seed: int, mix: list[tuple[str, float]], n_new: int = 6,
             bounds: bool = True) -> GenRequest:
    ids = passages + prompt(bm, 5, seed=query_seed)
    b = [HEAD, HEAD + P1, HEAD + P1 + P2] if bounds else []
    return GenRequest(ids, mix, SamplingParams(max_new_tokens=n_new, ignore_eos=True), prefix_boundaries=b)


def tokens(sched: Scheduler, req: GenRequest) -> list[int]:
    toks, fin = sched.generate(req, timeout=60)
    assert fin.reason == "length", fin
    return [t.id for t in toks]


def test_cached_prefixes_give_the_recomputed_tokens(base: BaseModel, adapters: dict[str, LoraWeights]) -> None:  # noqa: F811
    mm = mixer(base, adapters)
    kv = PrefixKVCache(min_tokens=4)
    sched = Scheduler(mm, prefix_cache=kv)
    shared = prompt(base, HEAD + P1 + P2, seed=7)
    mix = [("a1", 0.7), ("a2", 0.3)]
    try:
        first = docs_req(base, shared, 1, mix)
        assert tokens(sched, first) == reference(mm, first)[0]
        assert (kv.lookups, kv.hits) == (1, 0) and len(kv.stats()) and kv.stats()["entries"] == 3
        second = docs_req(base, shared, 2, mix)  # same passages, another question: both passages reused
        assert tokens(sched, second) == reference(mm, second)[0]
        assert (kv.hits, kv.passage_hits, kv.tokens_reused) == (1, 1, HEAD + P1 + P2)
        other_mix = docs_req(base, shared, 2, [("a0", 1.0)])  # the KV states depend on the adapters: no reuse
        assert tokens(sched, other_mix) == reference(mm, other_mix)[0]
        assert kv.hits == 1
        plain = docs_req(base, shared, 3, mix, bounds=False)  # no boundaries: the ordinary batched prefill
        assert tokens(sched, plain) == reference(mm, plain)[0] and kv.lookups == 3

        # in a batch: cached rows join rows prefilled together and rows already decoding
        reqs = [docs_req(base, shared, 10 + i, mix if i % 2 else [("a3", 1.0)], n_new=4 + i, bounds=i % 3 != 0)
                for i in range(6)] + [greedy(base, 50 + i, [("a4", 0.5)], n_prompt=3 + i, n_new=5) for i in range(3)]
        got: dict[int, list[int]] = {i: [] for i in range(len(reqs))}
        fins: dict[int, FinishEvent] = {}
        done = [threading.Event() for _ in reqs]

        def on_event(i: int):  # type: ignore[no-untyped-def]
            def cb(ev: TokenEvent | FinishEvent) -> None:
                if isinstance(ev, TokenEvent):
                    got[i].append(ev.id)
                else:
                    fins[i] = ev
                    done[i].set()
            return cb

        sched.start()
        for i, r in enumerate(reqs):
            sched.submit(r, on_event(i))
        assert all(d.wait(60) for d in done)
        for i, r in enumerate(reqs):
            assert fins[i].reason == "length" and got[i] == reference(mm, r)[0], i
        assert kv.passage_hits >= 3  # rows 1, 2, 4, 5 carry boundaries; the mix ones hit the earlier entries
    finally:
        sched.stop()
