"""Reading a collection's source: what ``--data`` accepts, plus each document's key when it has one."""

from __future__ import annotations

from pathlib import Path

from loramix.errors import DocumentError, TrainingError

KEY_FIELDS = ("id", "key", "title", "name")


def read_source(spec: str, limit: int | None = None) -> tuple[list[str], list[str]]:
    """(texts, keys) for a text file, a JSONL file (key from its ``id``/``key``/``title``/``name`` field),
    a corpus domain (key: the headword, book or page) or any other ``--data`` source (key: the position)."""
    from loramix.train import corpora

    try:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix in (".jsonl", ".ndjson"):
            texts: list[str] = []
            keys: list[str] = []
            for row, text in corpora.jsonl_rows(path):
                if text.strip():
                    key = next((str(row[f]) for f in KEY_FIELDS if f in row), str(len(texts)))
                    texts.append(text)
                    keys.append(key)
        elif not path.exists() and (spec in corpora.DOMAINS or spec in corpora.EXTRA_DOMAINS):
            docs = corpora.load_domain(spec, limit=limit)
            texts, keys = [d.text for d in docs], [d.key for d in docs]
        else:
            texts = corpora.load_source(spec, limit=limit)
            keys = [str(i) for i in range(len(texts))]
    except TrainingError as e:  # the corpus readers' errors, re-raised as the documents' kind
        raise DocumentError(str(e).replace("--data", "docs source")) from e
    if limit is not None:
        texts, keys = texts[:limit], keys[:limit]
    if not texts:
        raise DocumentError(f"docs source {spec!r}: no texts found")
    return texts, keys
