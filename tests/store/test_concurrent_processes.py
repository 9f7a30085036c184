"""Real concurrent processes on one library: a command fails only for its own work."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from loramix.lora import LoraWeights
from loramix.store import Library
from tests.store.test_crash_points import check_library

ADDER = textwrap.dedent('''
    import os, sys, time
    import numpy as np
    import torch
    import loramix.route.router as router_mod
    from loramix.app import Loramix
    from loramix.lora import LoraWeights
    from loramix.testing import HashEncoder

    home, ready, go = sys.argv[1:4]

    class PausingEncoder(HashEncoder):
        """Pauses on its first call (keys for the library's unkeyed adapters) until the parent says go."""
        calls = 0

        def encode(self, texts, batch_size=64):
            PausingEncoder.calls += 1
            if PausingEncoder.calls == 1:
                open(ready, "w").close()
                deadline = time.monotonic() + 120
                while not os.path.exists(go) and time.monotonic() < deadline:
                    time.sleep(0.05)
            return super().encode(texts, batch_size)

    router_mod.get_encoder = lambda *a, **k: PausingEncoder()
    g = torch.Generator().manual_seed(7)
    w = LoraWeights(rank=4, alpha=8.0, layers={"model.layers.0.self_attn.q_proj": (torch.randn(4, 64, generator=g),
                                                                                  torch.randn(64, 4, generator=g))})
    rec = Loramix(home).add_weights(w, "mine", examples=["my own example"])
    print("added", rec.name, rec.has_key)
''')

CHURN = textwrap.dedent('''
    import sys
    import torch
    from loramix.lora import LoraWeights
    from loramix.store import Library

    home, tag, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    lib = Library(home)
    g = torch.Generator().manual_seed(1)  # every process writes the same bytes: one shared blob
    w = LoraWeights(rank=4, alpha=8.0, layers={"model.layers.0.self_attn.q_proj": (torch.randn(4, 64, generator=g),
                                                                                  torch.randn(64, 4, generator=g))})
    for i in range(rounds):
        if tag == "gc":
            lib.gc()
            continue
        name = f"{tag}-{i}"
        lib.add_weights(w, name)
        assert lib.load(name).rank == 4  # the blob is there while the row is
        lib.remove(name)
    print("ok", tag)
''')


def _weights(seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    return LoraWeights(rank=4, alpha=8.0, layers={"model.layers.0.self_attn.q_proj": (torch.randn(4, 64, generator=g),
                                                                                     torch.randn(64, 4, generator=g))})


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LORAMIX_FAULT", None)
    return env


def test_add_survives_another_process_removing_an_adapter_it_is_keying(tmp_path: Path) -> None:
    """The issue's case: `add` keys the library's unkeyed adapters at start; one of them is removed meanwhile."""
    home = tmp_path / "home"
    lib = Library(home)
    lib.add_weights(_weights(1), "other", examples=["someone else's adapter"])  # no routing key yet
    lib.close()
    script, ready, go = tmp_path / "adder.py", tmp_path / "ready", tmp_path / "go"
    script.write_text(ADDER)
    adder = subprocess.Popen([sys.executable, str(script), str(home), str(ready), str(go)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert adder.poll() is None, adder.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the adder never reached its key computation"
            time.sleep(0.05)
        rm = subprocess.run([sys.executable, "-m", "loramix.cli", "adapters", "rm", "other", "--home", str(home)],
                            capture_output=True, text=True, env=_env(), timeout=120)
        assert rm.returncode == 0, rm.stderr
        go.touch()
        out, err = adder.communicate(timeout=240)
    finally:
        if adder.poll() is None:
            adder.kill()
    assert adder.returncode == 0, err[-2000:]
    assert "added mine True" in out
    lib = check_library(home)
    assert [r.name for r in lib.list()] == ["mine"] and lib.get("mine").has_key


def test_concurrent_add_remove_gc_on_a_shared_blob(tmp_path: Path) -> None:
    """Three processes add and remove adapters with identical bytes (one shared blob) while a fourth runs gc."""
    home = tmp_path / "home"
    lib = Library(home)
    lib.add_weights(_weights(5), "keeper")
    lib.close()
    script = tmp_path / "churn.py"
    script.write_text(CHURN)
    procs = [subprocess.Popen([sys.executable, str(script), str(home), tag, "8"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env()) for tag in ("p0", "p1", "p2", "gc")]
    results = [(p.communicate(timeout=300), p.returncode) for p in procs]
    for (out, err), rc in results:
        assert rc == 0 and out.startswith("ok"), err[-2000:]
    lib = check_library(home)
    assert [r.name for r in lib.list()] == ["keeper"]
