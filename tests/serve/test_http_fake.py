"""HTTP behaviour of the OpenAI, LoRAX and library routes against the model-free FakeEngine (fast)."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from loramix.base import load_base
from loramix.errors import ConfigError
from loramix.serve.app import create_app
from loramix.serve.engine import FakeEngine, MergeRecipe, RequestTimeout, stream_events
from loramix.serve.library_api import allowed_path
from loramix.serve.scheduler import GenRequest, SamplingParams
from loramix.serve.settings import ServeSettings, is_loopback
from loramix.store.peft_io import write_peft_dir
from loramix.testing import random_lora

CHAT = "/v1/chat/completions"


def chat(c: TestClient, content: str = "hello there", **kw: Any) -> Any:
    return c.post(CHAT, json={"model": "law", "messages": [{"role": "user", "content": content}], "max_tokens": 5,
                              **kw})


def sse_json(text: str) -> list[Any]:
    """The JSON payloads of an SSE body; asserts every event is one `data:` line."""
    events = [e for e in text.split("\n\n") if e.strip()]
    out = []
    for e in events:
        assert e.count("\n") == 0 and e.startswith("data:"), e
        payload = e[len("data:"):].strip()
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


# --- OpenAI ----------------------------------------------------------------------------------------
def test_models_lists_base_first_then_adapters_with_parent(fake_client: TestClient) -> None:
    data = fake_client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["fake-base", "law", "botany", "code"]
    assert data[0]["parent"] is None and all(m["parent"] == "fake-base" for m in data[1:])
    assert all(m["object"] == "model" and isinstance(m["created"], int) and m["root"] == m["id"] for m in data)


def test_chat_completion_shape_usage_and_adapters(fake_client: TestClient) -> None:
    r = chat(fake_client, model="law:0.7,botany:0.3")
    assert r.status_code == 200
    b = r.json()
    assert b["object"] == "chat.completion" and b["id"].startswith("chatcmpl-") and b["created"] > 1.7e9
    choice = b["choices"][0]
    assert choice["message"]["role"] == "assistant" and len(choice["message"]["content"].split()) == 5
    assert choice["finish_reason"] == "length"
    assert b["usage"]["completion_tokens"] == 5 and b["usage"]["total_tokens"] == b["usage"]["prompt_tokens"] + 5
    assert b["loramix"]["adapters"] == [{"name": "law", "weight": 0.7}, {"name": "botany", "weight": 0.3}]
    assert r.headers["x-loramix-adapters"] == "law:0.700,botany:0.300"
    assert chat(fake_client, model="law:0.7,botany:0.3").json()["id"] != b["id"]


def test_base_model_by_id_or_empty(fake_client: TestClient) -> None:
    for model in ("fake-base", ""):
        r = chat(fake_client, model=model)
        assert r.status_code == 200 and r.json()["loramix"]["adapters"] == [] and r.headers["x-loramix-adapters"] == ""


def test_auto_routes_the_last_user_message_with_options(fake_client: TestClient) -> None:
    msgs = [{"role": "user", "content": "contracts"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "plants and flowers"}]
    r = fake_client.post(CHAT, json={"model": "auto", "messages": msgs, "max_tokens": 2, "loramix": {"k": 1}})
    assert r.json()["loramix"]["adapters"][0]["name"] == "botany" and len(r.json()["loramix"]["adapters"]) == 1
    assert r.json()["loramix"]["routed"] is True
    r = fake_client.post(CHAT, json={"model": "auto", "messages": msgs, "max_tokens": 2,
                                     "loramix": {"k": 3, "tags": ["code"]}})
    assert [a["name"] for a in r.json()["loramix"]["adapters"]] == ["code"]


def test_greedy_is_deterministic_and_seed_matters_when_sampling(fake_client: TestClient) -> None:
    a = chat(fake_client, temperature=0).json()["choices"][0]["message"]["content"]
    assert a == chat(fake_client, temperature=0).json()["choices"][0]["message"]["content"]
    s1 = chat(fake_client, temperature=0.8, seed=1).json()["choices"][0]["message"]["content"]
    assert s1 == chat(fake_client, temperature=0.8, seed=1).json()["choices"][0]["message"]["content"]
    assert s1 != chat(fake_client, temperature=0.8, seed=2).json()["choices"][0]["message"]["content"]


def test_stop_and_eos_finish_reasons(fake_client: TestClient) -> None:
    full = chat(fake_client, temperature=0).json()["choices"][0]["message"]["content"]
    stop = full.split()[2]
    b = chat(fake_client, temperature=0, stop=[stop]).json()
    assert b["choices"][0]["finish_reason"] == "stop" and stop not in b["choices"][0]["message"]["content"]
    b = chat(fake_client, "[eos] please", max_tokens=20).json()
    assert b["choices"][0]["finish_reason"] == "stop" and b["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(("body", "param", "needle"), [
    ({"max_tokens": 65}, "max_tokens", "at most 64"),
    ({"max_completion_tokens": 100}, "max_completion_tokens", "at most 64"),
    ({"n": 2}, "n", "n=2"),
    ({"model": "law:abc"}, None, "bad weight"),
    ({"temperature": -1}, "temperature", "temperature"),
    ({"messages": []}, "messages", "messages"),
    ({"messages": "hi"}, "messages", "messages"),
])
def test_bad_chat_input_is_400_in_openai_shape(fake_client: TestClient, body: dict[str, Any], param: str | None,
                                               needle: str) -> None:
    req = {"model": "law", "messages": [{"role": "user", "content": "hi"}], **body}
    r = fake_client.post(CHAT, json=req)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert needle in err["message"]
    if param:
        assert (err["param"] or "").startswith(param)


def test_unknown_model_is_404(fake_client: TestClient) -> None:
    for model in ("nope", "law:0.5,nope:0.5"):
        r = chat(fake_client, model=model)
        assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "model_not_found"


def test_chat_stream_chunks_usage_and_done(fake_client: TestClient) -> None:
    r = chat(fake_client, stream=True, stream_options={"include_usage": True}, temperature=0)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-loramix-adapters"] == "law:1.000"
    ev = sse_json(r.text)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == chat(fake_client, temperature=0).json()["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    no_usage = sse_json(chat(fake_client, stream=True).text)
    assert all("usage" not in c for c in no_usage[:-1])


def test_failure_after_stream_started_is_a_final_error_event(fake_client: TestClient) -> None:
    r = chat(fake_client, "[fail] now", stream=True)
    assert r.status_code == 200
    ev = sse_json(r.text)
    assert ev[-1] == "[DONE]" and "error" in ev[-2] and "failed" in ev[-2]["error"]["message"]
    assert chat(fake_client, "[fail] now").status_code == 500


def test_overloaded_is_429_with_retry_after(fake_client: TestClient) -> None:
    r = chat(fake_client, "[overload]", stream=True)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"
    r = fake_client.post("/generate", json={"inputs": "[overload]"})
    assert r.status_code == 429 and r.json()["error_type"] == "overloaded"


def test_completions_plain_stream_and_list_prompt(fake_client: TestClient) -> None:
    r = fake_client.post("/v1/completions", json={"model": "code", "prompt": "int main", "max_tokens": 3, "echo": True})
    b = r.json()
    assert b["object"] == "text_completion" and b["choices"][0]["text"].startswith("int main")
    ev = sse_json(fake_client.post("/v1/completions", json={"prompt": ["x"], "max_tokens": 3, "stream": True}).text)
    assert ev[-1] == "[DONE]" and ev[-2]["choices"][0]["finish_reason"] == "length"
    r = fake_client.post("/v1/completions", json={"prompt": ["a", "b"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_body_too_large_is_413_in_each_shape(fake_client: TestClient) -> None:
    big = "x" * (70 << 10)
    r = chat(fake_client, big)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = fake_client.post("/generate", json={"inputs": big})
    assert r.status_code == 413 and r.json()["error_type"] == "validation"

    def chunks() -> Any:  # no content-length: the limit still holds
        for _ in range(80):
            yield b"x" * 1024

    r = fake_client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_prompt_token_limit(tmp_path: Path) -> None:
    app = create_app(FakeEngine(), ServeSettings(max_prompt_tokens=10))
    with TestClient(app) as c:
        r = chat(c, "a long prompt over ten bytes")
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


# --- LoRAX ---------------------------------------------------------------------------------------
LORAX_NULLS = {"adapter_id": None, "adapter_source": None, "merged_adapters": None, "api_token": None,
               "best_of": None, "details": True, "do_sample": False, "max_new_tokens": 4, "ignore_eos_token": False,
               "repetition_penalty": None, "return_full_text": False, "seed": None, "stop": [], "temperature": None,
               "top_k": None, "top_p": None, "truncate": None, "typical_p": None, "watermark": False,
               "response_format": None, "decoder_input_details": False, "return_k_alternatives": None,
               "some_future_key": 1}


def test_lorax_root_returns_a_list_with_details(fake_client: TestClient) -> None:
    r = fake_client.post("/", json={"inputs": "hello", "parameters": {**LORAX_NULLS, "adapter_id": "law"},
                                    "stream": False, "unknown": True})
    assert r.status_code == 200, r.text
    [b] = r.json()
    d = b["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 4 and d["prompt_tokens"] == 5
    assert d["prefill"] == [] and d["skipped_tokens"] == 0 and len(d["tokens"]) == 4
    assert all(math.isfinite(t["logprob"]) and t["skipped"] is False for t in d["tokens"])
    assert "".join(t["text"] for t in d["tokens"]) == b["generated_text"]
    g = fake_client.post("/generate", json={"inputs": "hello", "parameters": {**LORAX_NULLS, "adapter_id": "law"}})
    assert g.json() == b


def test_lorax_sampling_reports_a_seed_and_eos_token(fake_client: TestClient) -> None:
    d = fake_client.post("/generate", json={"inputs": "hi", "parameters": {"do_sample": True}}).json()["details"]
    assert isinstance(d["seed"], int)
    d = fake_client.post("/generate", json={"inputs": "[eos]", "parameters": {"max_new_tokens": 9}}).json()["details"]
    assert d["finish_reason"] == "eos_token"
    b = fake_client.post("/generate", json={"inputs": "hi", "parameters": {"return_full_text": True}}).json()
    assert b["generated_text"].startswith("hi")


def test_lorax_stream_last_event_carries_text_and_details(fake_client: TestClient) -> None:
    r = fake_client.post("/", json={"inputs": "hello", "stream": True, "parameters": {"max_new_tokens": 3}})
    ev = sse_json(r.text)
    assert len(ev) == 3 and all(e["generated_text"] is None and e["details"] is None for e in ev[:-1])
    assert ev[-1]["generated_text"] == "".join(e["token"]["text"] for e in ev)
    assert ev[-1]["details"]["generated_tokens"] == 3 and ev[-1]["details"]["finish_reason"] == "length"
    assert sse_json(fake_client.post("/generate_stream", json={"inputs": "hello"}).text)[-1]["details"]
    ev = sse_json(fake_client.post("/generate_stream", json={"inputs": "[fail]"}).text)
    assert ev[-1]["error_type"] == "generation"


def test_lorax_merged_adapters(fake_client: TestClient) -> None:
    m = {"ids": ["law", "code"], "weights": [0.6, 0.4], "merge_strategy": "linear", "density": 1.0,
         "majority_sign_method": None}
    r = fake_client.post("/generate", json={"inputs": "x", "parameters": {"merged_adapters": m}})
    assert r.headers["x-loramix-adapters"] == "law:0.600,code:0.400"
    r = fake_client.post("/generate", json={"inputs": "x", "parameters": {"merged_adapters": {**m, "merge_strategy": "ties"}}})
    assert r.status_code == 200 and r.headers["x-loramix-adapters"] == "ties:1.000"


@pytest.mark.parametrize(("params", "status", "needle"), [
    ({"adapter_id": "nope"}, 404, "nope"),
    ({"merged_adapters": {"ids": ["law"], "weights": [1.0], "merge_strategy": "magic", "density": 1}}, 422, "magic"),
    ({"merged_adapters": {"ids": ["law"], "weights": [1, 2], "density": 1}}, 422, "weights"),
    ({"repetition_penalty": 1.3}, 422, "repetition_penalty"),
    ({"best_of": 2}, 422, "best_of"),
    ({"max_new_tokens": 1000}, 422, "at most 64"),
    ({"adapter_id": "law", "merged_adapters": {"ids": ["law"], "weights": [1], "density": 1}}, 422, "at most one"),
    ({"top_p": 1.5}, 422, "top_p"),
])
def test_lorax_errors(fake_client: TestClient, params: dict[str, Any], status: int, needle: str) -> None:
    r = fake_client.post("/", json={"inputs": "x", "parameters": params})
    assert r.status_code == status, r.text
    b = r.json()
    assert set(b) == {"error", "error_type"} and needle in b["error"] and b["error_type"] == "validation"


def test_lorax_missing_inputs_is_422(fake_client: TestClient) -> None:
    r = fake_client.post("/generate", json={"parameters": {}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation" and "inputs" in r.json()["error"]


def test_info_and_health(fake_client: TestClient) -> None:
    assert fake_client.get("/health").status_code == 200
    i = fake_client.get("/info").json()
    assert i["model_id"] == "fake-base" and i["max_input_length"] > 0 and i["max_best_of"] == 1


# --- library ------------------------------------------------------------------------------------
def test_adapters_list_search_get_delete(fake_client: TestClient) -> None:
    names = [a["name"] for a in fake_client.get("/v1/adapters").json()["data"]]
    assert names == ["law", "botany", "code"]
    assert [a["name"] for a in fake_client.get("/v1/adapters", params={"q": "flowers"}).json()["data"]] == ["botany"]
    assert [a["name"] for a in fake_client.get("/v1/adapters", params={"tags": "code"}).json()["data"]] == ["code"]
    assert fake_client.get("/v1/adapters/law").json()["description"] == "contracts and torts law"
    r = fake_client.get("/v1/adapters/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert fake_client.delete("/v1/adapters/law").json() == {"deleted": "law"}
    assert fake_client.delete("/v1/adapters/law").status_code == 404
    assert "law" not in [m["id"] for m in fake_client.get("/v1/models").json()["data"]]


def _upload(c: TestClient, folder: Path, name: str, **form: str) -> Any:
    files = {"adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
             "adapter_model": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes())}
    return c.post("/v1/adapters", data={"name": name, **form}, files=files)


def test_upload_validates_and_adds(fake_client: TestClient, tiny_base_dir: Path, tmp_path: Path) -> None:
    folder = write_peft_dir(random_lora(load_base(tiny_base_dir)), tmp_path / "peft")
    r = _upload(fake_client, folder, "new", description="d", tags="a,b", examples="one\ntwo\n")
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "new" and r.json()["domain_tags"] == ["a", "b"] and r.json()["examples"] == 2
    assert _upload(fake_client, folder, "new").status_code == 409
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    r = _upload(fake_client, tmp_path / "bad", "broken")
    assert r.status_code == 400 and "safetensors" in r.json()["error"]["message"]
    assert fake_client.get("/v1/adapters/broken").status_code == 404
    r = fake_client.post("/v1/adapters", data={"name": "x"})
    assert r.status_code == 400 and "adapter_config" in r.json()["error"]["message"]


def test_route_and_score(fake_client: TestClient) -> None:
    r = fake_client.post("/v1/route", json={"query": "plants and flowers", "k": 2})
    b = r.json()
    assert [a["name"] for a in b["adapters"]][0] == "botany" and len(b["adapters"]) == 2
    assert abs(sum(a["weight"] for a in b["adapters"]) - 1) < 1e-6 and "latency_ms" in b and b["strategy"]
    assert fake_client.post("/v1/route", json={"query": "x", "strategy": "nope"}).status_code == 400
    assert fake_client.post("/v1/route", json={"query": " "}).status_code == 400
    s = fake_client.post("/v1/score", json={"text": "some text", "model": "law"}).json()
    assert s["tokens"] == 9 and s["adapters"] == [{"name": "law", "weight": 1.0}]
    assert fake_client.post("/v1/score", json={"text": "t", "model": "nope"}).status_code == 404


def test_load_lora_needs_an_allowed_dir(fake_client: TestClient, tmp_path: Path) -> None:
    r = fake_client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path)})
    assert r.status_code == 403 and "--allow-lora-dir" in r.json()["error"]["message"]


def test_allowed_path_resolves_symlinks(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "ok", tmp_path / "secret"
    (allowed / "a").mkdir(parents=True)
    outside.mkdir()
    (allowed / "link").symlink_to(outside)
    assert allowed_path(str(allowed / "a"), [allowed]) == (allowed / "a").resolve()
    for raw, status in [(str(allowed / "link"), 403), (str(allowed / "a" / ".." / ".." / "secret"), 403),
                        (str(allowed / "missing"), 400)]:
        with pytest.raises(Exception) as e:
            allowed_path(raw, [allowed])
        assert getattr(e.value, "status", None) == status


def test_runtime_lora_load_use_unload(tiny_base_dir: Path, tmp_path: Path) -> None:
    folder = write_peft_dir(random_lora(load_base(tiny_base_dir)), tmp_path / "loras" / "rt")
    with TestClient(create_app(FakeEngine(), ServeSettings(allow_lora_dirs=[tmp_path / "loras"]))) as c:
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "rt", "lora_path": str(folder)}).status_code == 200
        assert "rt" in [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert chat(c, model="rt").status_code == 200
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "rt", "lora_path": str(folder)}).status_code == 409
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "rt"}).status_code == 200
        assert chat(c, model="rt").status_code == 404
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "rt"}).status_code == 404


# --- settings and the asyncio bridge ----------------------------------------------------------------
def test_non_loopback_bind_needs_api_keys() -> None:
    with pytest.raises(ConfigError, match="--api-keys"):
        ServeSettings(host="0.0.0.0").check_bind()
    ServeSettings(host="0.0.0.0", api_keys=Path("keys.json")).check_bind()
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("10.0.0.1")
    with pytest.raises(ConfigError):
        ServeSettings(max_batch=0)


def test_merge_recipe_validation() -> None:
    with pytest.raises(ConfigError, match="one weight per id"):
        MergeRecipe(("a", "b"), (1.0,))
    assert MergeRecipe(("a",), (1.0,), "ties", 0.5).key() == MergeRecipe(("a",), (1.0,), "ties", 0.5).key()
    assert MergeRecipe(("a",), (1.0,), "ties", 0.5).key() != MergeRecipe(("a",), (1.0,), "ties", 0.4).key()


class _Stalled(FakeEngine):
    """Submits, emits one token, then never finishes (until cancelled)."""

    def __init__(self) -> None:
        super().__init__()
        self.handles: list[Any] = []

    def submit(self, req: GenRequest, on_event: Any) -> Any:
        from loramix.serve.scheduler import TokenEvent

        class H:
            cancelled = False

            def cancel(self) -> None:
                self.cancelled = True

        h = H()
        self.handles.append(h)
        on_event(TokenEvent(1, "a", -1.0, False))
        return h


def test_stream_events_cancels_when_the_consumer_leaves_and_on_timeout() -> None:
    eng = _Stalled()
    req = GenRequest([1, 2], [], SamplingParams())

    async def leave_early() -> None:
        gen = stream_events(eng, req, 30)
        await anext(gen)
        await gen.aclose()

    asyncio.run(leave_early())
    assert eng.handles[-1].cancelled

    async def time_out() -> None:
        async for _ in stream_events(eng, req, 0.05):
            pass

    with pytest.raises(RequestTimeout):
        asyncio.run(time_out())
    assert eng.handles[-1].cancelled
    with TestClient(create_app(eng, ServeSettings(request_timeout_s=0.05))) as c:
        r = chat(c)
        assert r.status_code == 408 and "timeout" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels_the_request(stream: bool) -> None:
    import time

    import httpx

    from tests.serve.conftest import ServerThread, free_port

    eng = _Stalled()
    with ServerThread(create_app(eng, ServeSettings()), free_port()) as st:
        url = f"http://127.0.0.1:{st.server.config.port}{CHAT}"
        body = {"model": "law", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        with pytest.raises(httpx.ReadTimeout), \
                httpx.stream("POST", url, json=body, timeout=httpx.Timeout(5, read=0.5)) as r:
            for _ in r.iter_lines():
                pass
        t0 = time.monotonic()
        while not (eng.handles and eng.handles[-1].cancelled) and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        assert eng.handles and eng.handles[-1].cancelled
