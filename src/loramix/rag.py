"""Retrieval-augmented answers, scores and training over the engine (used by :class:`loramix.app.Loramix`).

Per query: route (adapter mixture), retrieve passages from the chosen collections (reranked by the
language model under that same mixture when asked), place them in the prompt under a token budget,
and run generation or scoring with the row's mixture. Prompts reuse recurring passage prefixes
through the engine's :class:`PrefixKVCache`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from loramix.base import maybe_autocast
from loramix.config import DocsConfig, GenerateConfig, RouteConfig, TrainConfig
from loramix.documents import Passage, passage_prompt
from loramix.errors import AdapterNotFound, TrainingError

if TYPE_CHECKING:
    from loramix.app import Answer, Loramix
    from loramix.mix import Mixture

__all__ = ["ask_docs", "ask_docs_batch", "aware_pairs", "pair_scorer", "retrieve", "score_docs"]


def pair_scorer(eng: Loramix, mixture: Mixture) -> Callable[[list[list[int]], list[list[int]]], list[float]]:
    """Mean NLL of each target given its prompt under ``mixture`` (the reranker's scorer)."""
    from loramix.evaluate.context import score_continuations

    def score(prompts: list[list[int]], targets: list[list[int]]) -> list[float]:
        with eng._lock:
            res = score_continuations(eng.mixer, prompts, targets, [mixture] * len(prompts))
        return [s.loss for s in res]

    return score


def _route_tags(eng: Loramix, mixture: Mixture) -> list[str]:
    """Domain tags of the mixture's library adapters (runtime and merged adapters carry none)."""
    tags: list[str] = []
    for aid, _ in mixture:
        try:
            tags += eng.library.get(aid).domain_tags
        except AdapterNotFound:
            continue
    return tags


def retrieve(eng: Loramix, query: str, cfg: DocsConfig, mixture: Mixture = (), tenant: str | None = None) -> list[Passage]:
    """Passages for ``query`` from the collections ``tenant`` may read; the reranker (``cfg.rerank``)
    scores with the base model under ``mixture``."""
    scorer = pair_scorer(eng, mixture) if cfg.rerank else None
    key = ",".join(f"{a}:{w:.4f}" for a, w in mixture)
    return eng.retriever.retrieve(query, cfg, _route_tags(eng, mixture) if mixture else (), scorer=scorer,
                                  tokenizer=eng.base.tokenizer if cfg.rerank else None, scorer_key=key, tenant=tenant)


def _shown(passages: Sequence[Passage]) -> list[dict[str, Any]]:
    return [p.to_dict() for p in passages]


def _scope(eng: Loramix, mixture: Mixture) -> tuple:
    return (str(eng.base_path()), tuple((a, round(float(w), 6)) for a, w in mixture))


def prefill(eng: Loramix, ids: list[int], boundaries: list[int], mixture: Mixture) -> Any:
    """Prefill ``ids`` (under the mixture already set) through the engine's passage KV cache."""
    mm = eng.mixer

    def forward(x: torch.Tensor, past: Any) -> Any:
        device = next(mm.model.parameters()).device
        return mm.model(input_ids=x.to(device), past_key_values=past, use_cache=True)

    return eng.kv_cache.prefill(forward, ids, boundaries, scope=_scope(eng, mixture))


def ask_docs(eng: Loramix, prompt: str, adapters: Sequence[tuple[str, float]] | None, route: RouteConfig | None,
             gen: GenerateConfig, docs: DocsConfig, on_text: Callable[[str], None] | None = None) -> Answer:
    """Route, retrieve, put the passages in the chat prompt and generate; the prefix KV cache is used."""
    from transformers import TextStreamer

    from loramix.app import Answer

    mixture, shown, route_ms = eng._mixture_for(prompt, adapters, route if adapters is None else None)
    t0 = time.perf_counter()
    passages = retrieve(eng, prompt, docs, mixture)
    retrieve_ms = (time.perf_counter() - t0) * 1000
    tok = eng.base.tokenizer
    pp = passage_prompt(tok, prompt, passages, docs.budget, chat=True)

    class _Stream(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if on_text is not None and text:
                on_text(text)

    t1 = time.perf_counter()
    with eng._lock:
        mm = eng.mixer
        device = next(mm.model.parameters()).device
        ids = torch.tensor([pp.ids], device=device)  # (1, T)
        with mm.mixture([mixture]), torch.inference_mode(), maybe_autocast(eng.mix_cfg.bf16):
            pre = prefill(eng, pp.ids[:-1], pp.boundaries, mixture)  # generate feeds the last prompt token
            kw: dict[str, Any] = {"do_sample": gen.temperature > 0}
            if gen.temperature > 0:
                kw.update(temperature=gen.temperature, top_p=gen.top_p)
            out = mm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=pre.past,  # type: ignore[operator]
                                    max_new_tokens=gen.max_new_tokens, pad_token_id=tok.pad_token_id,
                                    streamer=_Stream(tok, skip_prompt=True, skip_special_tokens=True), **kw)
    new = out[0, ids.shape[1]:]
    if mixture:
        eng.library.record_use([a for a, _ in mixture])
    return Answer(text=tok.decode(new, skip_special_tokens=True).strip(), adapters=shown, route_ms=route_ms,
                  generate_ms=(time.perf_counter() - t1) * 1000, tokens=int(new.numel()),
                  info={"passages": _shown(pp.passages), "retrieve_ms": round(retrieve_ms, 2),
                        "prompt_tokens": len(pp.ids), "cached_prompt_tokens": pre.reused})


def ask_docs_batch(eng: Loramix, prompts: Sequence[str], route: RouteConfig | None, gen: GenerateConfig,
                   docs: DocsConfig) -> list[Answer]:
    """One batched greedy generation: each row its own passages and its own adapter mixture."""
    from loramix.app import Answer

    tok = eng.base.tokenizer
    rows, shown, pps = [], [], []
    for p in prompts:
        mixture, s, _ = eng._mixture_for(p, None, route)
        rows.append(mixture)
        shown.append(s)
        pps.append(passage_prompt(tok, p, retrieve(eng, p, docs, mixture), docs.budget, chat=True))
    width = max(len(pp.ids) for pp in pps)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(pps), width), pad, dtype=torch.long)  # (B, T) left-padded
    mask = torch.zeros((len(pps), width), dtype=torch.long)  # (B, T)
    for i, pp in enumerate(pps):
        ids[i, width - len(pp.ids):] = torch.tensor(pp.ids)
        mask[i, width - len(pp.ids):] = 1
    t0 = time.perf_counter()
    with eng._lock:
        mm = eng.mixer
        device = next(mm.model.parameters()).device
        with mm.mixture(rows), torch.inference_mode(), maybe_autocast(eng.mix_cfg.bf16):
            out = mm.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,  # type: ignore[operator]
                                    max_new_tokens=gen.max_new_tokens, pad_token_id=pad)
    ms = (time.perf_counter() - t0) * 1000
    answers = []
    for i, pp in enumerate(pps):
        new = out[i, width:]
        answers.append(Answer(text=tok.decode(new, skip_special_tokens=True).strip(), adapters=shown[i], route_ms=0.0,
                              generate_ms=ms, tokens=int((new != pad).sum()),
                              info={"passages": _shown(pp.passages), "prompt_tokens": len(pp.ids)}))
    return answers


