"""Passages in generation and scoring on the tiny llama: prompt budget, KV prefix cache (same logits),
LM reranking, per-row batches, retrieval-aware training with the loss on the text only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loramix.app import Loramix
from loramix.base import BaseModel
from loramix.config import DocsConfig, GenerateConfig, RouteConfig, TrainConfig
from loramix.documents import Passage, PrefixKVCache, Retriever, lm_rerank, passage_prompt
from loramix.testing import HashEncoder, random_lora
from loramix.train.expert import _pair_rows

# The tests embed with HashEncoder (random vectors): retrieval that must find the right passage fuses
# in BM25 (the product default, fusion="dense", is for a real encoder).
HASH_FUSION = "rrf"

DOCS = [
    "botany is the study of plants and the oak is a tree.",
    "zoology is the study of animals; the fox jumps over the dog.",
    "chemistry: an acid reacts with a base to form a salt and water.",
    "int main(void) { return 0; } the function returns a pointer to the string.",
    "in the beginning god created the heaven and the earth.",
    "the ship sailed to the harbour. a noun is a word that names a thing.",
]


@pytest.fixture
def engine(tmp_path: Path, tiny_base_dir: Path, tiny_base: BaseModel, monkeypatch: pytest.MonkeyPatch) -> Loramix:
    import loramix.route.router as router_mod

    monkeypatch.setattr(router_mod, "get_encoder", lambda *a, **k: HashEncoder())
    eng = Loramix(home=tmp_path / "home", base=tiny_base_dir)
    eng._retriever = Retriever(eng.docs, HashEncoder())
    eng.add_docs("tiny", texts=DOCS, keys=[f"d{i}" for i in range(len(DOCS))], tags=["botany"])
    eng.add_weights(random_lora(tiny_base, seed=1, std=0.2), "a1", description="adapter one", domain_tags=["botany"])
    eng.add_weights(random_lora(tiny_base, seed=2, std=0.2), "a2", description="adapter two")
    return eng


def _passages(texts: list[str]) -> list[Passage]:
    return [Passage("c", f"id{i}", f"k{i}", t, 1.0) for i, t in enumerate(texts)]


def test_prompt_budget_and_boundaries(engine: Loramix) -> None:
    tok = engine.base.tokenizer
    ps = _passages(DOCS)
    full = passage_prompt(tok, "what is botany?", ps, budget=10_000)
    assert len(full.passages) == len(DOCS) and len(full.boundaries) == len(DOCS) + 1
    assert full.passage_tokens == full.boundaries[-1] - full.boundaries[0]
    text = tok.decode(full.ids)
    assert text.startswith("<|im_start|>user\nPassages:\n[1] botany") and text.endswith("<|im_start|>assistant\n")
    assert "[6] the ship" in text and "what is botany?" in text
    small = passage_prompt(tok, "what is botany?", ps, budget=40)
    assert small.passage_tokens <= 40 and 1 <= len(small.passages) < len(DOCS)
    assert small.ids[: small.boundaries[1]] == full.ids[: full.boundaries[1]]  # the first passage is a shared prefix
    bare = passage_prompt(tok, "what is botany?", [], budget=40)
    assert bare.ids == engine.chat_ids("what is botany?")[0].tolist()  # no passages: the plain chat prompt
    raw = passage_prompt(tok, "query words", ps[:1], budget=100, chat=False)
    assert tok.decode(raw.ids) == "[1] botany is the study of plants and the oak is a tree.\n\nquery words"


def test_kv_prefix_cache_gives_the_uncached_logits(engine: Loramix) -> None:
    """Reusing a cached passage prefix (under an adapter mixture) gives the logits of a full prefill."""
    tok = engine.base.tokenizer
    mm = engine.mixer
    mixture = [(engine.library.get("a1").id, 0.6), (engine.library.get("a2").id, 0.4)]
    cache = PrefixKVCache(min_tokens=1)
    a = passage_prompt(tok, "first question about plants", _passages(DOCS[:3]), budget=1000)
    b = passage_prompt(tok, "another question entirely", _passages(DOCS[:2] + DOCS[4:5]), budget=1000)

    def forward(x: torch.Tensor, past: object) -> object:
        return mm.model(input_ids=x, past_key_values=past, use_cache=True)

    with mm.mixture([mixture]), torch.inference_mode():
        cold = cache.prefill(forward, a.ids, a.boundaries, scope=("m",))
        assert cold.reused == 0 and cache.hits == 0
        warm_a = cache.prefill(forward, a.ids, a.boundaries, scope=("m",))
        warm_b = cache.prefill(forward, b.ids, b.boundaries, scope=("m",))
        other = cache.prefill(forward, b.ids, b.boundaries, scope=("other mixture",))
        full_a = mm.model(input_ids=torch.tensor([a.ids])).logits  # (1, T, V)
        full_b = mm.model(input_ids=torch.tensor([b.ids])).logits
    assert warm_a.reused == a.boundaries[-1] and warm_b.reused == b.boundaries[2] and other.reused == 0
    torch.testing.assert_close(cold.logits, full_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(warm_a.logits, full_a[:, warm_a.reused:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(warm_b.logits, full_b[:, warm_b.reused:], atol=1e-5, rtol=1e-4)
    st = cache.stats()
    assert st["lookups"] == 4 and st["hits"] == 2 and st["hit_rate"] == 0.5
    assert st["tokens_reused"] == warm_a.reused + warm_b.reused


def test_ask_with_docs_lists_passages_and_cached_answer_is_identical(engine: Loramix) -> None:
    docs = DocsConfig(fusion=HASH_FUSION, collections=["tiny"], passages=2)
    gen = GenerateConfig(max_new_tokens=6)
    route = RouteConfig(k=1, temperature=1.0)
    first = engine.ask("what is botany the study of", route=route, gen=gen, docs=docs)
    second = engine.ask("what is botany the study of", route=route, gen=gen, docs=docs)
    assert first.info["cached_prompt_tokens"] == 0 and second.info["cached_prompt_tokens"] > 0
    assert second.text == first.text and second.tokens == first.tokens
    ps = first.info["passages"]
    assert len(ps) == 2 and {"collection", "id", "key", "score"} <= set(ps[0]) and ps[0]["collection"] == "tiny"
    assert ps[0]["key"] == "d0"  # BM25 + dense fusion finds the botany passage
    # uncached generation over the same prompt gives the same tokens
    engine.kv_cache.clear()
    engine.kv_cache.min_tokens = 10**9
    third = engine.ask("what is botany the study of", route=route, gen=gen, docs=docs)
    assert third.text == first.text and third.info["cached_prompt_tokens"] == 0
    st = engine.stats()
    assert st["retrieval_cache"]["hits"] >= 2 and st["kv_prefix_cache"]["hits"] == 1
    assert set(first.to_dict()) >= {"text", "adapters", "passages"}


def test_score_with_docs_and_batch_rows(engine: Loramix) -> None:
    docs = DocsConfig(fusion=HASH_FUSION, collections=["tiny"], passages=2)
    text = " the oak is a tree of the plants."
    plain = engine.score(text)
    withp = engine.score(text, docs=docs, prompt="botany is the study of")
    assert withp["passages"] and withp["tokens"] > 0 and withp["loss"] != plain["loss"]
    none = engine.score(text, docs=DocsConfig(fusion=HASH_FUSION, collections=["tiny"], passages=0), prompt="botany")
    assert none["passages"] == []
    route = RouteConfig(k=1, temperature=1.0)
    prompts = ["what is botany the study of", "what does an acid form with a base"]
    batch = engine.ask_batch(prompts, docs, route=route, gen=GenerateConfig(max_new_tokens=5))
    singles = [engine.ask(p, route=route, gen=GenerateConfig(max_new_tokens=5), docs=docs) for p in prompts]
    for b, s in zip(batch, singles, strict=True):
        assert [p["id"] for p in b.info["passages"]] == [p["id"] for p in s.info["passages"]]
        assert b.adapters == s.adapters
        assert b.text == s.text  # each row: its own passages and mixture, left-padded in one batch
    assert batch[0].info["passages"][0]["key"] != batch[1].info["passages"][0]["key"]


def test_lm_rerank_orders_by_query_loss(engine: Loramix) -> None:
    from loramix.rag import pair_scorer

    tok = engine.base.tokenizer
    ps = _passages(DOCS)
    query = "the fox jumps over the lazy dog"
    scorer = pair_scorer(engine, [])
    out = lm_rerank(query, [Passage(**{**p.__dict__, "ranks": {}}) for p in ps], scorer, tok, top=4)
    q = tok(" " + query, add_special_tokens=False)["input_ids"]
    losses = scorer([tok(p.text + "\n\n", add_special_tokens=False)["input_ids"] for p in ps[:4]], [q] * 4)
    assert [p.id for p in out[:4]] == [ps[i].id for i in sorted(range(4), key=lambda i: losses[i])]
    assert [p.id for p in out[4:]] == ["id4", "id5"]  # beyond top: fused order kept
    assert out[0].score == pytest.approx(-min(losses), abs=1e-5) and out[0].ranks["fused"] >= 1
    cfg = DocsConfig(fusion=HASH_FUSION, collections=["tiny"], passages=3, rerank=True, rerank_top=6)
    got = engine.retrieve(query, cfg)
    assert len(got) == 3 and got[0].score >= got[1].score >= got[2].score and "fused" in got[0].ranks


def test_pair_rows_put_the_loss_on_the_text_only() -> None:
    ids, labels, mask = _pair_rows([([1, 2, 3], [7, 8]), ([4], [9, 10, 11])], max_len=4, pad=0)
    assert ids.tolist() == [[2, 3, 7, 8], [4, 9, 10, 11]]  # long prompts lose their oldest tokens
    assert labels.tolist() == [[-100, -100, 7, 8], [-100, 9, 10, 11]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]


def test_train_retrieval_aware_adapter(engine: Loramix) -> None:
    from loramix.rag import aware_pairs, is_own

    docs = DocsConfig(fusion=HASH_FUSION, collections=["tiny"], passages=2)
    pairs = aware_pairs(engine, DOCS, docs)
    tok = engine.base.tokenizer
    for (prompt, target), text in zip(pairs, DOCS, strict=True):
        shown = tok.decode(prompt)
        assert "[1]" in shown and not is_own(shown.split("\n")[0][4:], text)  # never the text's own entry
        assert tok.decode(target).strip() in text
    rec, report = engine.train_adapter("aware", DOCS * 2, TrainConfig(steps=2, batch_size=2, seq_len=16),
                                       progress=False, docs=docs)
    assert rec.meta["docs"] == ["tiny"] and report["steps"] == 2
    assert engine.score(" the oak is a tree.", adapters=[("aware", 1.0)], docs=docs, prompt="botany")["loss"] > 0
