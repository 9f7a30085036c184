"""A real multi-tenant server for the tenancy, metrics and browser tests: uvicorn on loopback over the tiny
llama, a real library with shared, private and public adapters, and an API keys file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loramix.app import Loramix
from loramix.base import load_base
from loramix.serve.app import create_app
from loramix.serve.engine import LocalEngine
from loramix.serve.settings import ServeSettings
from loramix.store.peft_io import write_peft_dir
from loramix.testing import random_lora
from tests.serve.conftest import ServerThread, free_port

KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdef",
        "admin": "admin-key-0123456789abcdef"}
KEYS_FILE = {KEYS["alice"]: {"tenant": "alice", "admin": False}, KEYS["bob"]: {"tenant": "bob", "admin": False},
             KEYS["admin"]: {"tenant": None, "admin": True}}
# name -> (owner, public, description, tags, examples)
TENANT_ADAPTERS = {
    "botany": (None, False, "plants, flowers and gardening", ["science"], ["how do plants grow", "a flower petal"]),
    "alice-notes": ("alice", False, "alice's private cooking notes", ["food"], ["how long to boil an egg"]),
    "alice-pub": ("alice", True, "alice's public astronomy adapter", ["space"], ["what is a comet made of"]),
    "bob-secret": ("bob", False, "bob's private plant disease adapter", ["science"],
                   ["why do plants grow and wilt", "how do plants grow", "flower petal disease"]),
}


@dataclass
class TenantServer:
    url: str
    engine: LocalEngine
    lm: Loramix
    lora_dir: Path

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[who]}"}


def make_tenant_library(home: Path, base_dir: Path) -> Loramix:
    lm = Loramix(home=home, base=base_dir)
    base = load_base(base_dir)
    for i, (name, (owner, public, desc, tags, ex)) in enumerate(TENANT_ADAPTERS.items()):
        w = random_lora(base, rank=4, seed=i + 1, std=0.2, targets=("q_proj", "v_proj"))
        lm.add_weights(w, name, description=desc, domain_tags=tags, examples=ex, owner=owner, public=public)
    return lm


@contextmanager
def tenant_server(root: Path, base_dir: Path, **overrides: object) -> Iterator[TenantServer]:
    lm = make_tenant_library(root / "home", base_dir)
    keys = root / "keys.json"
    keys.write_text(json.dumps(KEYS_FILE))
    lora_dir = root / "loras"
    write_peft_dir(random_lora(load_base(base_dir), rank=4, seed=9, std=0.2), lora_dir / "extra")
    kw: dict[str, object] = {"max_batch": 8, "max_new_tokens_cap": 64, "default_max_tokens": 8,
                             "max_prompt_tokens": 256, "request_timeout_s": 60, "allow_lora_dirs": [lora_dir],
                             "served_model_name": "tiny-llama", "api_keys": keys, "max_concurrent_per_key": 4}
    kw.update(overrides)
    settings = ServeSettings(**kw)  # type: ignore[arg-type]
    engine = LocalEngine(lm, settings)
    with ServerThread(create_app(engine, settings), free_port()) as st:
        yield TenantServer(f"http://127.0.0.1:{st.server.config.port}", engine, lm, lora_dir)
