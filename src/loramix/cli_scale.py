"""CLI commands for libraries at scale: bulk import, compaction, dedupe, prune and stats.

Registered on the ``loramix`` app by :mod:`loramix.cli` (``register(app, adapters_app)``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from loramix.errors import InvalidAdapter

console = Console(stderr=True)
out = Console(highlight=False, soft_wrap=True)
Home = Annotated[Path | None, typer.Option("--home", envvar="LORAMIX_HOME", help="Library folder (default ~/.loramix).")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Only report; change nothing.")]


def _print_json(obj: Any) -> None:
    out.print(json.dumps(obj, default=str), markup=False, highlight=False)


def _manifest(src: Path) -> Iterator[dict[str, Any]]:
    """Entries {path, name, ...}: a JSONL manifest's lines, or a folder's PEFT subfolders named after them."""
    if src.is_dir():
        if (src / "adapter_config.json").is_file():
            raise InvalidAdapter(f"{src} is a single PEFT folder; use `loramix adapters add {src} --name NAME`, "
                                 "or pass the folder holding one subfolder per adapter")
        for sub in sorted(p for p in src.iterdir() if p.is_dir()):
            yield {"path": str(sub), "name": sub.name}
        return
    if not src.is_file():
        raise InvalidAdapter(f"{src} does not exist; expected a folder of PEFT folders or a JSONL manifest")
    for n, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidAdapter(f"{src} line {n} is not JSON ({e}); expected {{\"path\": ..., \"name\": ...}}") from e
        if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not isinstance(row.get("name"), str):
            raise InvalidAdapter(f"{src} line {n}: expected an object with string fields 'path' and 'name' "
                                 "(optional: description, tags, skills, examples)")
        p = Path(row["path"]).expanduser()
        row["path"] = str(p if p.is_absolute() else src.parent / p)
        yield row


def register(app: typer.Typer, adapters_app: typer.Typer) -> None:
    @adapters_app.command("import")
    def adapters_import(src: Path, home: Home = None,
                        base: Annotated[str | None, typer.Option("--base", envvar="LORAMIX_BASE", help="Base model folder whose shapes the adapters must match (default: loramix's default base).")] = None,
                        batch_size: Annotated[int, typer.Option("--batch-size", help="Adapters per transaction.")] = 1000,
                        as_json: Json = False) -> None:
        """Bulk-import a folder of PEFT LoRA folders (named after them) or a JSONL manifest of {path, name,
        description, tags, skills, examples}, in large transactions (a failing batch adds nothing).
        Routing keys are computed on the next route."""
        from loramix.base import base_linear_shapes
        from loramix.store import Library, NewAdapter
        from loramix.store.peft_io import read_peft_dir

        lib = Library(home, base_shapes=base_linear_shapes(base))

        def items() -> Iterator[NewAdapter]:
            for row in _manifest(src):
                w = read_peft_dir(row["path"], lib.base_shapes, lib.max_bytes)
                tags = row.get("tags") or []
                skills = row.get("skills") or []
                yield NewAdapter(row["name"], w, description=row.get("description", ""),
                                 domain_tags=[tags] if isinstance(tags, str) else tags,
                                 skill_tags=[skills] if isinstance(skills, str) else skills,
                                 examples=row.get("examples"))

        ids = lib.add_many(items(), batch_size=batch_size,
                           progress=None if as_json else lambda n: console.print(f"imported {n}"))
        if as_json:
            _print_json({"imported": len(ids), "ids": ids})
        else:
            console.print(f"imported {len(ids)} adapters into {lib.home}")

    @adapters_app.command("compact")
    def adapters_compact(home: Home = None, as_json: Json = False) -> None:
        """Rewrite pack files holding removed adapters' bytes; reclaims the space."""
        from loramix.store import Library

        with Library(home) as lib:
            rep = lib.compact()
        d = {"packs_before": rep.packs_before, "packs_after": rep.packs_after, "bytes_before": rep.bytes_before,
             "bytes_after": rep.bytes_after, "reclaimed": rep.reclaimed, "entries_dropped": rep.entries_dropped}
        if as_json:
            _print_json(d)
        else:
            console.print(f"reclaimed {rep.reclaimed:,} bytes ({rep.entries_dropped} dead entries)")

    @adapters_app.command("dedupe")
    def adapters_dedupe(home: Home = None,
                        threshold: Annotated[float, typer.Option("--threshold", help="Weight-delta cosine confirming a duplicate.")] = 0.95,
                        key_threshold: Annotated[float, typer.Option("--key-threshold", help="Key cosine making a candidate pair.")] = 0.9,
                        method: Annotated[str, typer.Option("--method", help="Merge method for LoRA groups (nano groups average their cores).")] = "svd",
                        dry_run: DryRun = False, as_json: Json = False) -> None:
        """Merge near-duplicate adapters: candidates by key similarity through the index, confirmed by the
        cosine of their weight deltas; each group becomes one adapter recording what it replaced."""
        from loramix.maintain import dedupe
        from loramix.route.ann import AnnIndex
        from loramix.store import Library

        with Library(home) as lib:
            index = AnnIndex(None)
            index.sync(lib)  # in memory: a dry run writes nothing
            rep = dedupe(lib, index, threshold=threshold, key_threshold=key_threshold, method=method, dry_run=dry_run)
        if as_json:
            _print_json(rep.to_dict())
            return
        console.print(f"{rep.candidates} candidate pairs, {rep.confirmed} confirmed, {len(rep.groups)} groups"
                      + (" (dry run: nothing changed)" if dry_run else ""))
        for g in rep.groups:
            console.print("  " + ", ".join(f"{m['name']} ({m['uses']} uses, cos {m['cosine_to_first']})" for m in g))

    @adapters_app.command("prune")
    def adapters_prune(unused_days: Annotated[float, typer.Option("--unused-days", help="Not used (or created) for this many days.")],
                       max_uses: Annotated[int, typer.Option("--max-uses", help="Used at most this many times.")],
                       home: Home = None, dry_run: DryRun = False, as_json: Json = False) -> None:
        """Remove adapters nobody uses: at most --max-uses uses and none in --unused-days days."""
        from loramix.maintain import prune
        from loramix.store import Library

        with Library(home) as lib:
            rep = prune(lib, unused_days, max_uses, dry_run=dry_run)
        if as_json:
            _print_json(rep.to_dict())
            return
        verb = "would remove" if dry_run else "removed"
        console.print(f"{verb} {len(rep.removed)} adapters, kept {rep.kept}")
        for r in rep.removed[:50]:
            console.print(f"  {r['name']} ({r['uses']} uses)")

    @app.command("stats")
    def stats(home: Home = None, as_json: Json = False) -> None:
        """Library statistics: counts, bytes on disk, use histogram, packs; plus the last snapshot a running
        engine wrote (loaded adapters, slot / memory-tier / routing-cache / retrieval-cache / passage KV
        prefix cache hit rates; a server writes it every few seconds while it generates)."""
        from loramix.maintain import library_stats
        from loramix.store import Library

        with Library(home) as lib:
            d = library_stats(lib)
        snap = lib.home / "meta" / "stats" / "engine.json"
        if snap.is_file():
            d["engine"] = json.loads(snap.read_text())
        if as_json:
            _print_json(d)
            return
        for k, v in d.items():
            out.print(f"[bold]{k}[/]: {v}")
