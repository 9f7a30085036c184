"""Continuous batching: batched rows give the tokens they give alone, and every request ends exactly once."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from loramix.base import BaseModel, load_base
from loramix.config import MixConfig
from loramix.errors import ConfigError, MixError, Overloaded
from loramix.lora import LoraWeights
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

Mix = list[tuple[str, float]]


@pytest.fixture
def base(tiny_base_dir: Path) -> BaseModel:
    """The tiny llama with larger random weights: its default init repeats one token forever under greedy
    decoding, which would make token-parity checks weak; this one writes varied text."""
    b = load_base(tiny_base_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in b.model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return b


@pytest.fixture
def adapters(base: BaseModel) -> dict[str, LoraWeights]:
    return {f"a{i}": random_lora(base, seed=i + 1, std=0.2) for i in range(6)}


def mixer(base: BaseModel, adapters: dict[str, LoraWeights], capacity: int = 8,
          loader: Callable[[str], LoraWeights] | None = None) -> MixedModel:
    return MixedModel(base, loader or adapters.__getitem__, MixConfig(capacity=capacity, max_rank=4))


def prompt(base: BaseModel, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, base.model.config.vocab_size, (n,), generator=g).tolist()


def greedy(base: BaseModel, i: int, mix: Mix, n_prompt: int, n_new: int, **kw: Any) -> GenRequest:
    return GenRequest(prompt(base, n_prompt, seed=100 + i), mix, SamplingParams(max_new_tokens=n_new, ignore_eos=True, **kw))


def reference(mm: MixedModel, req: GenRequest) -> tuple[list[int], list[float]]:
    """Greedy decoding with no KV cache: the whole sequence is recomputed for every token."""
    ids, toks, lps = list(req.prompt_ids), [], []
    for _ in range(req.params.max_new_tokens):
        logits = mm.logits(torch.tensor([ids]), rows=[req.mixture])[0, -1].float()  # (V,)
        t = int(logits.argmax())
        toks.append(t)
        lps.append(float(torch.log_softmax(logits, -1)[t]))
        ids.append(t)
    return toks, lps


class Recorder:
    """Collects each request's events and the global order in which they arrived."""

    def __init__(self) -> None:
        self.events: dict[Any, list[TokenEvent | FinishEvent]] = {}
        self.order: list[tuple[Any, str]] = []
        self.done: dict[Any, threading.Event] = {}

    def __call__(self, key: Any, then: Callable[[TokenEvent | FinishEvent], None] | None = None
                 ) -> Callable[[TokenEvent | FinishEvent], None]:
        self.events[key], self.done[key] = [], threading.Event()

        def on_event(ev: TokenEvent | FinishEvent) -> None:
            self.events[key].append(ev)
            self.order.append((key, "fin" if isinstance(ev, FinishEvent) else "tok"))
            if then is not None:
                then(ev)
            if isinstance(ev, FinishEvent):
                self.done[key].set()
        return on_event

    def wait(self, timeout: float = 30.0) -> None:
        for key, ev in list(self.done.items()):
            assert ev.wait(timeout), f"request {key} never finished"

    def tokens(self, key: Any) -> list[int]:
        return [e.id for e in self.events[key] if isinstance(e, TokenEvent)]

    def logprobs(self, key: Any) -> list[float]:
        return [e.logprob for e in self.events[key] if isinstance(e, TokenEvent)]

    def finish(self, key: Any) -> FinishEvent:
        return check_events(self.events[key])

    def first(self, key: Any, kind: str) -> int:
        return self.order.index((key, kind))


def check_events(events: list[TokenEvent | FinishEvent]) -> FinishEvent:
    """Exactly one FinishEvent, last; the token texts add up to its text; logprobs finite and <= 0."""
    fins = [e for e in events if isinstance(e, FinishEvent)]
    assert len(fins) == 1 and events[-1] is fins[0], events
    toks = [e for e in events if isinstance(e, TokenEvent)]
    assert fins[0].generated_tokens == len(toks)
    assert "".join(e.text for e in toks) == fins[0].text
    assert all(math.isfinite(e.logprob) and e.logprob <= 0 for e in toks)
    return fins[0]


