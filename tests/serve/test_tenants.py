"""API keys, tenant isolation and limits over real HTTP (uvicorn on loopback, the tiny llama, a real library)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loramix.errors import ConfigError
from loramix.serve.app import create_app
from loramix.serve.engine import FakeEngine
from loramix.serve.settings import ServeSettings
from loramix.serve.tenants import KeyRing
from tests.serve.conftest import ServerThread, free_port
from tests.serve.tenantdata import KEYS, KEYS_FILE, TenantServer, tenant_server

# --- the keys file --------------------------------------------------------------------------------


def test_keys_file_loads_and_looks_up(tmp_path: Path) -> None:
    p = tmp_path / "keys.json"
    p.write_text(json.dumps(KEYS_FILE))
    ring = KeyRing.load(p)
    assert len(ring) == 3 and ring.tenants() == ["alice", "bob"]
    alice = ring.lookup(KEYS["alice"])
    assert alice is not None and (alice.tenant, alice.admin) == ("alice", False)
    admin = ring.lookup(KEYS["admin"])
    assert admin is not None and (admin.tenant, admin.admin) == (None, True)
    assert ring.lookup("nope") is None and ring.lookup(KEYS["alice"] + "x") is None
    assert KEYS["alice"] not in repr(alice)  # only a fingerprint is kept next to the grant


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "expected a JSON object mapping each key"),
    ("{}", "holds no keys"),
    ('{"short": {"tenant": "a"}}', "at least 16"),
    ('{"0123456789abcdefgh": "alice"}', 'expected an object like {"tenant": "NAME", "admin": false}'),
    ('{"0123456789abcdefgh": {"tenant": "a", "role": "x"}}', "unknown field(s) role"),
    ('{"0123456789abcdefgh": {"tenant": "a", "admin": "yes"}}', 'admin is "yes"; expected true or false'),
    ('{"0123456789abcdefgh": {"admin": false}}', "no tenant"),
    ('{"0123456789abcdefgh": {"tenant": null}}', "only an admin key may be the operator"),
    ('{"0123456789abcdefgh": {"tenant": "has space"}}', "is not a valid name"),
])
def test_keys_file_errors_are_clear(tmp_path: Path, content: str | None, message: str) -> None:
    p = tmp_path / "keys.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(ConfigError) as e:
        KeyRing.load(p)
    assert message in str(e.value) and str(p) in str(e.value)
    assert "0123456789abcdefgh" not in str(e.value)  # a key is never echoed back


def test_a_bad_keys_file_stops_the_app_from_being_built(tmp_path: Path) -> None:
    p = tmp_path / "keys.json"
    p.write_text("{}")
    with pytest.raises(ConfigError, match="holds no keys"):
        create_app(FakeEngine(), ServeSettings(api_keys=p))


# --- isolation and auth over real HTTP ------------------------------------------------------------


@pytest.fixture(scope="module")
def ts(tmp_path_factory: pytest.TempPathFactory, tiny_base_dir: Path) -> Iterator[TenantServer]:
    with tenant_server(tmp_path_factory.mktemp("tenants"), tiny_base_dir) as s:
        yield s


def _get(ts: TenantServer, path: str, who: str | None = None, **kw: object) -> httpx.Response:
    return httpx.get(ts.url + path, headers=ts.auth(who) if who else {}, timeout=60, **kw)  # type: ignore[arg-type]


def _post(ts: TenantServer, path: str, body: object, who: str | None = None) -> httpx.Response:
    return httpx.post(ts.url + path, json=body, headers=ts.auth(who) if who else {}, timeout=60)


def test_missing_unknown_and_malformed_keys_are_401_in_each_api_shape(ts: TenantServer) -> None:
    r = _get(ts, "/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "authentication_error" and "API key" in r.json()["error"]["message"]
    r = httpx.get(ts.url + "/v1/models", headers={"Authorization": "Bearer not-a-key"})
    assert r.status_code == 401 and "unknown API key" in r.json()["error"]["message"]
    r = httpx.get(ts.url + "/v1/models", headers={"Authorization": f"Basic {KEYS['alice']}"})
    assert r.status_code == 401 and "Bearer KEY" in r.json()["error"]["message"]
    r = httpx.post(ts.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 401 and isinstance(r.json()["error"], str) and r.json()["error_type"] == "validation"
    # open without a key: health, the page and its assets
    assert _get(ts, "/health").status_code == 200
    assert _get(ts, "/ui").status_code == 200 and _get(ts, "/ui/static/app.js").status_code == 200


def test_models_and_adapters_list_only_what_the_tenant_may_see(ts: TenantServer) -> None:
    def models(who: str) -> list[str]:
        r = _get(ts, "/v1/models", who)
        assert r.status_code == 200
        return [m["id"] for m in r.json()["data"]]

    assert models("alice") == ["tiny-llama", "botany", "alice-notes", "alice-pub"]
    assert models("bob") == ["tiny-llama", "botany", "alice-pub", "bob-secret"]
    assert models("admin") == ["tiny-llama", "botany", "alice-notes", "alice-pub", "bob-secret"]
    listed = _get(ts, "/v1/adapters", "bob").json()["data"]
    assert [(a["name"], a["owner"], a["public"]) for a in listed] == [
        ("botany", None, False), ("alice-pub", "alice", True), ("bob-secret", "bob", False)]
    assert [a["name"] for a in _get(ts, "/v1/adapters", "alice", params={"tags": "science"}).json()["data"]] == [
        "botany"]


def test_another_tenants_adapter_is_a_404_that_reads_like_a_missing_one(ts: TenantServer) -> None:
    hidden, missing = _get(ts, "/v1/adapters/bob-secret", "alice"), _get(ts, "/v1/adapters/bob-secreu", "alice")
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["message"] == missing.json()["error"]["message"].replace("bob-secreu", "bob-secret")
    assert _get(ts, "/v1/adapters/bob-secret", "bob").json()["owner"] == "bob"
    msgs = {"model": "bob-secret", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    hidden = _post(ts, "/v1/chat/completions", msgs, "alice")
    missing = _post(ts, "/v1/chat/completions", {**msgs, "model": "bob-secreu"}, "alice")
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["message"] == missing.json()["error"]["message"].replace("bob-secreu", "bob-secret")
    assert _post(ts, "/v1/chat/completions", msgs, "bob").status_code == 200
    mix = _post(ts, "/v1/chat/completions", {**msgs, "model": "botany:0.5,bob-secret:0.5"}, "alice")
    assert mix.status_code == 404
    lorax = _post(ts, "/generate", {"inputs": "hi", "parameters": {"adapter_id": "bob-secret", "max_new_tokens": 2}},
                  "alice")
    assert lorax.status_code == 404 and "bob-secret" in lorax.json()["error"]


def test_routes_never_name_an_invisible_adapter(ts: TenantServer) -> None:
    for q in ("how do plants grow", "flower petal disease", "why do plants wilt"):
        r = _post(ts, "/v1/route", {"query": q, "k": 10}, "alice")
        assert r.status_code == 200
        assert {a["name"] for a in r.json()["adapters"]} <= {"botany", "alice-notes", "alice-pub"}, r.json()
    bob = _post(ts, "/v1/route", {"query": "flower petal disease", "k": 1}, "bob").json()
    assert [a["name"] for a in bob["adapters"]] == ["bob-secret"]  # the best match, for its owner only
    auto = _post(ts, "/v1/chat/completions", {"model": "auto", "max_tokens": 2, "messages": [
        {"role": "user", "content": "flower petal disease"}], "loramix": {"k": 10}}, "alice")
    assert auto.status_code == 200
    assert "bob-secret" not in {a["name"] for a in auto.json()["loramix"]["adapters"]}
    assert "bob-secret" not in auto.headers["x-loramix-adapters"]


def test_delete_only_your_own(ts: TenantServer, tiny_base_dir: Path, tmp_path: Path) -> None:
    assert httpx.delete(ts.url + "/v1/adapters/bob-secret", headers=ts.auth("alice")).status_code == 404
    r = httpx.delete(ts.url + "/v1/adapters/botany", headers=ts.auth("bob"))
    assert r.status_code == 403 and "shared library" in r.json()["error"]["message"]
    assert httpx.delete(ts.url + "/v1/adapters/alice-pub", headers=ts.auth("bob")).status_code == 403
    # an upload belongs to its tenant: private unless public=true
    from loramix.base import load_base
    from loramix.store.peft_io import write_peft_dir
    from loramix.testing import random_lora

    folder = write_peft_dir(random_lora(load_base(tiny_base_dir), rank=4, seed=21, std=0.2), tmp_path / "up")
    files = {"adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
             "adapter_model": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes())}
    r = httpx.post(ts.url + "/v1/adapters", data={"name": "bob-upload", "description": "bob's"}, files=files,
                   headers=ts.auth("bob"), timeout=60)
    assert r.status_code == 201 and (r.json()["owner"], r.json()["public"]) == ("bob", False)
    clash = httpx.post(ts.url + "/v1/adapters", data={"name": "bob-upload"}, files=files, headers=ts.auth("alice"),
                       timeout=60)
    assert clash.status_code == 409 and "names are unique across the whole library" in clash.json()["error"]["message"]
    assert "bob-upload" not in [m["id"] for m in _get(ts, "/v1/models", "alice").json()["data"]]
    assert httpx.delete(ts.url + "/v1/adapters/bob-upload", headers=ts.auth("alice")).status_code == 404
    assert httpx.delete(ts.url + "/v1/adapters/bob-upload", headers=ts.auth("bob")).json() == {"deleted": "bob-upload"}
    trail = [(r["tenant"], r["action"], r["outcome"]) for r in ts.lm.library.audit_log(limit=None)
             if r["adapter"] == "bob-upload"]
    assert trail == [("bob", "delete", "ok"), ("alice", "delete", "not_found"), ("alice", "add", "invalid"),
                     ("bob", "add", "ok")]  # newest first


def test_admin_only_actions(ts: TenantServer) -> None:
    body = {"lora_name": "runtime-extra", "lora_path": str(ts.lora_dir / "extra")}
    r = _post(ts, "/v1/load_lora_adapter", body, "alice")
    assert r.status_code == 403 and "admin-only" in r.json()["error"]["message"]
    assert _get(ts, "/metrics", "alice").status_code == 403
    assert _get(ts, "/metrics/summary", "alice").status_code == 200  # the page's digest: any valid key
    assert _post(ts, "/v1/load_lora_adapter", body, "admin").status_code == 200
    assert "runtime-extra" in [m["id"] for m in _get(ts, "/v1/models", "alice").json()["data"]]
    assert _post(ts, "/v1/unload_lora_adapter", {"lora_name": "runtime-extra"}, "bob").status_code == 403
    assert _post(ts, "/v1/unload_lora_adapter", {"lora_name": "runtime-extra"}, "admin").status_code == 200
    assert _get(ts, "/metrics", "admin").status_code == 200


def test_unmodified_clients_authenticate(ts: TenantServer) -> None:
    import openai
    from lorax import Client
    from lorax.errors import ValidationError

    oa = openai.OpenAI(base_url=ts.url + "/v1", api_key=KEYS["bob"], max_retries=0)
    assert "bob-secret" in [m.id for m in oa.models.list().data]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=ts.url + "/v1", api_key="wrong-key", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=ts.url + "/v1", api_key=KEYS["alice"], max_retries=0).chat.completions.create(
            model="bob-secret", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    client = Client(ts.url, timeout=60)
    res = client.generate("hello", adapter_id="bob-secret", max_new_tokens=3, api_token=KEYS["bob"])  # in the body
    assert res.details.generated_tokens >= 1
    with pytest.raises(ValidationError):  # 401 with LoRAX's error body
        client.generate("hello", max_new_tokens=2)
    headed = Client(ts.url, headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=60)
    assert headed.generate("hello", adapter_id="alice-notes", max_new_tokens=2).details.generated_tokens >= 1


def test_every_action_is_audited(ts: TenantServer) -> None:
    before = ts.lm.library.audit_log(limit=None)
    assert _post(ts, "/v1/chat/completions", {"model": "alice-notes", "max_tokens": 3, "messages": [
        {"role": "user", "content": "eggs"}]}, "alice").status_code == 200
    assert _get(ts, "/v1/adapters/bob-secret", "alice").status_code == 404
    assert _post(ts, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(ts.lora_dir / "extra")},
                 "alice").status_code == 403
    new = ts.lm.library.audit_log(limit=len(ts.lm.library.audit_log(limit=None)) - len(before))
    rows = [(r["tenant"], r["action"], r["adapter"], r["outcome"]) for r in reversed(new)]
    assert rows == [("alice", "generate", "alice-notes", "ok"), ("alice", "get", "bob-secret", "not_found"),
                    ("alice", "load_lora", "x", "denied")]
    gen = next(r for r in new if r["action"] == "generate")
    assert gen["detail"]["generated_tokens"] >= 1 and gen["detail"]["finish_reason"] in ("length", "eos")
    assert {r["tenant"] for r in ts.lm.library.audit_log(limit=None, tenant="bob")} == {"bob"}


# --- per-key concurrency (a gated fake engine holds requests in flight deterministically) -------------


class GatedEngine(FakeEngine):
    """FakeEngine whose generations wait for ``gate`` before finishing (so requests stay in flight)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def submit(self, req, on_event):  # type: ignore[no-untyped-def]
        def later() -> None:
            self.gate.wait(30)
            FakeEngine.submit(self, req, on_event)

        threading.Thread(target=later, daemon=True).start()
        from loramix.serve.engine import _FakeHandle

        return _FakeHandle()


