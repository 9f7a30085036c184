"""Adapter folders that must be refused with one clear line, leaving the library unchanged."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from loramix.errors import InvalidAdapter
from loramix.store import Library
from loramix.store.peft_io import MAX_CONFIG_BYTES, MAX_RANK, MAX_SCALE, read_peft_dir


def _cfg(d: Path) -> dict:
    return json.loads((d / "adapter_config.json").read_text())


def _set_cfg(d: Path, **kw: object) -> None:
    (d / "adapter_config.json").write_text(json.dumps({**_cfg(d), **kw}))


def _refused(lib: Library, folder: Path | str, snapshot, match: str, name: str = "new") -> str:
    before = snapshot(lib)
    with pytest.raises(InvalidAdapter, match=match) as info:
        lib.add(folder, name)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 600, msg
    assert snapshot(lib) == before
    return msg


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deeply_nested_config(lib, adapter_dir, snapshot, depth):
    (adapter_dir / "adapter_config.json").write_text("[" * depth + "]" * depth)
    _refused(lib, adapter_dir, snapshot, "nested too deeply|holds a JSON list")


@pytest.mark.parametrize("r", ["9" * 5000, "1" + "0" * 30, "0", "-4", "4.0", "true", '"4"', str(MAX_RANK + 1)])
def test_bad_rank(lib, adapter_dir, snapshot, r):
    text = (adapter_dir / "adapter_config.json").read_text()
    cfg = _cfg(adapter_dir)
    (adapter_dir / "adapter_config.json").write_text(text.replace(f'"r": {cfg["r"]}', f'"r": {r}'))
    assert f'"r": {r}' in (adapter_dir / "adapter_config.json").read_text()
    _refused(lib, adapter_dir, snapshot, r"r=|not valid JSON")


@pytest.mark.parametrize("alpha", ["1e400", "NaN", "Infinity", "-Infinity", "1e308", "9" * 400, "true", '"8"',
                                   str(MAX_SCALE * 4 * 2)])
def test_bad_alpha_or_absurd_scale(lib, adapter_dir, snapshot, alpha):
    text = (adapter_dir / "adapter_config.json").read_text()
    (adapter_dir / "adapter_config.json").write_text(text.replace('"lora_alpha": 8', f'"lora_alpha": {alpha}'))
    assert f'"lora_alpha": {alpha}' in (adapter_dir / "adapter_config.json").read_text()
    _refused(lib, adapter_dir, snapshot, "lora_alpha")


def test_scale_check_uses_rslora(lib, adapter_dir, snapshot):
    _set_cfg(adapter_dir, lora_alpha=MAX_SCALE * 3, use_rslora=True)  # / sqrt(4) = 1.5 x MAX_SCALE
    _refused(lib, adapter_dir, snapshot, "scale")
    _set_cfg(adapter_dir, use_rslora="yes")
    _refused(lib, adapter_dir, snapshot, "use_rslora")


@pytest.mark.parametrize("target", ["outside", "inside"])
def test_symlinks_are_refused(lib, adapter_dir, snapshot, tmp_path, target):
    """A symlink to a file outside the folder, or even to one inside it: loramix reads only plain files."""
    w = adapter_dir / "adapter_model.safetensors"
    if target == "outside":
        real = tmp_path / "elsewhere.safetensors"
        os.replace(w, real)
    else:
        real = adapter_dir / "weights.real"
        os.replace(w, real)
    w.symlink_to(real)
    _refused(lib, adapter_dir, snapshot, "symlink")


def test_symlinked_extra_file_is_refused(lib, adapter_dir, snapshot):
    (adapter_dir / "README.md").unlink(missing_ok=True)
    (adapter_dir / "README.md").symlink_to("/etc/passwd")
    _refused(lib, adapter_dir, snapshot, "symlink")


@pytest.mark.parametrize("folder", ["/", "/usr", "/proc"])
def test_system_folders_fail_fast(lib, snapshot, folder):
    """Only the folder's own entries are looked at: no walk of the tree below it."""
    t0 = time.perf_counter()
    _refused(lib, folder, snapshot, "has no adapter_config.json|pickle|symlink|cannot read")
    assert time.perf_counter() - t0 < 5.0


