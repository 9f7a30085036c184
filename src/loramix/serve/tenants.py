"""API keys, tenants and per-key limits.

``--api-keys FILE`` is JSON ``{"KEY": {"tenant": "NAME", "admin": false}, ...}``. A key's tenant owns what
it uploads and sees the shared library (adapters without an owner), public adapters and its own; another
tenant's private adapter behaves exactly as a missing one. An admin key may also do the admin-only
actions: loading or unloading an adapter from a path on the server (``/v1/load_lora_adapter``,
``/v1/unload_lora_adapter``), reading ``/metrics`` (it names every running adapter) and every tenant's
audit rows. An admin key with ``"tenant": null`` is the operator: no visibility filter, and its uploads
go to the shared library. Non-admin keys must name a tenant. Runtime adapters (loaded from a server path
by an admin) are served to every tenant, like the shared library.

Clients send ``Authorization: Bearer KEY``; on the LoRAX routes the ``parameters.api_token`` of the
body is accepted too (lorax-client sends its ``api_token`` there). A missing or unknown key is 401, an
admin-only action without an admin key 403, and more than ``max_concurrent_per_key`` requests in flight
on one key 429 (the slot is held until the response, streamed or not, has been sent).

Without a keys file the server is single-user: every caller is ``Principal(tenant=None, admin=True)``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from loramix.errors import AccessDenied, ConfigError, Unauthorized
from loramix.serve.common import Principal, get_principal
from loramix.serve.errors import ApiError
from loramix.store.records import NAME_RE

__all__ = ["ApiKey", "Auth", "KeyRing", "deny_unless_admin", "install_auth", "require_admin"]

LORAX_BODY_PATHS = ("/", "/generate", "/generate_stream")  # where api_token may ride in the JSON body
MIN_KEY_CHARS = 16


@dataclass(frozen=True)
class ApiKey:
    """What one key grants: its tenant (None only for an operator admin key) and admin rights."""

    tenant: str | None
    admin: bool = False
    fingerprint: str = ""  # sha256 prefix of the key: names it in logs and limits without revealing it


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class KeyRing:
    """The keys of one ``--api-keys`` file, looked up by their sha256 (compared in constant time)."""

    def __init__(self, keys: Mapping[str, ApiKey]):
        self._by_hash = {hashlib.sha256(k.encode()).digest(): v for k, v in keys.items()}

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, key: str) -> ApiKey | None:
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for h, v in self._by_hash.items():  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(h, digest):
                found = v
        return found

    def tenants(self) -> list[str]:
        return sorted({v.tenant for v in self._by_hash.values() if v.tenant is not None})

    @classmethod
    def from_dict(cls, data: object, source: str = "the API keys") -> KeyRing:
        """Validate ``{"KEY": {"tenant": "NAME", "admin": bool}}``; errors name the entry and what was expected."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object mapping each key to {{\"tenant\": NAME, "
                              f"\"admin\": false}}, got a {type(data).__name__}")
        if not data:
            raise ConfigError(f"{source}: holds no keys; expected at least one (or run without --api-keys for a "
                              "single-user server on loopback)")
        keys: dict[str, ApiKey] = {}
        for i, (key, spec) in enumerate(data.items(), 1):
            where = f"{source}: entry {i} (key {fingerprint(key)}...)"
            if not isinstance(key, str) or len(key) < MIN_KEY_CHARS or not key.isprintable() or key != key.strip():
                raise ConfigError(f"{source}: entry {i}: keys must be printable strings of at least {MIN_KEY_CHARS} "
                                  "characters without surrounding spaces (use e.g. `python -c 'import secrets; "
                                  "print(secrets.token_urlsafe(24))'`)")
            if not isinstance(spec, dict):
                raise ConfigError(f"{where}: expected an object like {{\"tenant\": \"NAME\", \"admin\": false}}, "
                                  f"got {json.dumps(spec)}")
            unknown = sorted(set(spec) - {"tenant", "admin"})
            if unknown:
                raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; expected only tenant and admin")
            admin = spec.get("admin", False)
            if not isinstance(admin, bool):
                raise ConfigError(f"{where}: admin is {json.dumps(admin)}; expected true or false")
            if "tenant" not in spec:
                raise ConfigError(f"{where}: no tenant; expected \"tenant\": \"NAME\" (or null for an operator "
                                  "admin key)")
            tenant = spec["tenant"]
            if tenant is None and not admin:
                raise ConfigError(f"{where}: tenant is null but admin is false; only an admin key may be the "
                                  "operator (tenant null); expected a tenant name")
            if tenant is not None and (not isinstance(tenant, str) or not NAME_RE.fullmatch(tenant)):
                raise ConfigError(f"{where}: tenant {json.dumps(tenant)} is not a valid name; expected 1-100 "
                                  "characters from A-Z a-z 0-9 . _ -")
            keys[key] = ApiKey(tenant=tenant, admin=admin, fingerprint=fingerprint(key))
        return cls(keys)

    @classmethod
    def load(cls, path: str | Path) -> KeyRing:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"API keys file {p} does not exist; expected a JSON file "
                              "{\"KEY\": {\"tenant\": \"NAME\", \"admin\": false}}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the API keys file {p}: {e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"API keys file {p} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                              "expected {\"KEY\": {\"tenant\": \"NAME\", \"admin\": false}}") from None
        return cls.from_dict(data, f"API keys file {p}")