def score_docs(eng: Loramix, text: str, adapters: Sequence[tuple[str, float]] | None, route: RouteConfig | None,
               docs: DocsConfig, prompt: str | None = None) -> dict[str, Any]:
    """Mean token NLL of ``text`` after the retrieved passages (plain context, no chat template).

    The retrieval (and routing) query is ``prompt`` when given (``text`` is then its continuation),
    else ``text`` itself.
    """
    from loramix.evaluate.context import score_continuations

    query = prompt if prompt is not None else text
    mixture, shown, _ = eng._mixture_for(query, adapters, route)
    passages = retrieve(eng, query, docs, mixture)
    tok = eng.base.tokenizer
    pp = passage_prompt(tok, prompt or "", passages, docs.budget, chat=False)
    target = tok(text, add_special_tokens=False)["input_ids"]
    with eng._lock:
        s = score_continuations(eng.mixer, [pp.ids], [target], [mixture])[0]
    return {"loss": s.loss, "tokens": s.tokens, "adapters": shown, "passages": _shown(pp.passages)}


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def is_own(passage: str, text: str) -> bool:
    """Whether a passage comes from the text itself (one contains the other, or they share most words)."""
    a, b = _norm(passage), _norm(text)
    if not a or not b:
        return False
    if a in b or b in a:
        return True
    wa, wb = set(a.split()), set(b.split())
    return len(wa & wb) / max(1, min(len(wa), len(wb))) > 0.8


def aware_pairs(eng: Loramix, texts: Sequence[str], docs: DocsConfig, query_fraction: float = 0.4,
                max_words: int = 128, keys: Sequence[str] | None = None) -> list[tuple[list[int], list[int]]]:
    """Training pairs for a retrieval-aware adapter: (passages + the text's first words, the rest).

    Passages are retrieved with the text's opening (as at scoring time), without the reranker, and
    never from the text itself (a collection often holds its own training texts); with ``keys``
    (one per text), never from a document with the text's key either (e.g. other senses of its headword).
    """
    from loramix.train.router import split_texts

    keep = [i for i, t in enumerate(texts) if len(t.split()) >= 2]
    texts = [texts[i] for i in keep]
    own_keys = [keys[i].lower() for i in keep] if keys is not None else [None] * len(texts)
    queries, targets = split_texts(list(texts), query_fraction, max_words)
    if not queries:
        raise TrainingError("no training text has 2 or more words")
    ret = eng.retriever
    cols = ret.collections(docs.collections)
    qvecs = ret.encoder.encode(queries)
    wide = DocsConfig(**{**docs.__dict__, "rerank": False})
    tok = eng.base.tokenizer
    pairs = []
    for q, t, v, full, key in zip(queries, targets, qvecs, texts, own_keys, strict=True):
        ranked = [p for p in ret.rank(q, cols, wide, qvec=np.asarray(v))
                  if not is_own(p.text, full) and p.key.lower() != key]
        pp = passage_prompt(tok, q, ranked[: docs.passages], docs.budget, chat=False)
        pairs.append((pp.ids, tok(t, add_special_tokens=False)["input_ids"]))
    return pairs


def train_aware(eng: Loramix, texts: Sequence[str], cfg: TrainConfig, docs: DocsConfig, progress: bool,
                description: str, keys: Sequence[str] | None = None) -> tuple[Any, Any]:
    """A retrieval-aware expert: trained on :func:`aware_pairs` (loss on the text only)."""
    from loramix.train.expert import train_expert

    pairs = aware_pairs(eng, texts, docs, keys=keys)
    return train_expert(str(eng.base_path()), [], cfg, progress=progress, description=description, pairs=pairs,
                        pair_max_len=docs.budget + 256)
