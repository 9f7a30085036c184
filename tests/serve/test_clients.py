"""Real, unmodified clients (openai, lorax-client sync and async) against a real uvicorn server on
loopback over the tiny llama and a small real library."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import httpx
import lorax
import openai
import pytest
import torch

from loramix.base import load_base
from loramix.store.peft_io import write_peft_dir
from loramix.testing import random_lora
from tests.serve.conftest import Served

MSG = [{"role": "user", "content": "how do flowers grow"}]


@pytest.fixture
def oai(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def test_openai_models(oai: openai.OpenAI, served: Served) -> None:
    models = list(oai.models.list())
    assert [m.id for m in models][0] == "tiny-llama"
    assert {m.id for m in models} >= {"tiny-llama", "botany", "computing", "bible"}
    assert all(getattr(m, "parent", None) == "tiny-llama" for m in models[1:])


def test_openai_chat_greedy_stream_equals_non_stream(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model="botany:0.6,bible:0.4", messages=MSG, max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage is not None
    assert r.usage.completion_tokens >= 1 and r.id.startswith("chatcmpl-")
    assert r.model_extra["loramix"]["adapters"] == [{"name": "botany", "weight": 0.6}, {"name": "bible", "weight": 0.4}]
    chunks = list(oai.chat.completions.create(model="botany:0.6,bible:0.4", messages=MSG, max_tokens=12,
                                              temperature=0, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1


def test_adapters_change_the_output_and_header_names_them(oai: openai.OpenAI) -> None:
    raw = oai.chat.completions.with_raw_response.create(model="bible", messages=MSG, max_tokens=8, temperature=0)
    assert raw.headers["x-loramix-adapters"] == "bible:1.000"
    outs = {m: oai.chat.completions.create(model=m, messages=MSG, max_tokens=8, temperature=0).choices[0].message.content
            for m in ("tiny-llama", "bible", "botany")}
    assert len(set(outs.values())) > 1, outs  # random adapters with std 0.2 move a random tiny model


def test_openai_completions_and_auto(oai: openai.OpenAI) -> None:
    r = oai.completions.create(model="auto", prompt="the flowers and plants of the garden", max_tokens=5,
                               temperature=0, extra_body={"loramix": {"k": 2}})
    assert r.object == "text_completion" and r.usage.completion_tokens >= 1
    used = r.model_extra["loramix"]["adapters"]
    assert len(used) == 2 and used[0]["name"] == "botany" and r.model_extra["loramix"]["routed"]
    chunks = list(oai.completions.create(model="computing", prompt="int main", max_tokens=5, temperature=0, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_openai_sampling_seed_reproduces(oai: openai.OpenAI) -> None:
    kw = {"model": "bible", "messages": MSG, "max_tokens": 10, "temperature": 1.5, "top_p": 0.95}
    a = oai.chat.completions.create(seed=7, **kw).choices[0].message.content
    assert a == oai.chat.completions.create(seed=7, **kw).choices[0].message.content
    others = {oai.chat.completions.create(seed=s, **kw).choices[0].message.content for s in range(8, 12)}
    assert others - {a}


def test_openai_errors(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="nope"):
        oai.chat.completions.create(model="nope", messages=MSG)
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        oai.chat.completions.create(model="bible", messages=MSG, max_tokens=500)
    with pytest.raises(openai.BadRequestError, match="seed"):
        oai.chat.completions.create(model="bible", messages=MSG, seed=2**70)
    with pytest.raises(openai.BadRequestError, match="n=3"):
        oai.chat.completions.create(model="bible", messages=MSG, n=3)


def test_lorax_client_generate_stream_and_merged(served: Served) -> None:
    c = lorax.Client(served.url)
    r = c.generate("in the beginning", adapter_id="bible", max_new_tokens=8)
    assert r.details.generated_tokens == len(r.details.tokens) >= 1
    assert r.details.finish_reason.value in ("length", "eos_token", "stop_sequence")
    assert all(math.isfinite(t.logprob) for t in r.details.tokens)
    stream = list(c.generate_stream("in the beginning", adapter_id="bible", max_new_tokens=8))
    assert stream[-1].generated_text == r.generated_text and stream[-1].details.generated_tokens == len(stream)
    base = c.generate("in the beginning", max_new_tokens=8).generated_text
    assert c.generate("in the beginning", adapter_id="", max_new_tokens=8).generated_text == base
    # linear: an exact output mixture, the same as asking for the mixture by name
    linear = c.generate("in the beginning", max_new_tokens=8, merged_adapters={
        "ids": ["bible", "botany"], "weights": [0.7, 0.3], "merge_strategy": "linear", "density": 1.0})
    by_name = httpx.post(served.url + "/v1/completions", json={"model": "bible:0.7,botany:0.3",
                                                              "prompt": "in the beginning", "max_tokens": 8,
                                                              "temperature": 0}).json()
    assert linear.generated_text == by_name["choices"][0]["text"]
    ties = {"ids": ["bible", "botany"], "weights": [0.5, 0.5], "merge_strategy": "ties", "density": 0.5,
            "majority_sign_method": "total"}
    n_cached = len(served.engine._merged)
    t1 = c.generate("in the beginning", max_new_tokens=6, merged_adapters=ties)
    t2 = c.generate("in the beginning", max_new_tokens=6, merged_adapters=ties)
    assert t1.generated_text == t2.generated_text and len(served.engine._merged) == n_cached + 1
    with pytest.raises(lorax.errors.ValidationError):
        c.generate("x", adapter_id="nope")


def test_lorax_async_client(served: Served) -> None:
    async def go() -> tuple[str, list[str], str]:
        c = lorax.AsyncClient(served.url)
        r = await c.generate("the quick brown fox", adapter_id="computing", max_new_tokens=6)
        toks = [s.token.text async for s in c.generate_stream("the quick brown fox", adapter_id="computing",
                                                              max_new_tokens=6)]
        many = await asyncio.gather(*[c.generate("the quick brown fox", adapter_id=a, max_new_tokens=6)
                                      for a in ("computing", "bible", "botany", "computing")])
        assert many[0].generated_text == many[3].generated_text == r.generated_text
        return r.generated_text, toks, many[1].generated_text

    text, toks, _ = asyncio.run(go())
    assert "".join(toks) == text


def test_library_over_http(served: Served, tmp_path: Path) -> None:
    folder = write_peft_dir(random_lora(load_base(served.base_dir), seed=21, std=0.2), tmp_path / "up")
    files = {n: (f, (folder / f).read_bytes()) for n, f in
             [("adapter_config", "adapter_config.json"), ("adapter_model", "adapter_model.safetensors")]}
    r = httpx.post(served.url + "/v1/adapters", data={"name": "zoology", "description": "animals and their habits",
                                                      "tags": "science", "examples": "what do lions eat\nbirds"},
                   files=files)
    assert r.status_code == 201, r.text
    assert served.lm.library.get("zoology").has_key  # keyed for routing, as the CLI does
    route = httpx.post(served.url + "/v1/route", json={"query": "what do lions eat", "k": 1}).json()
    assert route["adapters"][0]["name"] == "zoology"
    s = httpx.post(served.url + "/v1/score", json={"text": "the lions eat meat", "model": "zoology"}).json()
    with torch.inference_mode():  # the scheduler's slot tensors are inference tensors
        direct = served.lm.score("the lions eat meat", adapters=[("zoology", 1.0)])
    assert s["tokens"] == direct["tokens"] and abs(s["loss"] - direct["loss"]) < 1e-5
    assert httpx.delete(served.url + "/v1/adapters/zoology").json() == {"deleted": "zoology"}
    assert "zoology" not in served.lm.library


def test_runtime_lora_over_http(served: Served, oai: openai.OpenAI) -> None:
    path = served.lora_dir / "extra"
    r = httpx.post(served.url + "/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": str(path)})
    assert r.status_code == 200, r.text
    assert "extra" in [m.id for m in oai.models.list()]
    assert oai.chat.completions.create(model="extra", messages=MSG, max_tokens=4, temperature=0).usage
    r = httpx.post(served.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(served.home)})
    assert r.status_code == 403
    assert httpx.post(served.url + "/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="extra", messages=MSG, max_tokens=4)


def test_stream_lines_are_single_json_lines(served: Served) -> None:
    with httpx.stream("POST", served.url + "/v1/chat/completions",
                      json={"model": "bible", "messages": MSG, "max_tokens": 6, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        assert ln.startswith("data: ")
        json.loads(ln[6:])


def test_route_over_http_reranks_by_likelihood_unless_asked_not_to(served: Served) -> None:
    """The engine's default route re-ranks with the served base model; ``rerank`` turns it off or on."""
    default = httpx.post(served.url + "/v1/route", json={"query": "what do lions eat", "k": 2}).json()
    assert default["rerank"] == "likelihood" and default["rerank_ms"] > 0
    off = httpx.post(served.url + "/v1/route", json={"query": "what do lions eat", "k": 2, "rerank": "none"}).json()
    assert off["rerank"] == "none" and off["rerank_ms"] == 0
    bad = httpx.post(served.url + "/v1/route", json={"query": "what do lions eat", "rerank": "lm"})
    assert bad.status_code == 400 and "rerank" in bad.text
    r = httpx.post(served.url + "/v1/chat/completions", json={
        "model": "auto", "messages": MSG, "max_tokens": 2, "temperature": 0, "loramix": {"k": 2, "rerank": "none"}})
    assert r.status_code == 200 and r.json()["loramix"]["routed"]


def test_http_rerank_names_are_the_configs() -> None:
    from typing import get_args

    from loramix.config import RERANKS
    from loramix.serve.common import RerankName

    assert set(get_args(RerankName)) == set(RERANKS)
