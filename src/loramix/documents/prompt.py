"""Placing retrieved passages in the prompt under a token budget.

The prompt is built from separately tokenized segments (template head, one segment per passage,
then the query and the template tail), so the token offsets after the head and after each passage
are exact: they are the points where a KV prefix cache may resume (see :mod:`.kvcache`).
``chat=True`` wraps passages and query in the tokenizer's chat template (for generation);
``chat=False`` prepends the passages to the text as plain context (for scoring a continuation).
With ``messages`` (a whole chat), the passages go at the start of the last user message and the
earlier turns are part of the template head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loramix.documents.retrieve import Passage
from loramix.errors import ConfigError

__all__ = ["PassagePrompt", "passage_prompt"]

_SENTINEL = "\x00LORAMIX-CONTENT\x00"
MIN_PIECE = 16  # a passage cut to fit the budget keeps at least this many tokens


@dataclass
class PassagePrompt:
    ids: list[int]
    boundaries: list[int]  # offsets after the head and after each passage (cacheable prefixes)
    passages: list[Passage] = field(default_factory=list)  # the passages that fit, in prompt order
    passage_tokens: int = 0


def _template_parts(tokenizer: Any, messages: Sequence[dict[str, Any]] | None = None) -> tuple[str, str]:
    """The chat template's text before and after the last user message's content."""
    msgs = [dict(m) for m in messages] if messages else [{"role": "user", "content": ""}]
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=None)
    if last is None:
        raise ConfigError("passages go into the last user message, and this chat has none; expected a message "
                          "with role 'user'")
    msgs[last]["content"] = _SENTINEL
    if not getattr(tokenizer, "chat_template", None):
        if messages is None:
            return "", ""
        text = "\n".join(f"{m.get('role', 'user')}: {m.get('content')}" for m in msgs) + "\nassistant:"
    else:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    head, _, tail = str(text).partition(_SENTINEL)
    return head, tail


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def passage_prompt(tokenizer: Any, query: str, passages: Sequence[Passage], budget: int,
                   chat: bool = True, messages: Sequence[dict[str, Any]] | None = None) -> PassagePrompt:
    """Token ids of ``[head][passages...][query + tail]`` with at most ``budget`` passage tokens.

    ``messages`` (with ``chat``): the whole chat; ``query`` must be its last user message's text."""
    head, tail = _template_parts(tokenizer, messages) if chat else ("", "")
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
