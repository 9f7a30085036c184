"""``loramix docs``: document collections for retrieval-augmented answers (registered by loramix.cli)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from loramix.config import DocsConfig

if TYPE_CHECKING:
    from loramix.app import Loramix

console = Console(stderr=True)
out = Console(highlight=False, soft_wrap=True)
Home = Annotated[Path | None, typer.Option("--home", envvar="LORAMIX_HOME", help="Library folder (default ~/.loramix).")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
_D = DocsConfig()


def _engine(home: Path | None) -> Loramix:
    from loramix.app import Loramix

    return Loramix(home=home)


def _csv(s: str) -> list[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


def _print_json(obj: Any) -> None:
    out.print(json.dumps(obj, default=str), markup=False, highlight=False)

docs_app = typer.Typer(no_args_is_help=True, help="Document collections: passages for ask/score/train --docs.")


@docs_app.command("add")
def docs_add(source: Annotated[str, typer.Argument(help="A .txt or .jsonl file, or a corpus as --data takes it (zoology, computing, dictd:NAME, fortune:NAME, ...).")],
             collection: Annotated[str, typer.Option("--collection", help="Name of the new collection.")],
             tags: Annotated[str, typer.Option("--tags", help="Tags, comma-separated (route-picked with --docs auto or tag:NAME).")] = "",
             chunk_words: Annotated[int, typer.Option("--chunk-words", help="Words per chunk.")] = _D.chunk_words,
             overlap: Annotated[int, typer.Option("--overlap", help="Words shared by consecutive chunks.")] = _D.chunk_overlap,
             limit: Annotated[int | None, typer.Option("--limit", help="Read at most this many documents.")] = None,
             tenant: Annotated[str | None, typer.Option("--tenant", help="Owner tenant: only it (and the operator) "
                                                        "reads the collection over HTTP; default: shared by all.")] = None,
             public: Annotated[bool, typer.Option("--public", help="With --tenant: every tenant may read it.")] = False,
             home: Home = None, as_json: Json = False) -> None:
    """Chunk, embed and store a source as a new collection (all of it or nothing)."""
    cfg = DocsConfig(chunk_words=chunk_words, chunk_overlap=overlap)
    rec = _engine(home).add_docs(collection, source=source, tags=_csv(tags), cfg=cfg, limit=limit, owner=tenant,
                                 public=public)
    if as_json:
        _print_json(rec.to_dict())
    else:
        console.print(f"added [bold]{rec.name}[/]: {rec.n_docs} documents, {rec.n_chunks} chunks")


@docs_app.command("list")
def docs_list(home: Home = None, as_json: Json = False) -> None:
    """List the document collections."""
    recs = _engine(home).docs.list()
    if as_json:
        _print_json([r.to_dict() for r in recs])
        return
    table = Table("name", "id", "docs", "chunks", "tags", "owner", "source")
    for r in recs:
        owner = "(shared)" if r.owner is None else r.owner + (" (public)" if r.public else "")
        table.add_row(r.name, r.id, str(r.n_docs), str(r.n_chunks), ",".join(r.tags), owner, r.source[:50])
    out.print(table)


@docs_app.command("show")
def docs_show(name: str, chunks: Annotated[int, typer.Option("--chunks", help="Also print the first N chunks.")] = 0,
              home: Home = None, as_json: Json = False) -> None:
    """Show one collection (and optionally its first chunks)."""
    store = _engine(home).docs
    d = store.get(name).to_dict()
    if chunks:
        d["chunks"] = [c.__dict__ for c in store.chunks(collection=d["name"])[:chunks]]
    if as_json:
        _print_json(d)
    else:
        for k, v in d.items():
            out.print(f"[bold]{k}[/]: {v}", markup=True)


@docs_app.command("rm")
def docs_rm(name: str, home: Home = None) -> None:
    """Remove a collection (its chunks leave the index at the next retrieval)."""
    rec = _engine(home).remove_docs(name)
    console.print(f"removed {rec.name} ({rec.n_chunks} chunks)")


@docs_app.command("search")
def docs_search(query: str, docs: Annotated[str, typer.Option("--docs", help="Collections (names, tag:NAME).")],
                passages: Annotated[int, typer.Option("--passages")] = 5,
                fusion: Annotated[str, typer.Option("--fusion", help="rrf | mix | dense | bm25.")] = _D.fusion,
                dense_weight: Annotated[float, typer.Option("--dense-weight",
                                                            help="fusion mix: weight of dense (rest BM25).")] = _D.dense_weight,
                home: Home = None, as_json: Json = False) -> None:
    """Retrieve passages for a query (no language model involved)."""
    got = _engine(home).retrieve(query, DocsConfig(collections=_csv(docs), passages=passages, fusion=fusion,
                                                   dense_weight=dense_weight))
    if as_json:
        _print_json([p.to_dict(with_text=True) for p in got])
        return
    for i, p in enumerate(got, 1):
        out.print(f"[{i}] {p.collection}:{p.key} ({p.id}) {p.score:.4f}  {p.text[:160]}", markup=False)


@docs_app.command("stats")
def docs_stats(home: Home = None) -> None:
    """Collection and cache counters of this process's engine (caches start empty in a new process)."""
    eng = _engine(home)
    eng.retriever, eng.kv_cache  # noqa: B018  (built so their counters are reported)
    _print_json(eng.stats())
