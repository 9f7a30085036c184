"""Pack storage: bulk adds, crash safety under injected failures and kills, compaction."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from loramix.errors import AdapterExists, InvalidAdapter
from loramix.store import Library, NewAdapter

from .helpers import nano, synthetic_basis, unit_keys


@pytest.fixture
def lib(tmp_path):
    lib = Library(tmp_path / "lib")
    lib.put_basis(synthetic_basis())
    yield lib
    lib.close()


def _items(basis, n, start=0, keys=True):
    vecs = unit_keys(n + start)
    return [NewAdapter(f"a{i}", nano(basis, i), domain_tags=[f"t{i % 7}"], key=vecs[i] if keys else None)
            for i in range(start, start + n)]


def test_add_many_packs_and_loads(lib):
    basis = lib.nano_basis(synthetic_basis().id)
    gen0 = lib.generation
    ids = lib.add_many(_items(basis, 300), batch_size=128)
    assert len(ids) == len(set(ids)) == 300 == len(lib)
    assert lib.generation > gen0
    assert len(lib.packs.pack_numbers()) == 1 and not any((lib.home / "blobs").rglob("*.safetensors"))
    for i in (0, 150, 299):
        rec = lib.get(f"a{i}")
        assert rec.kind == "nano" and rec.has_key and rec.domain_tags == [f"t{i % 7}"]
        got = lib.load_nano(rec.id)
        assert all(torch.equal(got.cores[p], nano(basis, i).cores[p]) for p in basis.layers)
    assert len(lib.list(tags=["t3"])) == len([i for i in range(300) if i % 7 == 3])
    assert lib.keys()[1].shape == (300, 16)


def test_load_by_id_takes_one_query_and_equals_load_by_name(lib):
    basis = lib.nano_basis(synthetic_basis().id)
    ids = lib.add_many(_items(basis, 20))
    by_id, by_name = lib.load(ids[7]), lib.load("a7")  # by id: record and pack entry joined in one query
    assert lib._load_packed_id(ids[7]) is not None and lib._load_packed_id("a7") is None
    assert by_id.layers.keys() == by_name.layers.keys()
    for p, (a, b) in by_id.layers.items():
        assert torch.equal(a, by_name.layers[p][0]) and torch.equal(b, by_name.layers[p][1])
        assert torch.allclose(b @ a, nano(basis, 7).delta(p, basis), atol=1e-5)


def test_add_many_is_all_or_nothing_per_batch(lib):
    basis = lib.nano_basis(synthetic_basis().id)
    lib.add_many(_items(basis, 5))
    size = lib.packs.disk_bytes()
    with pytest.raises(AdapterExists, match="a3"):
        lib.add_many(_items(basis, 5, start=3))  # a3, a4 taken
    with pytest.raises(AdapterExists, match="twice"):
        lib.add_many([NewAdapter("x", nano(basis, 1)), NewAdapter("x", nano(basis, 2))])
    bad = nano(basis, 9)
    bad.cores[next(iter(bad.cores))][0, 0] = float("inf")
    with pytest.raises(InvalidAdapter, match="infinite"):
        lib.add_many([NewAdapter("ok", nano(basis, 8)), NewAdapter("bad", bad)])
    assert len(lib) == 5 and lib.packs.disk_bytes() == size  # nothing written for the failed batches


def test_injected_fault_after_pack_write_leaves_nothing(lib):
    basis = lib.nano_basis(synthetic_basis().id)
    lib.add_many(_items(basis, 3))
    size, gen = lib.packs.disk_bytes(), lib.generation
    lib.packs.fault = "after_write"
    with pytest.raises(OSError, match="injected"):
        lib.add_many(_items(basis, 4, start=3))
    lib.packs.fault = None
    assert len(lib) == 3 and lib.generation == gen
    assert lib.packs.disk_bytes() == size  # the append was truncated away
    assert lib._read("SELECT COUNT(*) FROM pack_entries")[0][0] == 3
    lib.add_many(_items(basis, 4, start=3))
    assert len(lib) == 7 and all(lib.load_nano(f"a{i}") for i in range(7))


def test_remove_then_compact_reclaims_bytes(lib):
    basis = lib.nano_basis(synthetic_basis().id)
    lib.add_many(_items(basis, 40))
    before = lib.packs.disk_bytes()
    for i in range(0, 40, 2):
        lib.remove(f"a{i}")
    assert lib.packs.disk_bytes() == before  # append-only: removal frees nothing yet
    rep = lib.compact()
    assert rep.entries_dropped == 20 and lib.packs.disk_bytes() < before * 0.6
    for i in range(1, 40, 2):  # survivors still load, from the new pack
        assert torch.equal(lib.load_nano(f"a{i}").cores[next(iter(basis.layers))],
                           nano(basis, i).cores[next(iter(basis.layers))])
    assert lib.compact().entries_dropped == 0  # idempotent
    lib.add_many(_items(basis, 2, start=100))
    assert lib.load_nano("a101")


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from loramix.store import Library, NewAdapter
    from scale.helpers import nano, synthetic_basis
    lib = Library({home!r})
    basis = lib.nano_basis(synthetic_basis().id)
    start = int(sys.argv[1])
    print("ready", flush=True)
    i = start
    while True:
        lib.add_many([NewAdapter(f"k{{j}}", nano(basis, j % 50)) for j in range(i, i + 25)], batch_size=25)
        i += 25
""")


def test_kill_at_any_moment_leaves_no_half_adapter(tmp_path):
    """SIGKILL a process writing batches at random moments: every committed row loads, no row lacks
    data, and compaction afterwards drops only unreferenced bytes."""
    home = tmp_path / "lib"
    Library(home).put_basis(synthetic_basis())
    tests_dir = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=tests_dir, home=str(home)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = 0
    for delay in (0.05, 0.3, 0.11, 0.7, 0.2):
        proc = subprocess.Popen([sys.executable, str(script), str(start)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with Library(home) as lib:
            n = len(lib)
            assert n % 25 == 0  # whole batches only
            for rec in lib.list():
                lib.load_nano(rec.id)  # every row has its bytes, crc checked
            start = 10_000 * (start // 10_000 + 1)
    with Library(home) as lib:
        n = len(lib)
        lib.compact()
        assert len(lib) == n and all(lib.load_nano(r.id) for r in lib.list())
        live = lib._read("SELECT COALESCE(SUM(length), 0) FROM pack_entries")[0][0]
        assert lib.packs.disk_bytes() == live  # no orphan bytes left after compaction
