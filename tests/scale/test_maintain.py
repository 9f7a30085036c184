"""dedupe, prune, stats, compact and bulk import, through the library API and the CLI."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loramix.cli import app
from loramix.maintain import dedupe, prune
from loramix.route.ann import AnnIndex
from loramix.store import Library, NewAdapter
from loramix.store.peft_io import write_peft_dir
from loramix.testing import random_lora

from .helpers import nano, synthetic_basis, unit_keys

runner = CliRunner()


def snapshot(home: Path) -> dict[str, str]:
    return {str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(home.rglob("*")) if p.is_file()}


@pytest.fixture
def dup_lib(tmp_path):
    """12 distinct nano adapters plus near-copies: a7 ~ a7b ~ a7c, a2 ~ a2b; and a2x with a2's key but other weights."""
    home = tmp_path / "lib"
    lib = Library(home)
    basis = synthetic_basis()
    lib.put_basis(basis)
    keys = unit_keys(12)
    items = [NewAdapter(f"a{i}", nano(basis, i), domain_tags=[f"t{i}"], key=keys[i]) for i in range(12)]
    for name, src in (("a7b", 7), ("a7c", 7), ("a2b", 2)):
        w = nano(basis, src)
        w.cores = {p: m + 0.01 * torch.randn_like(m) for p, m in w.cores.items()}
        items.append(NewAdapter(name, w, domain_tags=["copy"], key=keys[src] + 0.01))
    items.append(NewAdapter("a2x", nano(basis, 99), key=keys[2]))  # same key, unrelated weights: not a duplicate
    lib.add_many(items)
    lib.record_use(["a7b", "a7b", "a2"])
    lib.close()
    return home


