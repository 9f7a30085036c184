"""Placing retrieved passages in the prompt under a token budget.

The prompt is built from separately tokenized segments (template head, one segment per passage,
then the query and the template tail), so the token offsets after the head and after each passage
are exact: they are the points where a KV prefix cache may resume (see :mod:`.kvcache`).
``chat=True`` wraps passages and query in the tokenizer's chat template (for generation);
``chat=False`` prepends the passages to the text as plain context (for scoring a continuation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loramix.documents.retrieve import Passage

__all__ = ["PassagePrompt", "passage_prompt"]

_SENTINEL = "\x00LORAMIX-CONTENT\x00"
MIN_PIECE = 16  # a passage cut to fit the budget keeps at least this many tokens


@dataclass
class PassagePrompt:
    ids: list[int]
    boundaries: list[int]  # offsets after the head and after each passage (cacheable prefixes)
    passages: list[Passage] = field(default_factory=list)  # the passages that fit, in prompt order
    passage_tokens: int = 0


def _template_parts(tokenizer: Any) -> tuple[str, str]:
    if not getattr(tokenizer, "chat_template", None):
        return "", ""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                         add_generation_prompt=True)
    head, _, tail = str(text).partition(_SENTINEL)
    return head, tail


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def passage_prompt(tokenizer: Any, query: str, passages: Sequence[Passage], budget: int,
                   chat: bool = True) -> PassagePrompt:
    """Token ids of ``[head][passages...][query + tail]`` with at most ``budget`` passage tokens."""
    head, tail = _template_parts(tokenizer) if chat else ("", "")
    used: list[Passage] = []
    blocks: list[list[int]] = []
    spent = 0
    for p in passages:
        block = _ids(tokenizer, f"[{len(used) + 1}] {p.text.strip()}\n")
        if spent + len(block) > budget:
            room = budget - spent
            if room < MIN_PIECE:
                break
            block = block[: room - 1] + _ids(tokenizer, "\n")
        blocks.append(block)
        used.append(p)
        spent += len(block)
    intro = "Passages:\n" if (chat and used) else ""
    ids = _ids(tokenizer, head + intro)
    bounds = [len(ids)]
    for block in blocks:
        ids += block
        bounds.append(len(ids))
    joint = "\n" if used else ""
    ids += _ids(tokenizer, joint + query + tail)
    return PassagePrompt(ids=ids, boundaries=bounds, passages=used, passage_tokens=spent)
