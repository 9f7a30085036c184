"""/metrics after real requests against a real server (uvicorn, the tiny llama, a real library)."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from loramix.serve.metrics import EngineStats, Metrics, outcome_of
from tests.serve.conftest import Served


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(url + "/metrics", headers=headers or {}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def value(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_real_requests(served: Served) -> None:
    before = scrape(served.url)
    chat = {"model": "botany:0.5,computing:0.5", "max_tokens": 6, "messages": [{"role": "user", "content": "hi"}],
            "ignore_eos": True}
    completion_tokens = prompt_tokens = 0
    for _ in range(2):
        r = httpx.post(served.url + "/v1/chat/completions", json=chat, timeout=60)
        assert r.status_code == 200
        completion_tokens += r.json()["usage"]["completion_tokens"]
        prompt_tokens += r.json()["usage"]["prompt_tokens"]
    with httpx.stream("POST", served.url + "/v1/chat/completions", timeout=60,
                      json={**chat, "model": "bible", "stream": True, "stream_options": {"include_usage": True}}) as s:
        text = s.read().decode()
    usage = [line for line in text.splitlines() if '"usage"' in line and '"choices":[]' in line]
    assert usage
    import json

    u = json.loads(usage[-1][len("data: "):])["usage"]
    completion_tokens += u["completion_tokens"]
    prompt_tokens += u["prompt_tokens"]
    assert httpx.post(served.url + "/v1/chat/completions", json={**chat, "model": "nope"}).status_code == 404
    assert httpx.get(served.url + "/no/such/path").status_code == 404
    after = scrape(served.url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = "/v1/chat/completions"
    assert delta("loramix_http_requests_total", route=route, outcome="ok") == 3
    assert delta("loramix_http_requests_total", route=route, outcome="not_found") == 1
    assert delta("loramix_http_requests_total", route="unmatched", outcome="not_found") == 1  # no raw paths
    assert delta("loramix_http_request_duration_seconds_count", route=route) == 4
    assert delta("loramix_http_request_duration_seconds_sum", route=route) > 0
    assert delta("loramix_generations_total", finish_reason="length") == 3
    assert delta("loramix_generation_tokens_total") == completion_tokens == 18
    assert delta("loramix_prompt_tokens_total") == prompt_tokens
    assert delta("loramix_time_to_first_token_seconds_count") == 3
    assert delta("loramix_time_to_first_token_seconds_sum") > 0
    assert delta("loramix_time_per_output_token_seconds_count") == 3
    assert delta("loramix_e2e_request_latency_seconds_count") == 3
    assert delta("loramix_request_queue_seconds_count") == 3
    # read from the engine at scrape time
    cap = served.lm.mixer.stats()["capacity"]
    assert value(after, "loramix_adapter_slots") == cap
    assert value(after, "loramix_adapters_loaded") >= 3  # botany, computing, bible
    assert delta("loramix_adapter_slot_hits_total") + delta("loramix_adapter_slot_misses_total") >= 3
    assert value(after, "loramix_adapter_load_seconds_total") > 0
    assert value(after, "loramix_num_requests_running") == 0 and value(after, "loramix_num_requests_waiting") == 0
    assert delta("loramix_decode_batch_size_count") >= 15  # 3 generations of 6 tokens: 5 decode steps each
    assert value(after, "loramix_max_batch") == 8
    info = [(k, v) for k, v in after.items() if k[0] == "loramix_lora_requests_info"]
    assert len(info) == 1
    labels = dict(info[0][0][1])
    assert labels == {"max_lora": str(cap), "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert info[0][1] > 1.7e9  # the scrape time, as vLLM sets it
    # the app's own registry: nothing of ours in prometheus-client's global one
    assert REGISTRY.get_sample_value("loramix_generation_tokens_total") is None


def test_summary_json_follows_the_metrics(served: Served) -> None:
    s0 = httpx.get(served.url + "/metrics/summary").json()
    r = httpx.post(served.url + "/v1/completions", json={"model": "botany", "prompt": "leaves", "max_tokens": 4,
                                                         "ignore_eos": True}, timeout=60)
    assert r.status_code == 200
    s1 = httpx.get(served.url + "/metrics/summary").json()
    assert s1["generations"] == s0["generations"] + 1
    assert s1["generated_tokens"] == s0["generated_tokens"] + 4
    assert s1["requests"] >= s0["requests"] + 2  # the completion and the first summary
    assert s1["ttft_mean_ms"] > 0 and s1["max_lora"] == served.lm.mixer.stats()["capacity"]


def test_running_adapters_show_while_a_generation_runs() -> None:
    m = Metrics()
    m.attach(lambda: EngineStats(queue_len=2, running=3, running_adapters=["a", "b"], waiting_adapters=["c"],
                                 max_lora=8, adapters_loaded=3, slot_hits=5, slot_misses=3, slot_evictions=1,
                                 adapter_load_seconds=0.25, steps=7, max_batch=8, last_batch_size=3,
                                 decode_batch_sizes={1: 2, 3: 4, 8: 1}))
    fams = {f.name: f for f in text_string_to_metric_families(m.text().decode())}
    sample = fams["loramix_lora_requests_info"].samples[0]
    assert sample.labels == {"running_lora_adapters": "a,b", "waiting_lora_adapters": "c", "max_lora": "8"}
    assert fams["loramix_num_requests_running"].samples[0].value == 3
    assert fams["loramix_num_requests_waiting"].samples[0].value == 2
    assert fams["loramix_adapter_slot_evictions"].samples[0].value == 1
    assert fams["loramix_adapter_load_seconds"].samples[0].value == 0.25
    hist = {(s.name, s.labels.get("le")): s.value for s in fams["loramix_decode_batch_size"].samples}
    assert hist[("loramix_decode_batch_size_bucket", "1.0")] == 2
    assert hist[("loramix_decode_batch_size_bucket", "2.0")] == 2
    assert hist[("loramix_decode_batch_size_bucket", "4.0")] == 6
    assert hist[("loramix_decode_batch_size_bucket", "8.0")] == hist[("loramix_decode_batch_size_bucket", "+Inf")] == 7
    assert hist[("loramix_decode_batch_size_count", None)] == 7 and hist[("loramix_decode_batch_size_sum", None)] == 22
    m2 = Metrics()
    m2.attach(lambda: None)  # an engine that is not started reports nothing, and the scrape still works
    assert b"loramix_num_requests_running" not in m2.text()


@pytest.mark.parametrize(("status", "outcome"), [(200, "ok"), (401, "unauthorized"), (403, "forbidden"),
                                                 (404, "not_found"), (400, "invalid"), (422, "invalid"),
                                                 (429, "overloaded"), (408, "timeout"), (413, "too_large"),
                                                 (500, "error")])
def test_outcomes(status: int, outcome: str) -> None:
    assert outcome_of(status) == outcome
