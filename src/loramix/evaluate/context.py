"""Scoring continuations given token-level prompts (passages + query), per row with its own mixture.

Like :func:`loramix.evaluate.score.score_texts` with ``targets``, but the prompts come as token ids
(built by :func:`loramix.documents.passage_prompt`, whose segment boundaries matter), and prompts
longer than ``max_len`` lose their oldest tokens, never the target's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from loramix.evaluate.score import TextScore
from loramix.mix import MixedModel, Mixture

__all__ = ["score_continuations"]


def score_continuations(mm: MixedModel, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                        mixtures: Sequence[Mixture], *, batch_size: int = 16, max_len: int = 1024) -> list[TextScore]:
    """Summed NLL and count of each target's tokens given its prompt, under its row's mixture (float32)."""
    if not len(prompts) == len(targets) == len(mixtures):
        raise ValueError("prompts, targets and mixtures must have the same length")
    jobs: list[tuple[int, list[int], int, Mixture]] = []  # (index, ids, first scored position, mixture)
    for i, (p, t, mix) in enumerate(zip(prompts, targets, mixtures, strict=True)):
        target = list(t)[: max_len - 1]
        seq = (list(p) + target)[-max_len:]
        if not target:
            continue
        jobs.append((i, seq, max(1, len(seq) - len(target)), mix))
    out = [TextScore(0.0, 0) for _ in prompts]
    pad = mm.tokenizer.pad_token_id or 0
    jobs.sort(key=lambda j: len(j[1]))
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        width = max(len(j[1]) for j in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)  # (B, T)
        for r, (_, toks, _, _) in enumerate(chunk):
            ids[r, : len(toks)] = torch.tensor(toks)
            mask[r, : len(toks)] = 1
        device = next(mm.model.parameters()).device
        logits = mm.logits(ids.to(device), attention_mask=mask.to(device), rows=[j[3] for j in chunk],
                           bf16=False).float().cpu()  # (B, T, V)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        for r, (i, toks, first, _) in enumerate(chunk):
            keep = nll[r, first - 1: len(toks) - 1]
            out[i].nll += float(keep.sum())
            out[i].tokens += int(keep.numel())
    return out