def alone(sched: Scheduler, req: GenRequest) -> tuple[list[int], list[float], FinishEvent]:
    toks, fin = sched.generate(req, timeout=30)
    check_events([*toks, fin])
    return [e.id for e in toks], [e.logprob for e in toks], fin


MIXES: list[Mix] = [
    [("a1", 0.7), ("a2", 0.3)],
    [],
    [("a0", 1.0)],
    [("a3", 0.5), ("a4", 0.3), ("a5", 0.2)],
    [("a2", 1.0), ("a0", 0.0)],  # a zero weight: only a2 is used
    [("a4", -0.5), ("a1", 1.2)],
    [],
    [("a5", 0.9), ("a3", 0.1)],
]


def test_batched_equals_alone_and_reference(base: BaseModel, adapters: dict[str, LoraWeights]) -> None:
    """THE parity test: 22 greedy requests with different mixtures and prompt lengths; 12 start together,
    10 join while the target (row 0) runs; the batch is full (16 rows) part of the time, rows leave at
    different times. Every row's tokens equal the tokens it gives alone, which equal a cache-free reference."""
    mm = mixer(base, adapters)
    reqs = [greedy(base, i, MIXES[i % len(MIXES)], n_prompt=2 + (i * 7) % 29, n_new=4 + (i * 5) % 21)
            for i in range(22)]
    reqs[0] = greedy(base, 0, MIXES[0], n_prompt=9, n_new=24)

    solo = Scheduler(mm)
    want = [alone(solo, r) for r in reqs]
    solo.stop()
    for r, (toks, _, fin) in zip(reqs, want, strict=True):
        assert fin.reason == "length" and len(toks) == r.params.max_new_tokens
        assert fin.text == mm.tokenizer.decode(toks, skip_special_tokens=True)  # incremental detokenisation
    ref_toks, ref_lps = reference(mm, reqs[0])
    assert want[0][0] == ref_toks
    assert want[0][1] == pytest.approx(ref_lps, abs=1e-4)
    for i in (1, 3, 5):  # a base-only row and two mixtures, also against the cache-free reference
        assert want[i][0] == reference(mm, reqs[i])[0]
    # transformers' own generate on the same mixture (its KV cache, its greedy loop)
    with mm.mixture([reqs[0].mixture]), torch.inference_mode():
        out = mm.model.generate(input_ids=torch.tensor([reqs[0].prompt_ids]), do_sample=False,  # type: ignore[operator]
                                max_new_tokens=24, attention_mask=torch.ones(1, 9, dtype=torch.long))
    hf = out[0, 9:].tolist()
    assert hf == want[0][0][:len(hf)] and (len(hf) == 24 or hf[-1] in solo.eos_ids)
    # the mixture matters: the same prompt under the base model or another mixture gives other tokens
    assert reference(mm, GenRequest(reqs[0].prompt_ids, [], reqs[0].params))[0] != want[0][0]
    assert reference(mm, GenRequest(reqs[0].prompt_ids, MIXES[3], reqs[0].params))[0] != want[0][0]

    sched = Scheduler(mm, SchedulerConfig(max_batch=16, max_prefill_tokens=64))
    rec = Recorder()
    running_seen: list[int] = []

    def on_target(ev: TokenEvent | FinishEvent) -> None:
        running_seen.append(sched.stats().running)
        if isinstance(ev, TokenEvent) and len(rec.events[0]) == 3:  # 3rd token: 10 more requests arrive
            for i in range(12, 22):
                sched.submit(reqs[i], rec(i))

    for i in range(12):
        sched.submit(reqs[i], rec(i, on_target if i == 0 else None))
    sched.start()
    rec.wait()
    while len(rec.events) < 22:
        time.sleep(0.01)
    rec.wait()
    sched.stop()

    for i, (toks, lps, _) in enumerate(want):
        fin = rec.finish(i)
        assert fin.reason == "length", (i, fin)
        assert rec.tokens(i) == toks, f"request {i} ({reqs[i].mixture}) differs when batched"
        assert rec.logprobs(i) == pytest.approx(lps, abs=1e-4)
    assert max(running_seen) == 16  # the batch was full while the target ran
    start, end = rec.first(0, "tok"), rec.first(0, "fin")
    joined = [i for i in range(1, 22) if start < rec.first(i, "tok") < end]
    left = [i for i in range(1, 22) if start < rec.first(i, "fin") < end]
    assert len(joined) >= 5 and len(left) >= 5, (joined, left)
    st = sched.stats()
    assert st.finished == {"length": 22} and st.queue_len == 0 and st.running == 0
    assert max(st.batch_sizes) == 16 and st.prefill_steps >= 3
    assert mm.stats()["pinned"] == 0  # every MixBatch was released


