"""The /ui page in a real headless browser: playwright driving the system chromium against a real server
(uvicorn on loopback, the tiny llama, a real library with tenants and API keys)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serve.conftest import Served
from tests.serve.tenantdata import KEYS, TenantServer, tenant_server

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


def _chromium() -> str | None:
    for cand in (os.environ.get("LORAMIX_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if cand and Path(cand).is_file():
            return cand
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium browser (apt-get install chromium)")
TIMEOUT_MS = 60_000
# Counts the separate updates of the chat output (installed before the page's own scripts; init scripts are
# not subject to the page's Content-Security-Policy, which forbids eval, so the tests never evaluate JS).
COUNT_UPDATES = """
document.addEventListener('DOMContentLoaded', () => {
  const out = document.getElementById('chat-output');
  let n = 0;
  new MutationObserver(() => { n += 1; out.dataset.updates = String(n); })
    .observe(out, {childList: true, characterData: true, subtree: true});
});
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def ts(tmp_path_factory: pytest.TempPathFactory, tiny_base_dir: Path) -> Iterator[TenantServer]:
    with tenant_server(tmp_path_factory.mktemp("ui"), tiny_base_dir) as s:
        yield s


class Page:
    """A page that records console errors and uncaught exceptions."""

    def __init__(self, browser: Any, key: str | None = None):
        self.ctx = browser.new_context()
        self.ctx.add_init_script(COUNT_UPDATES)
        if key is not None:  # as if the user had saved it before
            self.ctx.add_init_script(f"localStorage.setItem('loramix.apiKey', {json.dumps(key)});")
        self.page = self.ctx.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def rows(self, table: str) -> list[str]:
        return [t.strip() for t in self.page.locator(f"#{table} tbody tr td:first-child").all_inner_texts()]

    def close(self) -> None:
        self.ctx.close()


def _wait_rows(p: Page, table: str, n: int | None = None) -> None:
    rows = p.page.locator(f"#{table} tbody tr")
    if n is None:
        rows.first.wait_for()
    else:
        sync_api.expect(rows).to_have_count(n, timeout=TIMEOUT_MS)


def test_page_with_a_saved_key_browses_routes_chats_and_shows_metrics(browser: Any, ts: TenantServer) -> None:
    p = Page(browser, KEYS["alice"])
    try:
        resp = p.page.goto(ts.url + "/ui")
        assert resp is not None and resp.status == 200
        assert "default-src 'none'" in resp.headers["content-security-policy"]
        # the library: alice's view (shared, public, her own), never bob's private adapter
        _wait_rows(p, "lib-table", 3)
        assert p.rows("lib-table") == ["botany", "alice-notes", "alice-pub"]
        row = p.page.locator("#lib-table tbody tr[data-name='alice-pub']")
        assert "space" in row.inner_text() and "alice (public)" in row.inner_text()
        assert p.page.locator("#model-info").inner_text() == "base model: tiny-llama"
        p.page.fill("#lib-search", "astronomy")
        p.page.click("#lib-form button[type=submit]")
        _wait_rows(p, "lib-table", 1)
        assert p.rows("lib-table") == ["alice-pub"] and p.page.inner_text("#lib-count") == "1 adapter"

        # the route playground
        p.page.fill("#route-query", "how do plants grow")
        p.page.fill("#route-k", "5")
        p.page.click("#route-go")
        _wait_rows(p, "route-table")
        routed = p.rows("route-table")
        assert routed and set(routed) <= {"botany", "alice-notes", "alice-pub"}
        weights = [float(w) for w in p.page.locator("#route-table tbody tr td:nth-child(3)").all_inner_texts()]
        assert sum(weights) == pytest.approx(1.0, abs=0.01)
        assert "ms" in p.page.inner_text("#route-latency")

        # the chat streams: count the separate updates of the output while it arrives
        p.page.select_option("#chat-model", "auto")
        # the tiny random llama's greedy choice is a special token (no text), so sample: 64 tokens at
        # temperature 1 give text pieces with near certainty (about a quarter of its tokens are text)
        p.page.fill("#chat-max", "64")
        p.page.fill("#chat-temp", "1")
        p.page.check("#chat-ignore-eos")
        p.page.fill("#chat-input", "how do plants grow")
        p.page.click("#chat-send")
        sync_api.expect(p.page.locator("#chat-status")).to_contain_text("tokens in", timeout=TIMEOUT_MS)
        route_line = p.page.inner_text("#chat-route")
        assert route_line.startswith("routed to: ") and "bob-secret" not in route_line
        assert p.page.inner_text("#chat-output").strip(), "the chat showed no text"
        updates = int(p.page.locator("#chat-output").get_attribute("data-updates") or 0)
        assert updates >= 2, "the answer arrived in one piece, not streamed"
        n_tokens = int(p.page.inner_text("#chat-status").split()[0])
        assert n_tokens >= 1

        # the live metrics summary shows numbers that include this chat
        sync_api.expect(p.page.locator("#m-generations")).to_have_text(re.compile(r"^[1-9][0-9]*$"),
                                                                      timeout=TIMEOUT_MS)
        assert int(p.page.inner_text("#m-generated")) >= n_tokens
        assert int(p.page.inner_text("#m-requests")) >= 4
        assert p.page.inner_text("#m-ttft").endswith(" ms")
        assert p.page.inner_text("#m-loaded").split(" / ")[1].isdigit()
        assert p.page.locator("#lib-error").is_hidden() and p.page.locator("#chat-error").is_hidden()
        assert p.errors == []
    finally:
        p.close()


def test_page_asks_for_a_key_then_works_with_it(browser: Any, ts: TenantServer) -> None:
    p = Page(browser)
    try:
        p.page.goto(ts.url + "/ui")
        p.page.wait_for_selector("#lib-error:not([hidden])")
        assert "401" in p.page.inner_text("#lib-error") and "enter an API key" in p.page.inner_text("#lib-error")
        p.page.fill("#key", KEYS["bob"])
        p.page.click("#save-key")
        _wait_rows(p, "lib-table", 3)
        assert p.rows("lib-table") == ["botany", "alice-pub", "bob-secret"]
        stored = {i["name"]: i["value"] for o in p.ctx.storage_state()["origins"] for i in o["localStorage"]}
        assert stored["loramix.apiKey"] == KEYS["bob"]
        assert p.page.locator("#lib-error").is_hidden()
        options = p.page.locator("#chat-model option").all_inner_texts()
        assert "bob-secret" in options and "alice-notes" not in options
        # a wrong model error is shown on the page, not thrown
        p.page.select_option("#chat-model", "bob-secret")
        p.page.fill("#key", "wrong-key-0123456789abc")
        p.page.click("#save-key")
        p.page.fill("#chat-input", "hello")
        p.page.click("#chat-send")
        p.page.wait_for_selector("#chat-error:not([hidden])")
        assert "unknown API key" in p.page.inner_text("#chat-error")
        assert not [e for e in p.errors if e.startswith("uncaught")]
    finally:
        p.close()


def test_page_on_a_single_user_server(browser: Any, served: Served) -> None:
    p = Page(browser)
    try:
        p.page.goto(served.url + "/ui")
        _wait_rows(p, "lib-table", 3)
        assert p.rows("lib-table") == ["botany", "computing", "bible"]
        sync_api.expect(p.page.locator("#m-updated")).to_contain_text("updated", timeout=TIMEOUT_MS)
        sync_api.expect(p.page.locator("#m-loaded")).to_have_text(re.compile(r"^[0-9]+ / [0-9]+$"))
        assert p.errors == []
    finally:
        p.close()
