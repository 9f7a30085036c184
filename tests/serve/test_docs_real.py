"""`loramix.docs` end to end: a real uvicorn server over the tiny llama and a real library with document
collections, hit by the unmodified openai client; the passage KV prefix cache and the stats it reports."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from loramix.app import Loramix
from loramix.cli import app as cli
from loramix.errors import CollectionNotFound
from loramix.serve.app import create_app
from loramix.serve.engine import DocsRequest, LocalEngine, Resolved
from loramix.serve.settings import ServeSettings
from tests.serve.conftest import ServerThread, free_port, make_library

FACTS = ["Plants grow from seeds; roots take up water and leaves make sugar from light.",
         "A flower petal attracts insects that carry pollen from one flower to another.",
         "The C function malloc returns a pointer to newly allocated memory, or NULL.",
         "In the beginning God created the heaven and the earth."]


@dataclass
class DocsServer:
    url: str
    engine: LocalEngine
    lm: Loramix
    home: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory, tiny_base_dir: Path) -> Iterator[DocsServer]:
    root = tmp_path_factory.mktemp("docs-served")
    lm = make_library(root / "home", tiny_base_dir)
    lm.add_docs("facts", texts=FACTS, keys=["plant", "petal", "malloc", "genesis"], tags=["science"])
    lm.add_docs("alice-notes", texts=["Alice's private note: the soup needs more salt."], owner="alice")
    settings = ServeSettings(max_batch=4, max_new_tokens_cap=16, default_max_tokens=6, max_prompt_tokens=1024,
                             request_timeout_s=120, served_model_name="tiny-llama", stats_every_s=0)
    engine = LocalEngine(lm, settings)
    with ServerThread(create_app(engine, settings), free_port()) as st:
        yield DocsServer(f"http://127.0.0.1:{st.server.config.port}", engine, lm, root / "home")


def test_openai_client_gets_passages_and_the_prefix_cache_reuses_them(ds: DocsServer) -> None:
    c = ds.client()
    msgs = [{"role": "user", "content": "how do plants grow from seeds"}]
    plain = c.chat.completions.create(model="botany", messages=msgs, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    docs = {"loramix": {"docs": ["facts"], "passages": 2}}
    kv = ds.lm.kv_cache
    before = (kv.lookups, kv.passage_hits)
    first = c.chat.completions.create(model="botany", messages=msgs, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                                      extra_body=docs)
    ps = first.model_extra["loramix"]["passages"]  # type: ignore[index]
    assert len(ps) == 2 and ps[0]["collection"] == "facts" and ps[0]["key"] == "plant"
    assert all(set(p) >= {"collection", "id", "score"} for p in ps)
    assert first.model_extra["loramix"]["adapters"] == [{"name": "botany", "weight": 1.0}]  # type: ignore[index]
    assert first.usage is not None and plain.usage is not None
    assert first.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the passages are in the prompt
    again = c.chat.completions.create(model="botany", messages=msgs, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                                      extra_body=docs)
    assert kv.lookups == before[0] + 2 and kv.passage_hits == before[1] + 1  # the second reused both passages
    assert again.choices[0].message.content == first.choices[0].message.content  # greedy: same answer
    assert again.model_extra["loramix"]["passages"] == ps  # type: ignore[index]

    stream = c.completions.create(model="tiny-llama", prompt="what does malloc return", max_tokens=4, stream=True,
                                  extra_body={"loramix": {"docs": ["facts"], "passages": 1}})
    chunks = list(stream)
    assert chunks and all(ch.model_extra["loramix"]["passages"][0]["key"] == "malloc" for ch in chunks)  # type: ignore[index]

    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="botany", messages=msgs, extra_body={"loramix": {"docs": ["nope"]}})  # type: ignore[arg-type]
    assert "no document collection named 'nope'" in str(e.value) and "facts" in str(e.value)

    metrics = httpx.get(ds.url + "/metrics").text
    values = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in metrics.splitlines() if ln and ln[0] != "#"}
    assert values["loramix_kv_prefix_cache_passage_hits_total"] >= 1
    assert values["loramix_retrieval_cache_hits_total"] >= 1  # the repeated question
    assert 0 < values["loramix_kv_prefix_cache_hit_ratio"] <= 1
    assert values["loramix_kv_prefix_cache_tokens_reused_total"] > 20

    res = CliRunner().invoke(cli, ["stats", "--home", str(ds.home), "--json"])
    assert res.exit_code == 0, res.output
    engine = json.loads(res.output)["engine"]  # the snapshot the server wrote
    assert engine["kv_prefix_cache"]["lookups"] >= 1 and "hit_rate" in engine["retrieval_cache"]


def test_the_engine_hides_a_tenants_private_collection(ds: DocsServer) -> None:
    none = Resolved([], [])
    got = ds.engine.augment(none, DocsRequest(("alice-notes",), 1), "alice", prompt="what does the soup need")
    assert got.passages[0]["collection"] == "alice-notes"
    with pytest.raises(CollectionNotFound) as e:
        ds.engine.augment(none, DocsRequest(("alice-notes",), 1), "bob", prompt="what does the soup need")
    assert "alice-notes" in str(e.value) and "collections: facts" in str(e.value)  # hidden from the listing too
    assert ds.engine.augment(none, DocsRequest(("alice-notes",), 1), None, prompt="soup").passages  # the operator
