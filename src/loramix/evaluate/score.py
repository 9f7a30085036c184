"""Scoring: mean token negative log-likelihood of texts under per-row mixtures.

It is a measurement, so it runs in float32 (no autocast) unless asked otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loramix.mix import MixedModel, Mixture


@dataclass
class TextScore:
    nll: float  # summed negative log-likelihood (nats)
    tokens: int  # predicted tokens

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)


def _encode(mm: MixedModel, text: str, max_len: int) -> list[list[int]]:
    """Token windows of at most ``max_len`` tokens covering the text (1 token of overlap for context)."""
    ids: list[int] = mm.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(mm.tokenizer, "bos_token_id", None)
    if bos is not None and getattr(mm.tokenizer, "add_bos_token", False):
        ids = [bos, *ids]
    if len(ids) <= max_len:
        return [ids]
    step = max_len - 1
    return [ids[i:i + max_len] for i in range(0, len(ids) - 1, step) if len(ids[i:i + max_len]) > 1]


def score_texts(mm: MixedModel, texts: Sequence[str], mixtures: Sequence[Mixture], *, batch_size: int = 16,
                max_len: int = 512, targets: Sequence[str] | None = None, logits_mib: int = 256) -> list[TextScore]:
    """Score each text under its own mixture, batching rows through the per-row mixer.

    With ``targets``, text i is a prompt and only the tokens of ``targets[i]`` (appended to it)
    are scored: the length-normalised loss of a continuation given a query. A forward pass takes
    at most ``batch_size`` rows, and fewer when their float32 logits (and the loss's working copies)
    would pass ``logits_mib`` MiB, so memory stays bounded for long texts and large vocabularies.
    """
    if len(texts) != len(mixtures) or (targets is not None and len(targets) != len(texts)):
        raise ValueError("texts, mixtures (and targets) must have the same length")
    jobs: list[tuple[int, list[int], int, Mixture]] = []  # (text index, ids, first scored position, mixture)
    for i, (text, mix) in enumerate(zip(texts, mixtures, strict=True)):
        if targets is None:
            for window in _encode(mm, text, max_len):
                jobs.append((i, window, 1, mix))
        else:
            p = mm.tokenizer(text, add_special_tokens=False)["input_ids"]
            t = mm.tokenizer(targets[i], add_special_tokens=False)["input_ids"]
            ids = (p + t)[-max_len:]
            jobs.append((i, ids, max(1, len(ids) - len(t)), mix))
    out = [TextScore(0.0, 0) for _ in texts]
    pad = mm.tokenizer.pad_token_id or 0
    jobs.sort(key=lambda j: len(j[1]))  # similar lengths together: less padding
    vocab = int(getattr(mm.model.config, "vocab_size", 0) or 0) or 65536
    per_token = 3 * 4 * vocab  # bytes: logits, log-softmax and its gradient-free copy, float32
    budget = logits_mib * (1 << 20)
    start = 0
    while start < len(jobs):
        end = start + 1  # one row always runs, however long
        while end < len(jobs) and end - start < batch_size and (end - start + 1) * len(jobs[end][1]) * per_token <= budget:
            end += 1
        chunk, start = jobs[start:end], end
        width = max(len(j[1]) for j in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)  # (B, T)
        for r, (_, toks, _, _) in enumerate(chunk):
            ids[r, : len(toks)] = torch.tensor(toks)
            mask[r, : len(toks)] = 1
        logits = mm.logits(ids, attention_mask=mask, rows=[j[3] for j in chunk], bf16=False).float()  # (B, T, V)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        for r, (i, toks, first, _) in enumerate(chunk):
            keep = nll[r, first - 1: len(toks) - 1]  # positions predicting tokens first..end
            out[i].nll += float(keep.sum())
            out[i].tokens += int(keep.numel())
    return out
