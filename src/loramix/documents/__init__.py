"""Document collections for retrieval-augmented generation: store, retrieval, prompt fusion, KV prefix cache.

Named ``documents`` (not ``docs``) so it never shadows the repository's ``docs/`` folder.
"""

from loramix.documents.kvcache import Prefill, PrefixKVCache
from loramix.documents.prompt import PassagePrompt, passage_prompt
from loramix.documents.retrieve import Passage, Retriever, lm_rerank, mix_scores, rrf
from loramix.documents.sources import read_source
from loramix.documents.store import Chunk, CollectionRecord, DocStore, chunk_text

__all__ = [
    "Chunk",
    "CollectionRecord",
    "DocStore",
    "Passage",
    "PassagePrompt",
    "Prefill",
    "PrefixKVCache",
    "Retriever",
    "chunk_text",
    "lm_rerank",
    "mix_scores",
    "passage_prompt",
    "read_source",
    "rrf",
]
