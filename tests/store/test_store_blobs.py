"""Content-addressed blobs: layout, dedup, self-describing files, gc."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

from safetensors import safe_open

from loramix.store import BlobStore, read_blob
from loramix.store.peft_io import blob_bytes


def test_put_is_content_addressed_and_deduplicated(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    sha, new = store.put(b"hello")
    assert sha == hashlib.sha256(b"hello").hexdigest() and new
    assert store.path(sha) == tmp_path / "blobs" / sha[:2] / f"{sha}.safetensors"
    assert store.path(sha).read_bytes() == b"hello"
    assert store.put(b"hello") == (sha, False)
    assert list(store.tmp.iterdir()) == []
    assert list(store.iter_shas()) == [sha]


def test_blob_alone_is_self_describing(lib, make_weights, same_weights):
    w = make_weights(3)
    rec = lib.add_weights(w, "a")
    path = lib.blobs.path(rec.blob)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == rec.blob
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        cfg = json.loads(meta["adapter_config"])
        keys = sorted(f.keys())
    assert list(meta) == ["adapter_config"]  # one metadata key: safetensors orders several at random
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert same_weights(read_blob(path), w)


def test_peft_import_is_stored_in_canonical_naming(adapter_dir, lib):
    from safetensors.torch import load_file, save_file

    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    save_file({k.replace(".weight", ".default.weight"): v for k, v in state.items()},
              str(adapter_dir / "adapter_model.safetensors"))
    rec = lib.add(adapter_dir, "a")
    with safe_open(str(lib.blobs.path(rec.blob)), framework="pt") as f:
        assert sorted(f.keys()) == sorted(state)


def test_identical_content_shares_one_blob(lib, make_weights):
    a = lib.add_weights(make_weights(0), "a")
    b = lib.add_weights(make_weights(0), "b")
    c = lib.add_weights(lib.load("a"), "c")  # a loaded adapter re-serialises to the same bytes
    d = lib.add_weights(make_weights(1), "d")
    assert a.blob == b.blob == c.blob != d.blob
    assert sorted(lib.blobs.iter_shas()) == sorted({a.blob, d.blob})
    lib.remove("a")
    lib.remove("b")
    assert lib.blobs.exists(a.blob)  # "c" still uses it
    lib.remove("c")
    assert not lib.blobs.exists(a.blob) and lib.blobs.exists(d.blob)


def test_blob_bytes_are_deterministic_across_processes(make_weights):
    code = ("import hashlib, torch; from loramix.lora import LoraWeights; from loramix.store.peft_io import blob_bytes;"
            "g = torch.Generator().manual_seed(0);"
            "w = LoraWeights(4, 8.0, {f'model.layers.{i}.self_attn.{m}_proj': (torch.randn(4, 8, generator=g),"
            " torch.randn(8, 4, generator=g)) for i in range(3) for m in 'qkv'}, extra_config={'x': 1, 'y': [2]});"
            "print(hashlib.sha256(blob_bytes(w)).hexdigest())")
    shas = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip() for seed in (1, 2)}
    assert len(shas) == 1
    w = make_weights(0)
    assert blob_bytes(w) == blob_bytes(w)


def test_gc_removes_orphans_and_stale_temps(lib, make_weights):
    kept = lib.add_weights(make_weights(0), "a")
    orphan, _ = lib.blobs.put(b"orphan bytes")
    stale = lib.blobs.tmp / "dead.part"
    stale.write_bytes(b"half a blob")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh = lib.blobs.tmp / "busy.part"  # another writer's file in progress
    fresh.write_bytes(b"x")
    assert lib.gc().removed == 2
    assert lib.blobs.exists(kept.blob) and not lib.blobs.exists(orphan)
    assert not stale.exists() and fresh.exists()
    assert lib.gc(stale_after=0).removed == 1 and not fresh.exists()
    assert lib.gc().removed == 0
    assert lib.load("a").rank == 4
