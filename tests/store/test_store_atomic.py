"""A rejected, failed or interrupted import or removal leaves the library exactly as it was."""

from __future__ import annotations

import json
import os
import sqlite3
import time

import numpy as np
import pytest
import torch

from loramix.errors import AdapterExists, InvalidAdapter
from loramix.store import Library, blobs


class FailingCommit:
    """Wraps the library's sqlite connection; COMMIT raises once."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, *args):
        if sql == "COMMIT":
            raise sqlite3.OperationalError("disk I/O error (injected)")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self._conn, name)


@pytest.fixture
def populated(lib, make_weights) -> Library:
    lib.add_weights(make_weights(0), "existing", domain_tags=["bio"], examples=["ex"], key=np.ones(4))
    lib.record_use(["existing"], event="used")
    return lib


def _boom(*args, **kwargs):
    raise RuntimeError("injected failure")


def test_failure_after_blob_written_leaves_library_unchanged(populated, make_weights, adapter_dir, snapshot,
                                                              monkeypatch):
    before = snapshot(populated)
    placed = []
    real_place = blobs.BlobStore.place

    def spy(self, tmp, sha):
        placed.append(real_place(self, tmp, sha))
        return placed[-1]

    monkeypatch.setattr(blobs.BlobStore, "place", spy)
    monkeypatch.setattr(Library, "_insert_rows", _boom)
    with pytest.raises(RuntimeError, match="injected"):
        populated.add(adapter_dir, "new", examples=["a", "b"], domain_tags=["x"])
    with pytest.raises(RuntimeError, match="injected"):
        populated.add_weights(make_weights(5), "new2", key=np.ones(4))
    assert placed == [True, True]  # the blobs really were written before the failure
    assert snapshot(populated) == before
    assert "new" not in populated and populated.load("existing").rank == 4


def test_interrupt_during_row_insert_leaves_library_unchanged(populated, make_weights, snapshot, monkeypatch):
    before = snapshot(populated)
    real = Library._set_tags
    calls = []

    def interrupt_on_skill_tags(c, adapter_id, kind, tags):
        calls.append(kind)
        if kind == "skill":  # adapter row and domain tags already inserted
            raise KeyboardInterrupt
        real(c, adapter_id, kind, tags)

    monkeypatch.setattr(Library, "_set_tags", staticmethod(interrupt_on_skill_tags))
    with pytest.raises(KeyboardInterrupt):
        populated.add_weights(make_weights(7), "new", domain_tags=["d"], skill_tags=["s"], examples=["x"])
    assert calls == ["domain", "skill"]
    assert snapshot(populated) == before


def test_failed_commit_removes_new_blob(populated, make_weights, snapshot):
    before = snapshot(populated)
    real = populated._conn
    populated._conn = FailingCommit(real)  # type: ignore[assignment]
    try:
        with pytest.raises(sqlite3.OperationalError, match="injected"):
            populated.add_weights(make_weights(9), "new", examples=["x"], key=np.ones(4))
    finally:
        populated._conn = real
    assert snapshot(populated) == before
    assert populated.add_weights(make_weights(9), "new").name == "new"  # the connection is still usable


def test_failed_import_keeps_shared_blob(populated, make_weights, monkeypatch):
    blob = populated.get("existing").blob
    monkeypatch.setattr(Library, "_insert_rows", _boom)
    with pytest.raises(RuntimeError):
        populated.add_weights(make_weights(0), "twin")  # same content as "existing"
    assert populated.blobs.exists(blob) and populated.load("existing").rank == 4


def test_failure_while_writing_temp_file(populated, make_weights, snapshot, monkeypatch):
    before = snapshot(populated)

    def bad_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(blobs.os, "fsync", bad_fsync)
    with pytest.raises(OSError, match="No space"):
        populated.add_weights(make_weights(3), "new")
    assert snapshot(populated) == before


def _nan_dir(d):
    from safetensors.torch import load_file, save_file

    s = load_file(str(d / "adapter_model.safetensors"))
    k = next(iter(s))
    s[k] = torch.full_like(s[k], float("nan"))
    save_file(s, str(d / "adapter_model.safetensors"))


def _bad_shape_dir(d):
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": 2}))


@pytest.mark.parametrize("damage, name, error", [
    (lambda d: (d / "training_args.bin").write_bytes(b"x"), "new", InvalidAdapter),
    (_nan_dir, "new", InvalidAdapter),
    (_bad_shape_dir, "new", InvalidAdapter),
    (lambda d: None, "existing", AdapterExists),
    (lambda d: None, "bad name", InvalidAdapter),
])
def test_rejected_imports_leave_library_unchanged(populated, adapter_dir, snapshot, damage, name, error):
    damage(adapter_dir)
    before = snapshot(populated)
    with pytest.raises(error):
        populated.add(adapter_dir, name)
    assert snapshot(populated) == before


def test_failed_remove_restores_blob_and_rows(populated, snapshot):
    before = snapshot(populated)
    real = populated._conn
    populated._conn = FailingCommit(real)  # type: ignore[assignment]
    try:
        with pytest.raises(sqlite3.OperationalError):
            populated.remove("existing")
    finally:
        populated._conn = real
    assert snapshot(populated) == before
    assert populated.load("existing").rank == 4


def test_gc_cleans_what_a_killed_import_leaves(populated, make_weights, snapshot):
    """A process killed after the temp write, or after placing the blob but before COMMIT."""
    before = snapshot(populated)
    from loramix.store.peft_io import blob_bytes

    tmp, _ = populated.blobs.write_temp(blob_bytes(make_weights(11)))
    old = time.time() - 2 * 3600
    os.utime(tmp, (old, old))
    placed_tmp, sha = populated.blobs.write_temp(blob_bytes(make_weights(12)))
    populated.blobs.place(placed_tmp, sha)
    assert populated.gc().removed == 2
    assert snapshot(populated) == before
