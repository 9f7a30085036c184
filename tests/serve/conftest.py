"""Fixtures for the server tests: the app over the fake engine (fast), and a real uvicorn server on
loopback over the tiny llama and a small real library."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient

from loramix.app import Loramix
from loramix.base import load_base
from loramix.serve.app import create_app
from loramix.serve.engine import FakeEngine, LocalEngine
from loramix.serve.settings import ServeSettings
from loramix.store.peft_io import write_peft_dir
from loramix.testing import random_lora

ADAPTERS = {  # name -> (description, tags, examples)
    "botany": ("plants, flowers and gardening", ["science"], ["how do plants grow", "what is a flower petal"]),
    "computing": ("programming in C and computer systems", ["science"], ["what does malloc return", "a C pointer"]),
    "bible": ("the King James Bible", ["religion"], ["in the beginning god created", "the book of psalms"]),
}


@pytest.fixture
def fake_client() -> Iterator[TestClient]:
    app = create_app(FakeEngine(), ServeSettings(max_new_tokens_cap=64, max_body_bytes=64 << 10,
                                                 max_upload_bytes=1 << 20))
    with TestClient(app) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    engine: LocalEngine
    lm: Loramix
    home: Path
    base_dir: Path
    lora_dir: Path  # the folder /v1/load_lora_adapter may read

    @property
    def base_id(self) -> str:
        return self.engine.base_id


class ServerThread:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self, app: Any, port: int):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > 60:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def make_library(home: Path, base_dir: Path) -> Loramix:
    lm = Loramix(home=home, base=base_dir)
    base = load_base(base_dir)
    for i, (name, (desc, tags, ex)) in enumerate(ADAPTERS.items()):
        lm.add_weights(random_lora(base, rank=4, seed=i + 1, std=0.2, targets=("q_proj", "v_proj", "up_proj")),
                       name, description=desc, domain_tags=tags, examples=ex)
    return lm


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_base_dir: Path) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("served")
    lm = make_library(root / "home", tiny_base_dir)
    lora_dir = root / "loras"
    write_peft_dir(random_lora(load_base(tiny_base_dir), rank=4, seed=9, std=0.2), lora_dir / "extra")
    settings = ServeSettings(max_batch=8, max_new_tokens_cap=64, default_max_tokens=16, max_prompt_tokens=256,
                             request_timeout_s=60, allow_lora_dirs=[lora_dir], served_model_name="tiny-llama")
    engine = LocalEngine(lm, settings)
    with ServerThread(create_app(engine, settings), free_port()) as st:
        yield Served(f"http://127.0.0.1:{st.server.config.port}", engine, lm, root / "home", tiny_base_dir, lora_dir)