def test_per_key_concurrency_limit_is_429_and_slots_come_back(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS_FILE))
    engine = GatedEngine()
    app = create_app(engine, ServeSettings(api_keys=keys, max_concurrent_per_key=2, max_new_tokens_cap=16))
    body = {"model": "law", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    alice = {"Authorization": f"Bearer {KEYS['alice']}"}
    with ServerThread(app, free_port()) as st:
        url = f"http://127.0.0.1:{st.server.config.port}"
        results: list[int] = []
        held = [threading.Thread(target=lambda: results.append(
            httpx.post(url + "/v1/chat/completions", json=body, headers=alice, timeout=30).status_code))
            for _ in range(2)]
        for t in held:
            t.start()
        auth = app.state.auth
        fp = auth.keys.lookup(KEYS["alice"]).fingerprint
        t0 = time.monotonic()
        while auth.active(fp) < 2 and time.monotonic() - t0 < 20:
            time.sleep(0.02)
        assert auth.active(fp) == 2
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=alice, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "2 requests in flight" in r.json()["error"]["message"] and r.json()["error"]["type"] == "rate_limit_error"
        lorax = httpx.post(url + "/generate", json={"inputs": "x", "parameters": {"api_token": KEYS["alice"]}})
        assert lorax.status_code == 429 and lorax.json()["error_type"] == "overloaded"
        bob = threading.Thread(target=lambda: results.append(httpx.post(
            url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEYS['bob']}"},
            timeout=30).status_code))
        bob.start()  # another key is not limited by alice's requests
        engine.gate.set()
        for t in [*held, bob]:
            t.join(30)
        assert sorted(results) == [200, 200, 200]
        # slots are released after success, errors and streams
        assert httpx.post(url + "/v1/chat/completions", json={**body, "model": "nope"}, headers=alice).status_code == 404
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, headers=alice) as s:
            assert s.status_code == 200 and "[DONE]" in s.read().decode()
        t0 = time.monotonic()
        while auth.active(fp) and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        assert auth.active(fp) == 0