class Auth:
    """The ``get_principal`` dependency when keys are configured, with a per-key concurrency limit."""

    def __init__(self, keys: KeyRing | None, max_concurrent_per_key: int = 16):
        if max_concurrent_per_key < 1:
            raise ConfigError(f"max_concurrent_per_key must be at least 1, got {max_concurrent_per_key}")
        self.keys = keys
        self.max_concurrent = max_concurrent_per_key
        self._active: dict[str, int] = {}
        self._lock = threading.Lock()

    def active(self, fp: str) -> int:
        with self._lock:
            return self._active.get(fp, 0)

    async def _key_of(self, request: Request) -> str | None:
        header = request.headers.get("authorization")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized("the Authorization header must be 'Bearer KEY'")
            return token.strip()
        if request.method == "POST" and request.url.path in LORAX_BODY_PATHS and \
                request.headers.get("content-type", "").startswith("application/json"):
            try:  # the body is cached by the request, so the route still reads it
                body: Any = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError):
                return None  # the route reports the malformed body
            params = body.get("parameters") if isinstance(body, dict) else None
            api_token = params.get("api_token") if isinstance(params, dict) else None
            return api_token if isinstance(api_token, str) and api_token else None
        return None

    async def principal(self, request: Request) -> AsyncIterator[Principal]:
        """Who is calling; holds one of the key's concurrency slots until the response has been sent."""
        if self.keys is None:
            yield Principal()
            return
        key = await self._key_of(request)
        if key is None:
            raise Unauthorized("this server needs an API key: send 'Authorization: Bearer KEY'")
        found = self.keys.lookup(key)
        if found is None:
            raise Unauthorized("unknown API key; expected one from the server's --api-keys file")
        fp = found.fingerprint
        with self._lock:
            n = self._active.get(fp, 0)
            if n >= self.max_concurrent:
                raise ApiError(429, f"this API key already has {n} requests in flight, the most this server allows "
                                    f"per key (--max-concurrent-per-key {self.max_concurrent}); retry when one "
                                    "finishes", code="too_many_concurrent_requests")
            self._active[fp] = n + 1
        try:
            yield Principal(tenant=found.tenant, admin=found.admin)
        finally:
            with self._lock:
                left = self._active[fp] - 1
                if left:
                    self._active[fp] = left
                else:
                    del self._active[fp]


def require_admin(who: Principal, action: str) -> None:
    """Raise AccessDenied (403) unless the caller is an admin (always so on a single-user server)."""
    if not who.admin:
        raise AccessDenied(f"{action} is an admin-only action; expected a request with an admin API key")


def deny_unless_admin(request: Request, who: Principal, action: str, adapter: str | None = None) -> None:
    """:func:`require_admin`, auditing a refusal (as ``denied``) through the app's engine."""
    try:
        require_admin(who, action.replace("_", " "))
    except AccessDenied as e:
        audit = getattr(request.app.state.engine, "_audit", None)
        if audit is not None:
            audit(action, who.tenant, adapter, "denied", {"error": str(e)})
        raise


def install_auth(app: FastAPI, keys: KeyRing | None, max_concurrent_per_key: int) -> Auth:
    """Make ``get_principal`` check keys (when given) for every route that asks who is calling."""
    auth = Auth(keys, max_concurrent_per_key)
    app.state.auth = auth
    if keys is not None:
        app.dependency_overrides[get_principal] = auth.principal
    return auth
