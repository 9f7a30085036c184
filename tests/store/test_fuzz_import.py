"""Fuzz the adapter importer with generated malformed folders (a seeded generator, bounded).

Each case is either refused with one clean line (an InvalidAdapter, the library unchanged) or
accepted, and then it round-trips exactly: export -> import gives the same tensors, rank, alpha
and rslora flag, and the same layer filter.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from loramix.errors import InvalidAdapter
from loramix.store import Library
from loramix.store.peft_io import read_peft_dir

N_CASES = 160
SEED = 20261124

JUNK: list[Any] = [None, True, False, 0, -1, 1, 2, 4, 8, 3.5, -0.0, 1e308, -1e308, 10**30, 10**400, "4", "", "LORA",
                   [], [1], ["q_proj"], {}, {"a": 1}, [[[[]]]], "x" * 5000, 1e-300, 2**63, -(2**63)]
FIELDS = ["r", "lora_alpha", "use_rslora", "target_modules", "peft_type", "layers_to_transform", "layers_pattern",
          "use_dora", "rank_pattern", "modules_to_save", "fan_in_fan_out", "bias"]


def _config_mutation(rng: random.Random, d: Path) -> str:
    p = d / "adapter_config.json"
    kind = rng.randrange(7)
    if kind == 0:
        cfg = json.loads(p.read_text())
        field = rng.choice(FIELDS)
        cfg[field] = rng.choice(JUNK)
        p.write_text(json.dumps(cfg))
        return f"config {field}={str(cfg[field])[:40]}"
    if kind == 1:
        cfg = json.loads(p.read_text())
        field = rng.choice(FIELDS)
        cfg.pop(field, None)
        p.write_text(json.dumps(cfg))
        return f"config without {field}"
    if kind == 2:
        data = p.read_bytes()
        p.write_bytes(data[: rng.randrange(max(len(data), 1))])
        return "config truncated"
    if kind == 3:
        data = bytearray(p.read_bytes())
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        p.write_bytes(bytes(data))
        return "config bytes flipped"
    if kind == 4:
        depth = rng.choice([10, 1000, 50_000])
        p.write_text('{"peft_type": "LORA", "r": 4, "x": ' + "[" * depth + "]" * depth + "}")
        return f"config nested {depth}"
    if kind == 5:
        raw = p.read_text()
        for token in ('"r": 4', '"lora_alpha": 8'):
            raw = raw.replace(token, token.split(":")[0] + ": " + rng.choice(["NaN", "Infinity", "-Infinity", "1e999",
                                                                               "9" * 4400, "[4]", "null"]))
        p.write_text(raw)
        return "config non-standard numbers"
    cfg = json.loads(p.read_text())
    cfg["layers_to_transform"] = rng.choice([[0], [1], [0, 1], 1, 0, [2], [-1]])
    cfg["layers_pattern"] = rng.choice([None, "layers", "h", "blocks", ["layers"]])
    p.write_text(json.dumps(cfg))
    return f"config layers_to_transform={cfg['layers_to_transform']} pattern={cfg['layers_pattern']}"


def _weights_mutation(rng: random.Random, d: Path) -> str:
    from safetensors.torch import load_file, save_file

    p = d / "adapter_model.safetensors"
    kind = rng.randrange(7)
    if kind == 0:
        data = p.read_bytes()
        p.write_bytes(data[: rng.randrange(max(len(data), 1))])
        return "weights truncated"
    if kind == 1:
        data = bytearray(p.read_bytes())
        n = min(struct.unpack("<Q", data[:8])[0], len(data) - 8) if len(data) > 8 else 0
        for _ in range(rng.randint(1, 6) if n > 0 else 0):
            data[8 + rng.randrange(n)] = rng.choice(b'{}[]",:0123456789 azAZ')
        p.write_bytes(bytes(data))
        return "weights header bytes flipped"
    if kind == 2:
        data = bytearray(p.read_bytes())
        data[:8] = struct.pack("<Q", rng.choice([0, 1, 2**40, 2**63, len(data)]))
        p.write_bytes(bytes(data))
        return "weights header length lies"
    try:
        state = load_file(str(p))
    except Exception:  # an earlier step already broke the file
        return "weights already broken"
    if not state:
        return "weights already empty"
    key = rng.choice(sorted(state))
    if kind == 3:
        state.pop(key)
        what = f"drop {key}"
    elif kind == 4:
        t = state[key]
        state[key] = rng.choice([t.T.contiguous(), t[:, :-1].contiguous(), t.to(rng.choice([__import__("torch").int32,
                                 __import__("torch").float16])), t.reshape(-1), t * float("nan")])
        what = f"change {key}"
    elif kind == 5:
        state[key.replace("lora_A", "lora_X").replace("lora_B", "lora_Y")] = state.pop(key)
        what = f"rename {key}"
    else:
        state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.extra.weight"] = state[key].clone()
        what = "duplicate tensor under an adapter name"
    save_file(state, str(p), metadata={"format": "pt"})
    return what


def _folder_mutation(rng: random.Random, d: Path, outside: Path) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        (d / rng.choice(["training_args.bin", "model.PT", "x.pkl", "opt.ckpt"])).write_bytes(b"\x80\x04junk")
        return "pickle beside"
    if kind == 1:
        victim = d / rng.choice(["adapter_config.json", "adapter_model.safetensors"])
        shutil.copy(victim, outside / victim.name)
        victim.unlink()
        victim.symlink_to(outside / victim.name)
        return f"symlink {victim.name}"
    if kind == 2:
        (d / rng.choice(["adapter_config.json", "adapter_model.safetensors"])).unlink()
        return "missing file"
    if kind == 3:
        victim = d / rng.choice(["adapter_config.json", "adapter_model.safetensors"])
        victim.unlink()
        victim.mkdir()
        return f"{victim.name} is a folder"
    (d / "adapter_model.safetensors").write_bytes(b"")
    return "empty weights"


def _case(rng: random.Random, src: Path, d: Path, outside: Path) -> str:
    shutil.copytree(src, d)
    steps = []
    for _ in range(rng.choice([1, 1, 2])):
        pick = rng.random()
        try:
            if pick < 0.45:
                steps.append(_config_mutation(rng, d))
            elif pick < 0.85:
                steps.append(_weights_mutation(rng, d))
            else:
                steps.append(_folder_mutation(rng, d, outside))
        except (OSError, ValueError, RuntimeError):  # an earlier step left nothing this one can change
            steps.append("step skipped")
    return "; ".join(steps)


def _same(a: Any, b: Any) -> bool:
    import torch

    return (a.rank == b.rank and a.alpha == b.alpha and a.use_rslora == b.use_rslora and set(a.layers) == set(b.layers)
            and all(torch.equal(a.layers[p][0], b.layers[p][0]) and torch.equal(a.layers[p][1], b.layers[p][1])
                    and a.layers[p][0].dtype == b.layers[p][0].dtype for p in a.layers)
            and a.extra_config.get("layers_to_transform") == b.extra_config.get("layers_to_transform"))


def test_fuzz_importer(peft_adapter_dir: Path, base_shapes, tmp_path: Path, snapshot) -> None:
    rng = random.Random(SEED)
    lib = Library(tmp_path / "home", base_shapes=base_shapes)
    outside = tmp_path / "outside"
    outside.mkdir()
    refused = accepted = 0
    for i in range(N_CASES):
        d = tmp_path / f"case{i}"
        what = _case(rng, peft_adapter_dir, d, outside)
        before = snapshot(lib)
        try:
            rec = lib.add(d, f"case{i}")
        except InvalidAdapter as e:
            msg = str(e)
            assert "\n" not in msg and 0 < len(msg) < 700, (what, msg)
            assert snapshot(lib) == before, what
            refused += 1
            continue
        except Exception as e:  # anything else is a bug in the importer
            pytest.fail(f"case {i} ({what}) raised {type(e).__name__}: {str(e)[:300]}")
        w = lib.load(rec.id, verify=True)
        out = lib.export(rec.id, tmp_path / f"export{i}")
        assert _same(w, read_peft_dir(out, base_shapes)), what
        again = lib.add(out, f"again{i}")
        assert again.blob == rec.blob, what  # byte-identical canonical blob
        lib.remove(rec.id)
        lib.remove(again.id)
        accepted += 1
        shutil.rmtree(d)
        if os.path.isdir(out):
            shutil.rmtree(out)
    assert refused > N_CASES // 2 and accepted > 5, (refused, accepted)