def test_pickle_in_a_subfolder_is_never_read(lib, adapter_dir, snapshot, make_weights):
    """Subfolders are not entered (nor read): the import reads the two top-level files only."""
    (adapter_dir / "checkpoint-1").mkdir()
    (adapter_dir / "checkpoint-1" / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    rec = lib.add(adapter_dir, "ok")
    assert rec.rank == 4


def test_size_limit_messages_name_the_limit_exceeded(base_shapes, adapter_dir, tmp_path, snapshot):
    lib = Library(tmp_path / "small", base_shapes=base_shapes, max_bytes=1000)
    msg = _refused(lib, adapter_dir, snapshot, "max_bytes")
    assert "1000 bytes" in msg
    big = Library(tmp_path / "big", base_shapes=base_shapes)
    cfg = _cfg(adapter_dir)
    cfg["padding"] = "x" * MAX_CONFIG_BYTES
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    msg = _refused(big, adapter_dir, snapshot, "MAX_CONFIG_BYTES")
    assert f"{MAX_CONFIG_BYTES} bytes" in msg and "max_bytes" not in msg


@pytest.mark.parametrize("name", ["-rf", "--help", "-", "a" * 10_000, "a b", "x/../y", "", "."])
def test_unsafe_names_refused_and_not_echoed_in_full(lib, adapter_dir, snapshot, name):
    msg = _refused(lib, adapter_dir, snapshot, "invalid adapter name", name=name)
    assert len(msg) < 400


# --- layers_to_transform: honoured, and the round trip is exact --------------------------------
def _restrict(d: Path, layers: list[int]) -> None:
    state = load_file(str(d / "adapter_model.safetensors"))
    keep = {k: v for k, v in state.items() if int(k.split("layers.")[1].split(".")[0]) in layers}
    save_file(keep, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})


def test_layers_to_transform_round_trips_exactly(lib, adapter_dir, tmp_path, tiny_base_dir, same_weights):
    from loramix.base import load_base

    _restrict(adapter_dir, [1])
    _set_cfg(adapter_dir, layers_to_transform=[1], layers_pattern="layers")
    rec = lib.add(adapter_dir, "upper")
    w = lib.load(rec.id)
    assert {p.split(".")[2] for p in w.layers} == {"1"}
    out = lib.export(rec.id, tmp_path / "exported")
    cfg = _cfg(out)
    assert cfg["layers_to_transform"] == [1] and cfg["layers_pattern"] == "layers"
    again = read_peft_dir(out, lib.base_shapes)
    assert same_weights(w, again) and again.extra_config["layers_to_transform"] == [1]
    # peft itself loads the export onto layer 1 only, with the same tensors
    pm = PeftModel.from_pretrained(load_base(tiny_base_dir).model, out)
    names = {n for n, _ in pm.named_parameters() if "lora_A" in n}
    assert names and all(".layers.1." in n for n in names)
    sd = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    for path, (a, b) in w.layers.items():
        assert torch.equal(sd[f"base_model.model.{path}.lora_A.default.weight"], a)
        assert torch.equal(sd[f"base_model.model.{path}.lora_B.default.weight"], b)


@pytest.mark.parametrize("ltt, pattern, match", [
    ([1], None, "outside layers_to_transform"),  # tensors for layers 0 and 1, config says 1 only
    (0, None, "outside layers_to_transform"),
    ("1", None, "layers_to_transform="),
    ([True], None, "layers_to_transform="),
    ([0, 1], 7, "layers_pattern="),
    ([0, 1], "blocks", "outside layers_to_transform"),  # no 'blocks.N.' in these module paths
])
def test_layers_to_transform_that_lies_is_refused(lib, adapter_dir, snapshot, ltt, pattern, match):
    _set_cfg(adapter_dir, layers_to_transform=ltt, layers_pattern=pattern)
    _refused(lib, adapter_dir, snapshot, match)
