"""A KV prefix cache for prompts that start with recurring passages.

Entries are Hugging Face ``DynamicCache`` objects holding the prefill of a prompt prefix that ends
on a passage boundary (see :class:`loramix.documents.prompt.PassagePrompt`), keyed by the prefix's
token ids and the adapter mixture (adapters change the keys and values). A lookup takes the longest
cached boundary prefix, copies it and prefills only the rest; the new boundaries are stored (as
cropped copies). The result is the same as prefilling the whole prompt (tested to float tolerance).
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Prefill", "PrefixKVCache"]

# forward(input_ids (1, t), past_key_values | None) -> model output with .logits and .past_key_values
Forward = Callable[[torch.Tensor, Any], Any]


@dataclass
class Prefill:
    logits: torch.Tensor  # (1, t, V) logits of the tokens prefilled now (t = len(ids) - reused)
    past: Any  # the cache over the whole prompt
    reused: int  # prompt tokens taken from the cache
    seconds: float


class PrefixKVCache:
    """LRU cache of passage-prefix KV states, with hit counters."""

    def __init__(self, max_entries: int = 64, min_tokens: int = 8) -> None:
        self.max_entries = max_entries
        self.min_tokens = min_tokens  # shorter prefixes are not worth an entry
        self._entries: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.lookups = 0
        self.hits = 0
        self.passage_hits = 0  # hits that reused at least one passage (not only the prompt's head)
        self.tokens_reused = 0
        self.tokens_prefilled = 0
        self.generation = 0  # the owner bumps it (via clear) when collections change

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.generation += 1

    def prefill(self, forward: Forward, ids: Sequence[int], boundaries: Sequence[int], scope: tuple = ()) -> Prefill:
        """Prefill ``ids`` reusing the longest cached prefix ending on one of ``boundaries``.

        ``scope`` separates entries that must not be shared (the adapter mixture, the model).
        """
        t0 = time.perf_counter()
        ids = list(ids)
        points = sorted({b for b in boundaries if self.min_tokens <= b < len(ids)})
        start, past = 0, None
        with self._lock:
            self.lookups += 1
            for b in reversed(points):
                hit = self._entries.get((scope, tuple(ids[:b])))
                if hit is not None:
                    self._entries.move_to_end((scope, tuple(ids[:b])))
                    start, past = b, copy.deepcopy(hit)
                    self.hits += 1
                    self.passage_hits += int(b > min(boundaries))  # past the head: a passage reused
                    break
        out = forward(torch.tensor([ids[start:]]), past)  # (1, t) -> logits (1, t, V)
        cache = out.past_key_values
        new = [b for b in points if b > start]
        with self._lock:
            for b in new:
                entry = copy.deepcopy(cache)
                if b < entry.get_seq_length():
                    entry.crop(b - entry.get_seq_length())  # a negative count: drop tokens after b
                self._entries[(scope, tuple(ids[:b]))] = entry
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            self.tokens_reused += start
            self.tokens_prefilled += len(ids) - start
        return Prefill(out.logits, cache, start, time.perf_counter() - t0)

    def stats(self) -> dict[str, Any]:
        n = self.lookups
        return {"lookups": n, "hits": self.hits, "passage_hits": self.passage_hits, "entries": len(self._entries),
                "hit_rate": round(self.hits / n, 4) if n else 0.0,
                "passage_hit_rate": round(self.passage_hits / n, 4) if n else 0.0,
                "tokens_reused": self.tokens_reused, "tokens_prefilled": self.tokens_prefilled}