def test_max_batch_one_runs_requests_one_at_a_time(base: BaseModel, adapters: dict[str, LoraWeights]) -> None:
    mm = mixer(base, adapters)
    reqs = [greedy(base, i, MIXES[i], n_prompt=3 + 4 * i, n_new=6) for i in range(5)]
    solo = Scheduler(mm)
    want = [alone(solo, r)[0] for r in reqs]
    solo.stop()
    sched = Scheduler(mm, SchedulerConfig(max_batch=1))
    rec = Recorder()
    for i, r in enumerate(reqs):
        sched.submit(r, rec(i))
    sched.start()
    rec.wait()
    sched.stop()
    assert [rec.tokens(i) for i in range(5)] == want
    assert set(sched.stats().batch_sizes) == {1}
    # one at a time, in order: each request finishes before the next one's first token
    assert [k for k, kind in rec.order if kind == "fin"] == list(range(5))
    assert all(rec.first(i, "fin") < rec.first(i + 1, "tok") for i in range(4))


def sampled(base: BaseModel, i: int, mix: Mix, seed: int | None, **kw: Any) -> GenRequest:
    params = {"max_new_tokens": 16, "temperature": 0.9, "top_p": 0.95, "ignore_eos": True, "seed": seed, **kw}
    return GenRequest(prompt(base, 5 + i, seed=200 + i), mix, SamplingParams(**params))


def test_seeded_sampling_is_deterministic_alone_and_batched(base: BaseModel, adapters: dict[str, LoraWeights]) -> None:
    mm = mixer(base, adapters)
    solo = Scheduler(mm)
    reqs = [sampled(base, i, MIXES[i], seed=10 + i, top_k=[None, 50, 5, None][i]) for i in range(4)]
    want = [alone(solo, r)[0] for r in reqs]
    assert want[0] == alone(solo, reqs[0])[0]  # same seed, same tokens
    other = alone(solo, sampled(base, 0, MIXES[0], seed=999))[0]
    assert other != want[0]  # another seed samples otherwise
    unseeded = alone(solo, sampled(base, 0, MIXES[0], seed=None))
    assert unseeded[2].seed is not None  # the seed drawn is reported, and replays the same tokens
    assert alone(solo, sampled(base, 0, MIXES[0], seed=unseeded[2].seed))[0] == unseeded[0]
    # top_k = 1 keeps only the most likely token: greedy, whatever the temperature
    g = greedy(base, 7, MIXES[3], n_prompt=6, n_new=12)
    k1 = GenRequest(g.prompt_ids, g.mixture, SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=3,
                                                            ignore_eos=True))
    assert alone(solo, k1)[0] == alone(solo, g)[0]
    solo.stop()

    sched = Scheduler(mm, SchedulerConfig(max_batch=8))
    rec = Recorder()
    for i, r in enumerate(reqs):
        sched.submit(r, rec(i))
    for j in range(4):  # greedy and sampled neighbours with other seeds
        sched.submit(sampled(base, 10 + j, MIXES[4 + j], seed=j) if j % 2 else
                     greedy(base, 10 + j, MIXES[4 + j], 7, 12), rec(f"n{j}"))
    sched.start()
    rec.wait()
    sched.stop()
    for i in range(4):
        assert rec.tokens(i) == want[i], f"seeded request {i} differs when batched"
        rec.finish(i)


