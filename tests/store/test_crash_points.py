"""Real crashes (``os._exit(137)`` in a child process) at every step of add, remove, merge and key computation.

After each crash the library must hold every adapter whole or not at all: each row's blob exists
and loads with the right sha256, the adapter being written is either complete or absent, the one
being removed is either complete or gone, and ``gc`` removes whatever the crash left behind.
The children use the hash stand-in encoder (routing quality is not under test here).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from loramix.app import Loramix
from loramix.errors import AdapterExists, AdapterNotFound
from loramix.lora import LoraWeights
from loramix.route import Router
from loramix.store import Library, faults
from loramix.testing import HashEncoder

CHILD = textwrap.dedent('''
    import sys
    from loramix.store import Library

    def weights(seed):
        import torch
        from loramix.lora import LoraWeights

        g = torch.Generator().manual_seed(seed)
        layers = {f"model.layers.{i}.self_attn.q_proj": (torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g))
                  for i in range(2)}
        return LoraWeights(rank=4, alpha=8.0, layers=layers)

    op, home = sys.argv[1], sys.argv[2]
    if op in ("add", "add_shared", "merge"):  # the engine (its router with the stand-in encoder)
        import loramix.route.router as router_mod
        from loramix.app import Loramix
        from loramix.testing import HashEncoder

        router_mod.get_encoder = lambda *a, **k: HashEncoder()
    if op == "add":
        Loramix(home).add_weights(weights(100), "new", description="new one", examples=["a new example"])
    elif op == "add_shared":  # same bytes as "victim": the blob is shared
        Loramix(home).add_weights(weights(1), "new", examples=["a twin"])
    elif op == "remove":
        Library(home).remove("victim")
    elif op == "merge":
        Loramix(home).merge(["victim", "other"], [0.5, 0.5], "linear", "new")
    elif op == "gc":
        Library(home).gc(stale_after=0)
    print("finished")
''')


def _weights(seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    layers = {f"model.layers.{i}.self_attn.q_proj": (torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g))
              for i in range(2)}
    return LoraWeights(rank=4, alpha=8.0, layers=layers)


def _setup(home: Path) -> None:
    lib = Library(home)
    lib.add_weights(_weights(1), "victim", examples=["victim example"])
    lib.add_weights(_weights(2), "other", description="the other one")
    Router(lib, encoder=HashEncoder())  # keys both
    lib.close()


def _run_child(tmp_path: Path, op: str, home: Path, point: str | None) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(faults.ENV, None)
    if point:
        env[faults.ENV] = f"{point}:exit"
    return subprocess.run([sys.executable, str(script), op, str(home)], capture_output=True, text=True, env=env,
                          timeout=300)


def check_library(home: Path) -> Library:
    """Every row's blob exists and verifies; gc leaves exactly the referenced blobs and no temp files."""
    lib = Library(home)
    recs = lib.list()
    assert len({r.name for r in recs}) == len(recs)
    for r in recs:
        assert lib.blobs.exists(r.blob), f"{r.name}: row without its blob"
        w = lib.load(r.id, verify=True)
        assert w.layers and w.rank == r.rank
    lib.gc(stale_after=0)
    on_disk = set(lib.blobs.iter_shas())
    assert on_disk == {r.blob for r in recs}
    assert list(lib.blobs.tmp.iterdir()) == []
    return lib


CASES = [
    ("add", "add.after_temp_write"),
    ("add", "add.after_place"),
    ("add", "add.before_commit"),
    ("add", "add.after_commit"),
    ("add", "key.before_commit"),
    ("add_shared", "add.after_place"),
    ("add_shared", "add.before_commit"),
    ("remove", "remove.after_row_delete"),
    ("remove", "remove.after_commit"),
    ("remove", "remove.after_blob_delete"),
    ("merge", "merge.before_add"),
    ("merge", "add.after_place"),
    ("merge", "add.after_commit"),
    ("gc", "gc.after_blob_delete"),
]


def test_every_fault_point_is_exercised() -> None:
    assert {p for _, p in CASES} == set(faults.POINTS)


@pytest.mark.parametrize("op, point", CASES)
def test_crash_at_each_step_leaves_adapters_whole_or_gone(tmp_path: Path, op: str, point: str) -> None:
    home = tmp_path / "home"
    _setup(home)
    if op == "gc":  # something for gc to delete: an orphan blob left by an interrupted remove
        lib = Library(home)
        orphan, _ = lib.blobs.put(b"not referenced by any row")
        lib.close()
    proc = _run_child(tmp_path, op, home, point)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert "finished" not in proc.stdout
    lib = check_library(home)
    names = {r.name for r in lib.list()}
    if op in ("add", "add_shared", "merge"):
        assert names in ({"victim", "other"}, {"victim", "other", "new"})
        if "new" in names:  # committed: whole, and keyed at the next engine start if the crash came first
            router = Router(lib, encoder=HashEncoder())
            assert lib.get("new").has_key and lib.get("new").id in router.keyed_ids()
    elif op == "remove":
        # the row's deletion commits first; every later crash leaves only an orphan blob, which gc removed
        assert names == ({"victim", "other"} if point == "remove.after_row_delete" else {"other"})
    else:
        assert names == {"victim", "other"} and not lib.blobs.exists(orphan)
    # the library still works: the interrupted operation can be redone (or fails only because it was done)
    done = "new" in names if op in ("add", "add_shared", "merge") else op == "remove" and "victim" not in names
    if done:
        with pytest.raises(AdapterExists if op != "remove" else AdapterNotFound):
            _redo(op, lib)
    else:
        _redo(op, lib)
    check_library(home)


def _redo(op: str, lib: Library) -> None:
    """The child's operation, in this process and without a fault."""
    eng = Loramix(lib.home)
    eng._lib, eng._router = lib, Router(lib, encoder=HashEncoder())
    if op == "add":
        eng.add_weights(_weights(100), "new", description="new one", examples=["a new example"])
    elif op == "add_shared":
        eng.add_weights(_weights(1), "new", examples=["a twin"])
    elif op == "remove":
        lib.remove("victim")
    elif op == "merge":
        eng.merge(["victim", "other"], [0.5, 0.5], "linear", "new")
    else:
        lib.gc(stale_after=0)


def test_in_process_fault_rolls_back(tmp_path: Path, snapshot) -> None:
    """The same points armed to raise: the failed call leaves the library as it was."""
    home = tmp_path / "home"
    _setup(home)
    lib = Library(home)
    for point in ("add.after_place", "add.before_commit"):
        before = snapshot(lib)
        faults.arm(point)
        try:
            with pytest.raises(faults.InjectedFault):
                lib.add_weights(_weights(9), "new")
        finally:
            faults.disarm()
        lib.gc(stale_after=0)
        assert snapshot(lib) == before
    before = snapshot(lib)
    faults.arm("remove.after_row_delete")
    try:
        with pytest.raises(faults.InjectedFault):
            lib.remove("victim")
    finally:
        faults.disarm()
    assert snapshot(lib) == before and lib.load("victim").rank == 4
