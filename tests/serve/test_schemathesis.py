"""Property-based API tests: schemathesis generates requests from /openapi.json; the server must never
answer 5xx, and every non-2xx answer has a JSON error body. Bounded: a few examples per operation."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from loramix.serve.app import create_app
from loramix.serve.engine import FakeEngine
from loramix.serve.settings import ServeSettings

EXAMPLES = int(os.environ.get("LORAMIX_SCHEMATHESIS_EXAMPLES", "10"))
TALLY: Counter[str] = Counter()

fake_schema = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(FakeEngine(), ServeSettings(max_new_tokens_cap=32, default_max_tokens=8)))


def check_no_5xx(case: Any, response: Any, where: str) -> None:
    TALLY[f"{where} cases"] += 1
    TALLY[f"{where} {response.status_code // 100}xx"] += 1
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        assert "error" in body, body


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    print("\nschemathesis tally:", dict(sorted(TALLY.items())))


@fake_schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_fake_engine_api_never_5xx(case: Any) -> None:
    check_no_5xx(case, case.call(), "fake")


def test_real_server_api_never_5xx(served: Any) -> None:
    """The same against the real tiny-llama server (fewer examples: each generation runs the model)."""
    schema = schemathesis.openapi.from_url(served.url + "/openapi.json")
    for result in schema.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy())
        @settings(max_examples=max(2, EXAMPLES // 3), deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def run(case: Any) -> None:
            check_no_5xx(case, case.call(timeout=60), "real")

        run()