def test_stop_strings_eos_and_length(base: BaseModel, adapters: dict[str, LoraWeights]) -> None:
    mm = mixer(base, adapters)
    sched = Scheduler(mm)
    req = greedy(base, 1, MIXES[0], n_prompt=6, n_new=24)
    toks, _, fin = alone(sched, req)
    assert fin.reason == "length" and fin.generated_tokens == 24
    text = fin.text
    assert len(text) > 20, text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = text.find(stop)
    stopped = GenRequest(req.prompt_ids, req.mixture, SamplingParams(max_new_tokens=24, stop=["zzzq", stop]))
    s_toks, _, s_fin = alone(sched, stopped)
    assert s_fin.reason == "stop"
    assert s_fin.text == text[:cut]  # the stop string and what follows are left out
    assert s_toks == toks[:len(s_toks)] and len(s_toks) < 24
    # eos: pretend the 5th generated token is the end-of-sequence token
    eos = toks[4]
    first = toks.index(eos)
    sched_eos = Scheduler(mm, eos_ids={eos})
    e_toks, _, e_fin = alone(sched_eos, GenRequest(req.prompt_ids, req.mixture, SamplingParams(max_new_tokens=24)))
    assert e_fin.reason == "eos" and e_toks == toks[:first + 1]
    kept = alone(sched_eos, req)  # ignore_eos=True keeps going to the length limit
    assert kept[2].reason == "length" and kept[0] == toks
    short = alone(sched, GenRequest(req.prompt_ids, req.mixture, SamplingParams(max_new_tokens=1)))
    assert short[2].reason == "length" and short[0] == toks[:1]
    sched.stop()
    sched_eos.stop()


def test_stop_string_split_across_tokens_is_held_back(base: BaseModel, adapters: dict[str, LoraWeights]) -> None:
    """Text that may start a stop string is not streamed until it is known not to be one."""
    mm = mixer(base, adapters)
    sched = Scheduler(mm)
    req = greedy(base, 2, MIXES[2], n_prompt=5, n_new=30)
    toks, _, fin = alone(sched, req)
    pieces = [mm.tokenizer.decode(toks[: i + 1]) for i in range(len(toks))]
    # a stop string that ends inside a later token than the one it starts in
    i = next(i for i in range(1, len(toks)) if len(pieces[i]) - len(pieces[i - 1]) >= 1 and len(pieces[i - 1]) >= 2)
    stop = pieces[i][len(pieces[i - 1]) - 2: len(pieces[i - 1]) + 1]
    events: list[TokenEvent | FinishEvent] = []
    sched.submit(GenRequest(req.prompt_ids, req.mixture, SamplingParams(max_new_tokens=30, stop=[stop])),
                 events.append)
    sched.start()
    while not events or not isinstance(events[-1], FinishEvent):
        time.sleep(0.01)
    f = check_events(events)
    assert f.reason == "stop" and f.text == fin.text[: fin.text.find(stop)]
    assert stop not in "".join(e.text for e in events if isinstance(e, TokenEvent))
    sched.stop()


def test_cancel_running_and_waiting(base: BaseModel, adapters: dict[str, LoraWeights]) -> None:
    mm = mixer(base, adapters)
    sched = Scheduler(mm, SchedulerConfig(max_batch=2))
    rec = Recorder()
    handles: dict[str, Any] = {}

    def cancel_at_5(ev: TokenEvent | FinishEvent) -> None:
        if len(rec.events["long"]) == 5:
            handles["long"].cancel()

    handles["long"] = sched.submit(greedy(base, 1, MIXES[0], 5, 200), rec("long", cancel_at_5))
    handles["other"] = sched.submit(greedy(base, 2, MIXES[3], 5, 30), rec("other"))
    handles["queued"] = sched.submit(greedy(base, 3, MIXES[2], 5, 30), rec("queued"))
    handles["queued"].cancel()  # still waiting (max_batch=2): leaves without a token
    sched.start()
    rec.wait()
    sched.stop()
    long_fin, queued_fin, other_fin = rec.finish("long"), rec.finish("queued"), rec.finish("other")
    assert long_fin.reason == "cancelled" and 5 <= long_fin.generated_tokens <= 6
    assert queued_fin.reason == "cancelled" and queued_fin.generated_tokens == 0
    assert other_fin.reason == "length" and other_fin.generated_tokens == 30