def test_serve_cli_refuses_a_bad_keys_file_before_listening(tmp_path: Path, tiny_base_dir: Path) -> None:
    import os
    import subprocess
    import sys

    bad = tmp_path / "keys.json"
    bad.write_text('{"0123456789abcdefgh": {"tenant": "alice", "admin": 1}}')
    env = {**os.environ, "LORAMIX_HOME": str(tmp_path / "home"), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "loramix.cli", "serve", "--api-keys", str(bad), "--base",
                           str(tiny_base_dir), "--port", str(free_port())], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "admin is 1; expected true or false" in proc.stderr.replace("\n", " ")


def test_a_client_that_goes_away_gives_its_slot_back(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS_FILE))
    engine = GatedEngine()
    app = create_app(engine, ServeSettings(api_keys=keys, max_concurrent_per_key=1, max_new_tokens_cap=16))
    body = {"model": "law", "max_tokens": 3, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    alice = {"Authorization": f"Bearer {KEYS['alice']}"}
    with ServerThread(app, free_port()) as st:
        url = f"http://127.0.0.1:{st.server.config.port}"
        fp = app.state.auth.keys.lookup(KEYS["alice"]).fingerprint
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while its generation waits
            httpx.post(url + "/v1/chat/completions", json=body, headers=alice, timeout=1.0)
        assert app.state.auth.active(fp) == 1
        assert httpx.post(url + "/v1/chat/completions", json=body, headers=alice).status_code == 429
        engine.gate.set()  # the generation ends; its response goes nowhere; the slot must come back
        t0 = time.monotonic()
        while app.state.auth.active(fp) and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert app.state.auth.active(fp) == 0
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=alice) as s:
            assert s.status_code == 200 and "[DONE]" in s.read().decode()
