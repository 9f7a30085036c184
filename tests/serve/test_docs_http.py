"""`loramix: {"docs": [...], "passages": N}` on the OpenAI and LoRAX routes, against the model-free FakeEngine:
passages in the prompt and in the response, clear 4xx for unknown collections, tenant isolation, metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from loramix.serve.app import create_app
from loramix.serve.engine import FakeEngine
from loramix.serve.settings import ServeSettings
from tests.serve.tenantdata import KEYS, KEYS_FILE

CHAT = "/v1/chat/completions"
TORT = "what is a tort in law"


def ask(c: TestClient, content: str = TORT, loramix: dict[str, Any] | None = None, model: str = "law",
        headers: dict[str, str] | None = None, **kw: Any) -> Any:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}
    if loramix is not None:
        body["loramix"] = loramix
    return c.post(CHAT, json=body, headers=headers or {})


def sse(text: str) -> list[Any]:
    return [json.loads(e[5:]) for e in text.split("\n\n") if e.startswith("data:") and "[DONE]" not in e]


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = create_app(FakeEngine(), ServeSettings(max_new_tokens_cap=64))
    with TestClient(app) as c:
        yield c


@pytest.fixture
def tenants(tmp_path: Path) -> Iterator[TestClient]:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS_FILE))
    app = create_app(FakeEngine(), ServeSettings(api_keys=keys, max_new_tokens_cap=64))
    with TestClient(app) as c:
        yield c


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


# --- OpenAI ----------------------------------------------------------------------------------------
def test_chat_with_docs_puts_passages_in_the_prompt_and_lists_them(client: TestClient) -> None:
    plain = ask(client).json()
    r = ask(client, loramix={"docs": ["facts"], "passages": 2})
    assert r.status_code == 200
    b = r.json()
    ps = b["loramix"]["passages"]
    assert [p["collection"] for p in ps] == ["facts", "facts"] and ps[0]["key"] == "tort"
    assert all(isinstance(p["id"], str) and isinstance(p["score"], float) for p in ps)
    assert ps[0]["score"] >= ps[1]["score"]
    assert b["loramix"]["adapters"] == [{"name": "law", "weight": 1.0}]  # the row's own mixture, unchanged
    # the passages are in the prompt: more prompt tokens, and the fake's output depends on the prompt
    assert b["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    assert b["choices"][0]["message"]["content"] != plain["choices"][0]["message"]["content"]
    assert "passages" not in plain["loramix"]  # no docs asked: no passages field


def test_passages_zero_and_the_default_count(client: TestClient) -> None:
    plain = ask(client).json()
    none = ask(client, loramix={"docs": ["facts"], "passages": 0}).json()
    assert none["loramix"]["passages"] == [] and none["usage"] == plain["usage"]
    assert len(ask(client, loramix={"docs": ["facts"]}).json()["loramix"]["passages"]) == 3  # the default


def test_completions_stream_carries_the_passages(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "law", "prompt": "a contract between parties", "max_tokens": 3,
                                              "stream": True, "loramix": {"docs": ["facts"], "passages": 1}})
    assert r.status_code == 200
    chunks = sse(r.text)
    assert chunks and all(c["loramix"]["passages"][0]["key"] == "contract" for c in chunks)


def test_auto_collections_follow_each_requests_route(client: TestClient) -> None:
    law = ask(client, "contracts and torts law: what is a tort", model="auto", loramix={"docs": ["auto"], "k": 1})
    plants = ask(client, "plants and flowers", model="auto", loramix={"docs": ["auto"], "k": 1})
    assert law.json()["loramix"]["adapters"][0]["name"] == "law"
    assert {p["collection"] for p in law.json()["loramix"]["passages"]} == {"facts"}  # facts carries the tag law
    assert plants.json()["loramix"]["adapters"][0]["name"] == "botany"
    assert plants.json()["loramix"]["passages"] == []  # no collection is tagged botany


@pytest.mark.parametrize(("loramix", "status", "needle"), [
    ({"docs": ["nope"]}, 404, "no document collection named 'nope'"),
    ({"docs": ["tag:nothing"]}, 400, "no collection carries the tag 'nothing'"),
    ({"passages": 2}, 400, "loramix.passages is set but loramix.docs is not"),
    ({"docs": []}, 400, "loramix.docs"),
    ({"docs": ["facts"], "passages": 99}, 400, "loramix.passages"),
])
def test_bad_docs_options_are_clear_4xx(client: TestClient, loramix: dict[str, Any], status: int, needle: str) -> None:
    r = ask(client, loramix=loramix)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"]
    if status == 404:
        assert err["code"] == "collection_not_found" and "facts" in err["message"]  # names what exists


def test_chat_without_a_user_message_cannot_take_passages(client: TestClient) -> None:
    r = client.post(CHAT, json={"model": "law", "messages": [{"role": "system", "content": "be brief"}],
                                "loramix": {"docs": ["facts"]}})
    assert r.status_code == 400 and "user" in r.json()["error"]["message"]


# --- LoRAX -----------------------------------------------------------------------------------------
def test_lorax_generate_with_docs_in_parameters(client: TestClient) -> None:
    params: dict[str, Any] = {"adapter_id": "law", "max_new_tokens": 3, "loramix": {"docs": ["facts"], "passages": 2}}
    r = client.post("/generate", json={"inputs": TORT, "parameters": params})
    assert r.status_code == 200
    ps = r.json()["loramix"]["passages"]
    assert len(ps) == 2 and ps[0]["key"] == "tort"
    plain = client.post("/generate", json={"inputs": TORT, "parameters": {"adapter_id": "law", "max_new_tokens": 3}})
    assert "loramix" not in plain.json()
    assert r.json()["details"]["prompt_tokens"] > plain.json()["details"]["prompt_tokens"]
    root = client.post("/", json={"inputs": TORT, "parameters": params}).json()
    assert root[0]["loramix"]["passages"] == ps
    s = client.post("/generate_stream", json={"inputs": TORT, "parameters": params})
    events = sse(s.text)
    assert events[-1]["loramix"]["passages"] == ps and "loramix" not in events[0]


def test_lorax_unknown_collection_and_auto_route_options(client: TestClient) -> None:
    r = client.post("/generate", json={"inputs": TORT, "parameters": {"loramix": {"docs": ["nope"]}}})
    assert r.status_code == 404 and "no document collection named 'nope'" in r.json()["error"]
    r = client.post("/generate", json={"inputs": TORT, "parameters": {"loramix": {"passages": 1}}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    # parameters.loramix also carries the routing options of adapter_id "auto"
    routed = client.post("/generate", json={"inputs": "plants and flowers", "parameters": {
        "adapter_id": "auto", "max_new_tokens": 2, "loramix": {"k": 1, "docs": ["facts"], "passages": 1}}})
    assert routed.json()["loramix"]["adapters"] == [{"name": "botany", "weight": 1.0}]
    assert routed.json()["loramix"]["routed"] is True


# --- tenants ---------------------------------------------------------------------------------------
def test_a_tenants_private_collection_is_invisible_to_others(tenants: TestClient) -> None:
    mine = ask(tenants, loramix={"docs": ["alice-notes"], "passages": 1}, headers=auth("alice"))
    assert mine.status_code == 200 and mine.json()["loramix"]["passages"][0]["collection"] == "alice-notes"
    theirs = ask(tenants, loramix={"docs": ["alice-notes"]}, headers=auth("bob"))
    missing = ask(tenants, loramix={"docs": ["no-such"]}, headers=auth("bob"))
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["message"] == missing.json()["error"]["message"].replace("no-such", "alice-notes")
    assert "alice-notes" not in missing.json()["error"]["message"]  # the list of collections hides it too
    tagged = ask(tenants, loramix={"docs": ["tag:private"]}, headers=auth("bob"))
    assert tagged.status_code == 400  # tag: selects only readable collections
    shared = ask(tenants, loramix={"docs": ["facts"]}, headers=auth("bob"))
    assert shared.status_code == 200  # the operator's shared collections are readable by every tenant
    operator = ask(tenants, loramix={"docs": ["alice-notes"]}, headers=auth("admin"))
    assert operator.status_code == 200
    lorax = tenants.post("/generate", json={"inputs": TORT, "parameters": {
        "api_token": KEYS["bob"], "loramix": {"docs": ["alice-notes"]}}})
    assert lorax.status_code == 404


def test_refusals_and_passages_are_audited(tenants: TestClient) -> None:
    eng = tenants.app.state.engine.inner  # type: ignore[attr-defined]
    ask(tenants, loramix={"docs": ["alice-notes"]}, headers=auth("bob"))
    ask(tenants, loramix={"docs": ["facts"], "passages": 1}, headers=auth("alice"))
    refused = [r for r in eng.audit_rows if r["action"] == "retrieve"]
    assert refused and refused[-1]["tenant"] == "bob" and refused[-1]["outcome"] == "not_found"
    gen = [r for r in eng.audit_rows if r["action"] == "generate"][-1]
    assert gen["tenant"] == "alice" and gen["detail"]["passages"][0].startswith("facts:")


# --- metrics ---------------------------------------------------------------------------------------
def test_retrieval_cache_counters_in_prometheus(client: TestClient) -> None:
    for _ in range(2):
        assert ask(client, loramix={"docs": ["facts"], "passages": 1}).status_code == 200
    ask(client, "another question about contracts", loramix={"docs": ["facts"], "passages": 1})
    text = client.get("/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["loramix_retrieval_cache_hits_total"] == 1.0
    assert values["loramix_retrieval_cache_misses_total"] == 2.0
    assert values["loramix_retrieval_cache_hit_ratio"] == pytest.approx(1 / 3)
    assert "loramix_kv_prefix_cache_hit_ratio" in values and "loramix_kv_prefix_cache_passage_hits_total" in values