def test_admission_waits_for_free_slots(base: BaseModel, adapters: dict[str, LoraWeights]) -> None:
    """3 slots: a request that needs two more adapters than are free waits (nothing fails), a later one that
    fits passes it, and it runs once the running rows release their adapters."""
    mm = mixer(base, adapters, capacity=3)
    want = {}
    reqs = {"A": greedy(base, 1, [("a0", 0.5), ("a1", 0.5)], 5, 20),
            "B": greedy(base, 2, [("a2", 0.5), ("a3", 0.5)], 5, 8),
            "C": greedy(base, 3, [("a2", 1.0)], 5, 6),
            "D": greedy(base, 4, [], 5, 6)}
    solo = Scheduler(mm)
    for k, r in reqs.items():
        want[k] = alone(solo, r)[0]
    solo.stop()
    with pytest.raises(MixError, match="4 adapters but the mixer has 3 slots"):
        solo.submit(GenRequest([5], [("a0", 1), ("a1", 1), ("a2", 1), ("a3", 1)]), print)

    sched = Scheduler(mm, SchedulerConfig(max_batch=8))
    rec = Recorder()
    seen: list[Any] = []

    def watch(ev: TokenEvent | FinishEvent) -> None:
        if len(rec.events["A"]) == 2:
            seen.append(sched.stats())

    for k, r in reqs.items():
        sched.submit(r, rec(k, watch if k == "A" else None))
    sched.start()
    rec.wait()
    sched.stop()
    for k in reqs:
        assert rec.finish(k).reason == "length" and rec.tokens(k) == want[k], k
    assert rec.first("B", "tok") > rec.first("A", "fin")  # B waited for A's adapters to leave
    assert rec.first("C", "tok") < rec.first("A", "fin")  # C fitted next to A and passed B
    assert rec.first("D", "tok") < rec.first("A", "fin")
    assert seen[0].waiting_adapters == ["a2", "a3"] and seen[0].queue_len == 1
    assert seen[0].running_adapters == ["a0", "a1", "a2"] and seen[0].running == 3


def test_admission_bypass_is_bounded(base: BaseModel, adapters: dict[str, LoraWeights]) -> None:
    mm = mixer(base, adapters, capacity=3)
    sched = Scheduler(mm, SchedulerConfig(max_bypass=1))
    rec = Recorder()
    sched.submit(greedy(base, 1, [("a0", 0.5), ("a1", 0.5)], 5, 12), rec("A"))
    sched.submit(greedy(base, 2, [("a2", 0.5), ("a3", 0.5)], 5, 4), rec("B"))  # does not fit next to A
    sched.submit(greedy(base, 3, [("a2", 1.0)], 5, 4), rec("C"))  # fits: passes B (1 bypass, the bound)
    sched.submit(greedy(base, 4, [], 5, 4), rec("D"))  # would fit, but B has waited long enough
    sched.start()
    rec.wait()
    sched.stop()
    assert all(rec.finish(k).reason == "length" for k in "ABCD")
    assert rec.first("C", "tok") < rec.first("A", "fin")
    assert rec.first("B", "tok") > rec.first("A", "fin")
    assert rec.first("D", "tok") > rec.first("B", "tok")


def test_overloaded_when_queue_full_or_stopped(base: BaseModel, adapters: dict[str, LoraWeights]) -> None:
    mm = mixer(base, adapters)
    sched = Scheduler(mm, SchedulerConfig(max_queue=2))
    rec = Recorder()
    sched.submit(greedy(base, 1, [], 4, 3), rec(1))
    sched.submit(greedy(base, 2, [], 4, 3), rec(2))
    with pytest.raises(Overloaded, match="max_queue=2"):
        sched.submit(greedy(base, 3, [], 4, 3), rec(3))
    del rec.done[3]
    sched.start()
    rec.wait()
    assert sched.stats().finished == {"length": 2}
    sched.stop()
    with pytest.raises(Overloaded, match="stopping"):
        sched.submit(greedy(base, 4, [], 4, 3), print)