def test_dedupe_dry_run_is_byte_identical_and_reports(dup_lib):
    before = snapshot(dup_lib)
    res = runner.invoke(app, ["adapters", "dedupe", "--home", str(dup_lib), "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    names = sorted(sorted(m["name"] for m in g) for g in rep["groups"])
    assert names == [["a2", "a2b"], ["a7", "a7b", "a7c"]]  # a2x shares a2's key but not its weights
    assert rep["dry_run"] and not rep["merged"]
    assert snapshot(dup_lib) == before


def test_dedupe_merges_groups_and_records_replacements(dup_lib):
    lib = Library(dup_lib)
    basis = synthetic_basis()
    avg = {p: sum(lib.load_nano(n).cores[p].float() for n in ("a7", "a7b", "a7c")) / 3 for p in basis.layers}
    index = AnnIndex(None)
    index.sync(lib)
    rep = dedupe(lib, index)
    assert len(rep.merged) == 2 and len(lib) == 16 - 3
    merged = lib.get("a7b")  # the most used member's name
    assert merged.kind == "nano" and {r["name"] for r in merged.meta["replaces"]} == {"a7", "a7b", "a7c"}
    assert set(merged.domain_tags) == {"t7", "copy"} and merged.has_key
    got = lib.load_nano("a7b")
    assert all(torch.allclose(got.cores[p], avg[p]) for p in basis.layers)
    assert "a7" not in lib and "a7c" not in lib and "a2x" in lib


def test_prune_dry_run_then_real(tmp_path):
    home = tmp_path / "lib"
    lib = Library(home)
    basis = synthetic_basis()
    lib.put_basis(basis)
    lib.add_many([NewAdapter(f"p{i}", nano(basis, i)) for i in range(6)])
    lib.record_use(["p0", "p1", "p1"])
    lib.close()
    before = snapshot(home)
    future = time.time() + 10 * 86400
    with Library(home) as lib:
        rep = prune(lib, unused_days=5, max_uses=1, dry_run=True, now=future)
    assert sorted(r["name"] for r in rep.removed) == ["p0", "p2", "p3", "p4", "p5"]
    assert snapshot(home) == before
    res = runner.invoke(app, ["adapters", "prune", "--home", str(home), "--unused-days", "5", "--max-uses", "1",
                              "--dry-run", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["count"] == 0  # nothing is 5 days old yet
    assert snapshot(home) == before
    with Library(home) as lib:
        rep = prune(lib, unused_days=5, max_uses=1, now=future)
        assert [r.name for r in lib.list()] == ["p1"] and len(rep.removed) == 5


def test_stats_compact_and_list_pages(dup_lib):
    with Library(dup_lib) as lib:
        lib.remove("a0")
    res = runner.invoke(app, ["stats", "--home", str(dup_lib), "--json"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.stdout)
    assert st["adapters"] == 15 and st["by_kind"] == {"nano": 15} and st["keyed"] == 15
    assert st["use_histogram"]["0"] == 13 and st["use_histogram"]["1"] == 1 and st["use_histogram"]["2-9"] == 1
    assert st["packs"]["reclaimable_bytes"] > 0
    res = runner.invoke(app, ["adapters", "compact", "--home", str(dup_lib), "--json"])
    assert json.loads(res.stdout)["entries_dropped"] == 1
    st = json.loads(runner.invoke(app, ["stats", "--home", str(dup_lib), "--json"]).stdout)
    assert st["packs"]["reclaimable_bytes"] == 0
    page = json.loads(runner.invoke(app, ["adapters", "list", "--home", str(dup_lib), "--json", "--limit", "4",
                                          "--offset", "2"]).stdout)
    assert [r["name"] for r in page] == ["a3", "a4", "a5", "a6"]


def test_cli_import_folder_and_manifest(tmp_path, tiny_base, tiny_base_dir):
    src = tmp_path / "src"
    for i in range(3):
        write_peft_dir(random_lora(tiny_base, seed=i), src / f"lora{i}")
    home = tmp_path / "lib"
    res = runner.invoke(app, ["adapters", "import", str(src), "--home", str(home), "--base", str(tiny_base_dir),
                              "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["imported"] == 3
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"path": f"src/lora{i}", "name": f"m{i}", "tags": ["x"],
                                              "description": f"d{i}"}) for i in range(3)) + "\n")
    res = runner.invoke(app, ["adapters", "import", str(manifest), "--home", str(home), "--base", str(tiny_base_dir)])
    assert res.exit_code == 0, res.output
    with Library(home) as lib:
        assert len(lib) == 6 and lib.get("m1").description == "d1" and lib.get("m1").domain_tags == ["x"]
        w = lib.load("m2")
        ref = random_lora(tiny_base, seed=2)
        assert all(torch.equal(w.delta(p), ref.delta(p)) for p in ref.layers)
        assert lib.packs.disk_bytes() > 0  # small LoRAs are packed too
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "src/lora0"}\n')
    res = runner.invoke(app, ["adapters", "import", str(bad), "--home", str(home), "--base", str(tiny_base_dir)])
    assert res.exit_code != 0 and "'name'" in str(res.exception or res.output)


def test_list_and_show_fast_on_many_rows(tmp_path):
    """A 200k-row registry: a page of `adapters list` and `show` answer well under a second."""
    home = tmp_path / "big"
    Library(home).close()
    import sqlite3

    conn = sqlite3.connect(home / "registry.sqlite")
    rows = [(f"{i:016x}", f"n{i}", "", "[]", "[]", 8, 8.0, "[]", 100, 0.0, 0, "0" * 64, "{}", "nano")
            for i in range(200_000)]
    with conn:
        conn.executemany("INSERT INTO adapters (id, name, description, domain_tags, skill_tags, rank, alpha, "
                         "target_modules, n_params, created, use_count, blob, meta, kind) "
                         "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    conn.close()
    res = runner.invoke(app, ["adapters", "list", "--home", str(home), "--json", "--limit", "20", "--offset", "150000"])
    assert res.exit_code == 0 and [r["name"] for r in json.loads(res.stdout)][:2] == ["n150000", "n150001"]
    res = runner.invoke(app, ["adapters", "show", "n199999", "--home", str(home), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["kind"] == "nano"
    with Library(home) as lib:  # what list/show run, timed without the CLI's start-up
        t = time.perf_counter()
        page = lib.list(limit=100, offset=199_000)
        rec = lib.get("n123456")
        lib.examples(rec.id), lib.events(rec.id, limit=20), len(lib)
        assert time.perf_counter() - t < 1.0 and len(page) == 100


def test_list_and_show_never_import_torch(dup_lib):
    import subprocess
    import sys

    code = ("import sys\nfrom typer.testing import CliRunner\nfrom loramix.cli import app\n"
            f"r = CliRunner().invoke(app, ['adapters', 'list', '--home', {str(dup_lib)!r}, '--json', '--limit', '5'])\n"
            f"s = CliRunner().invoke(app, ['adapters', 'show', 'a7', '--home', {str(dup_lib)!r}, '--json'])\n"
            "assert r.exit_code == 0 and s.exit_code == 0, (r.output, s.output)\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
