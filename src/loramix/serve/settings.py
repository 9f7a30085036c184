"""Every parameter of the HTTP server, defined once (the CLI reads its help from here)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from loramix.errors import ConfigError


@dataclass
class ServeSettings:
    """How ``loramix serve`` listens, batches and limits requests."""

    host: str = "127.0.0.1"  # address to bind; a non-loopback one needs --api-keys
    port: int = 8000
    api_keys: Path | None = None  # JSON {"KEY": {"tenant": NAME, "admin": bool}}; None = single user, loopback only
    max_batch: int = 32  # rows decoding together (1 = no batching)
    max_queue: int = 256  # waiting requests beyond this get 429 (overloaded)
    max_new_tokens_cap: int = 1024  # a request asking more max_tokens gets 400
    default_max_tokens: int = 256  # when the request does not say
    max_prompt_tokens: int = 4096  # a longer prompt gets 400
    max_body_bytes: int = 1 << 20  # JSON request bodies (413 above)
    max_upload_bytes: int = 256 << 20  # multipart adapter uploads (413 above)
    request_timeout_s: float = 300.0  # a generation running longer is cancelled (408, or an error event in a stream)
    max_concurrent_per_key: int = 16  # requests in flight per API key; more get 429 (needs --api-keys)
    stats_every_s: float = 5.0  # the engine's stats snapshot for `loramix stats` is written at most this often
    allow_lora_dirs: list[Path] = field(default_factory=list)  # /v1/load_lora_adapter reads only under these
    served_model_name: str | None = None  # the base model's id in /v1/models (default: the base folder's name)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        for name in ("max_batch", "max_queue", "max_new_tokens_cap", "default_max_tokens", "max_prompt_tokens",
                     "max_body_bytes", "max_upload_bytes", "max_concurrent_per_key"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        self.default_max_tokens = min(self.default_max_tokens, self.max_new_tokens_cap)

    def check_bind(self) -> None:
        """Refuse a non-loopback address without API keys (anyone on the network could use the server)."""
        if self.api_keys is None and not is_loopback(self.host):
            raise ConfigError(f"refusing to listen on {self.host} without --api-keys: without keys the server is "
                              "single-user and binds only a loopback address (127.0.0.1, ::1, localhost)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