def test_bad_requests_are_refused_at_submit(base: BaseModel, adapters: dict[str, LoraWeights]) -> None:
    sched = Scheduler(mixer(base, adapters))
    with pytest.raises(ConfigError, match="empty"):
        sched.submit(GenRequest([], []), print)
    with pytest.raises(ConfigError, match="out of range"):
        sched.submit(GenRequest([1, 10**6], []), print)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1)
    assert sched.stats().queue_len == 0


def test_a_failing_adapter_fails_only_its_requests(base: BaseModel, adapters: dict[str, LoraWeights]) -> None:
    def loader(aid: str) -> LoraWeights:
        if aid == "broken":
            raise OSError("blob of adapter 'broken' is unreadable")
        return adapters[aid]

    mm = mixer(base, adapters, loader=loader)
    reqs = [greedy(base, i, MIXES[i], 4 + i, 10) for i in range(4)]
    solo = Scheduler(mm)
    want = [alone(solo, r)[0] for r in reqs]
    solo.stop()
    sched = Scheduler(mm)
    rec = Recorder()
    for i, r in enumerate(reqs):
        sched.submit(r, rec(i))
        sched.submit(greedy(base, 10 + i, [("a0", 0.5), ("broken", 0.5)], 5, 10), rec(f"bad{i}"))
    sched.start()
    rec.wait()
    for i in range(4):
        assert rec.finish(i).reason == "length" and rec.tokens(i) == want[i]
        bad = rec.finish(f"bad{i}")
        assert bad.reason == "error" and "unreadable" in (bad.error or "") and bad.generated_tokens == 0
    # a failure inside a decode step fails the rows of that step; the scheduler keeps serving
    real_forward = mm.forward
    calls = {"n": 0}

    def flaky(batch: Any, **kw: Any) -> Any:
        if kw["input_ids"].shape[1] == 1:
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("simulated device error")
        return real_forward(batch, **kw)

    mm.forward = flaky  # type: ignore[method-assign]
    rec2 = Recorder()
    sched.submit(reqs[0], rec2("x"))
    sched.submit(reqs[1], rec2("y"))
    rec2.wait()
    for k in "xy":
        f = rec2.finish(k)
        assert f.reason == "error" and "simulated device error" in (f.error or "") and f.generated_tokens == 3
    toks, fin = sched.generate(reqs[2], timeout=30)
    assert fin.reason == "length" and [e.id for e in toks] == want[2]
    sched.stop()
    assert mm.stats()["pinned"] == 0


def test_a_failing_prefill_fails_only_its_row(base: BaseModel, adapters: dict[str, LoraWeights]) -> None:
    """The prompts are prefilled together; when that call fails, each is retried alone."""
    mm = mixer(base, adapters)
    reqs = [greedy(base, i, MIXES[i], 4 + 3 * i, 8) for i in range(3)]
    poison = next(t for t in range(3, 400) if all(t not in r.prompt_ids for r in reqs))
    solo = Scheduler(mm)
    want = [alone(solo, r)[0] for r in reqs]
    solo.stop()
    real_forward = mm.forward

    def picky(batch: Any, **kw: Any) -> Any:
        ids = kw["input_ids"]
        if ids.shape[1] > 1 and bool((ids == poison).any()):
            raise ValueError("this prompt upsets the model")
        return real_forward(batch, **kw)

    mm.forward = picky  # type: ignore[method-assign]
    sched = Scheduler(mm)
    rec = Recorder()
    for i, r in enumerate(reqs):
        sched.submit(r, rec(i))
    sched.submit(GenRequest([5, poison, 6], MIXES[0], SamplingParams(max_new_tokens=8)), rec("bad"))
    sched.start()
    rec.wait()
    sched.stop()
    assert [rec.tokens(i) for i in range(3)] == want
    bad = rec.finish("bad")
    assert bad.reason == "error" and "upsets" in (bad.error or "") and bad.generated_tokens == 0
    assert sched.stats().prefill_steps == 3  # the failed group call is not counted; 3 rows retried alone


def test_a_raising_callback_cancels_only_its_request(base: BaseModel, adapters: dict[str, LoraWeights]) -> None:
    mm = mixer(base, adapters)
    sched = Scheduler(mm)
    rec = Recorder()
    got: list[TokenEvent | FinishEvent] = []

    def rude(ev: TokenEvent | FinishEvent) -> None:
        got.append(ev)
        if len(got) == 2:
            raise ValueError("client went away")

    h = sched.submit(greedy(base, 1, MIXES[0], 5, 30), rude)
    sched.submit(greedy(base, 2, MIXES[3], 5, 12), rec("ok"))
    sched.start()
    rec.wait()
    assert h.done.wait(10)
    assert isinstance(got[-1], FinishEvent) and got[-1].reason == "cancelled" and len(got) <= 5
    assert rec.finish("ok").reason == "length"
    sched.stop()


def test_stop_cancels_waiting_and_running(base: BaseModel, adapters: dict[str, LoraWeights]) -> None:
    mm = mixer(base, adapters)
    sched = Scheduler(mm, SchedulerConfig(max_batch=1))
    rec = Recorder()
    started = threading.Event()
    for i in range(3):
        sched.submit(greedy(base, i, MIXES[i], 5, 400), rec(i, lambda ev: started.set()))
    sched.start()
    assert started.wait(10)
    sched.stop()
    rec.wait(5)
    assert [rec.finish(i).reason for i in range(3)] == ["cancelled"] * 3
    assert rec.finish(0).generated_tokens >= 1 and rec.finish(2).generated_tokens == 0
    assert mm.stats()["pinned"] == 0


def test_lock_is_held_around_model_steps(base: BaseModel, adapters: dict[str, LoraWeights]) -> None:
    """Another user of the model holding the lock pauses the scheduler, which resumes when it is released."""
    mm = mixer(base, adapters)
    lock = threading.RLock()
    sched = Scheduler(mm, lock=lock)
    sched.start()
    rec = Recorder()
    with lock:
        sched.submit(greedy(base, 1, MIXES[0], 5, 4), rec(1))
        time.sleep(0.2)
        assert rec.events[1] == []
        mm.logits(torch.tensor([[5, 6, 7]]), rows=[[("a3", 1.0)]])  # e.g. scoring, meanwhile
    rec.wait()
    assert rec.finish(1).reason == "length"
    sched.stop()


def test_many_threads_submitting_at_once(base: BaseModel, adapters: dict[str, LoraWeights]) -> None:
    """generate() from 8 client threads at once: every request completes with its alone tokens."""
    mm = mixer(base, adapters)
    reqs = [greedy(base, i, MIXES[i % len(MIXES)], 3 + i % 9, 4 + i % 7) for i in range(16)]
    solo = Scheduler(mm)
    want = [alone(solo, r)[0] for r in reqs]
    solo.stop()
    sched = Scheduler(mm, SchedulerConfig(max_batch=6))
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            for i in (k, k + 8):
                toks, fin = sched.generate(reqs[i], timeout=30)
                assert fin.reason == "length"
                got[i] = [e.id for e in toks]
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    sched.stop()
    assert not errors, errors
    assert [got[i] for i in range(16)] == want
    assert max(sched.stats().batch_sizes) > 1


def test_freed_memory_is_released_once_each_time_the_batch_drains(base: BaseModel, adapters: dict[str, LoraWeights],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import loramix.serve.scheduler as sched_mod
    from loramix.serve.memory import release_free_memory

    assert release_free_memory() is True  # glibc (Linux CI): malloc_trim is there
    calls: list[float] = []
    monkeypatch.setattr(sched_mod, "release_free_memory", lambda: calls.append(time.monotonic()) or True)
    sched = Scheduler(mixer(base, adapters))
    sched.start()
    assert not calls  # idle from the start: nothing ran, nothing to release
    for rnd in range(2):
        rec = Recorder()
        for i in range(3):  # three rows in one drained batch: one release, not one per row or per step
            sched.submit(greedy(base, i, MIXES[i], n_prompt=4, n_new=5), rec(i))
        rec.wait()
        deadline = time.monotonic() + 5
        while len(calls) < rnd + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert len(calls) == rnd + 1
    sched.stop()
