"""Reading and validating PEFT LoRA folders; writing them atomically."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramix.errors import InvalidAdapter, LibraryError
from loramix.store import Library
from loramix.store.peft_io import read_peft_dir, write_peft_dir

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _edit_tensors(folder: Path, fn) -> None:
    path = folder / "adapter_model.safetensors"
    state = dict(load_file(str(path)))
    state = fn(state) or state
    save_file(state, str(path), metadata={"format": "pt"})


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_reads_peft_folder(adapter_dir, base_shapes):
    w = read_peft_dir(adapter_dir, base_shapes)
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert w.rank == 4 and w.alpha == 8.0 and w.target_modules == ["q_proj", "v_proj"]
    assert sorted(w.layers) == sorted(f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj"))
    a, b = w.layers["model.layers.0.self_attn.q_proj"]
    assert torch.equal(a, state[f"{Q0}.lora_A.weight"]) and torch.equal(b, state[f"{Q0}.lora_B.weight"])


def test_adapter_name_inside_keys_imports(adapter_dir, lib, peft_adapter_dir, same_weights):
    _edit_tensors(adapter_dir, lambda s: {k.replace(".weight", ".default.weight"): v for k, v in s.items()})
    assert all(".default.weight" in k for k in load_file(str(adapter_dir / "adapter_model.safetensors")))
    rec = lib.add(adapter_dir, "named")
    assert same_weights(lib.load(rec.id), read_peft_dir(peft_adapter_dir))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".pkl", ".ckpt"])
def test_rejects_pickle_files_even_beside_safetensors(adapter_dir, lib, suffix, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (adapter_dir / f"adapter_model{suffix}").write_bytes(pickle.dumps(Evil()))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    with pytest.raises(InvalidAdapter, match=rf"adapter_model\{suffix}.*pickle.*never unpickles"):
        lib.add(adapter_dir, "evil")
    assert not marker.exists() and len(lib) == 0


def test_rejects_pickle_alone(adapter_dir, lib):
    (adapter_dir / "adapter_model.safetensors").unlink()
    (adapter_dir / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(InvalidAdapter, match="adapter_model.bin, a pickle-format file"):
        lib.add(adapter_dir, "x")


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_rejects_missing_files(adapter_dir, lib, missing):
    (adapter_dir / missing).unlink()
    with pytest.raises(InvalidAdapter, match=rf"has no {missing}; expected a PEFT LoRA folder"):
        lib.add(adapter_dir, "x")


def test_rejects_non_folder(tmp_path, lib):
    with pytest.raises(InvalidAdapter, match="is not a folder"):
        lib.add(tmp_path / "nope", "x")


@pytest.mark.parametrize("text, match", [("{not json", "is not valid JSON"), ("[1, 2]", "holds a JSON list")])
def test_rejects_bad_config_json(adapter_dir, lib, text, match):
    (adapter_dir / "adapter_config.json").write_text(text)
    with pytest.raises(InvalidAdapter, match=match):
        lib.add(adapter_dir, "x")


@pytest.mark.parametrize("changes, match", [
    ({"peft_type": "LOHA"}, "peft_type 'LOHA'; expected 'LORA'"),
    ({"r": 0}, "r=0; expected a positive integer"),
    ({"use_dora": True}, "DoRA adapters are not supported"),
    ({"rank_pattern": {"q_proj": 8}}, "per-layer ranks"),
    ({"target_modules": ["q_proj", "c_attn"]}, "target module 'c_attn' matches no linear layer"),
])
def test_rejects_bad_config_values(adapter_dir, lib, changes, match):
    _edit_config(adapter_dir, **changes)
    with pytest.raises(InvalidAdapter, match=match):
        lib.add(adapter_dir, "x")


def test_rejects_rank_that_differs_from_config(adapter_dir, lib):
    _edit_config(adapter_dir, r=8)
    with pytest.raises(InvalidAdapter, match=r"lora_A has shape \(4, 64\), expected \(8, 64\)"):
        lib.add(adapter_dir, "x")


def test_rejects_a_shape_that_does_not_fit_base(adapter_dir, lib):
    _edit_tensors(adapter_dir, lambda s: {**s, f"{Q0}.lora_A.weight": torch.zeros(4, 65)})
    with pytest.raises(InvalidAdapter, match=r"q_proj: lora_A has shape \(4, 65\), expected \(4, 64\)"):
        lib.add(adapter_dir, "x")


def test_rejects_b_shape_that_does_not_fit_base(adapter_dir, lib):
    v0 = "base_model.model.model.layers.0.self_attn.v_proj"
    _edit_tensors(adapter_dir, lambda s: {**s, f"{v0}.lora_B.weight": torch.zeros(64, 4)})  # v_proj outputs 32
    with pytest.raises(InvalidAdapter, match=r"v_proj: lora_B has shape \(64, 4\), expected \(32, 4\)"):
        lib.add(adapter_dir, "x")


def test_rejects_module_path_missing_from_base(adapter_dir, lib):
    _edit_tensors(adapter_dir, lambda s: {k.replace("layers.1.", "layers.7."): v for k, v in s.items()})
    with pytest.raises(InvalidAdapter, match=r"layer model\.layers\.7\.self_attn\.\w+ does not exist in the base"):
        lib.add(adapter_dir, "x")


def test_shapes_checked_without_base_shapes(adapter_dir, tmp_path):
    _edit_config(adapter_dir, r=8)
    with Library(tmp_path / "plain") as plain, pytest.raises(InvalidAdapter, match=r"expected \(8, 64\)"):
        plain.add(adapter_dir, "x")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rejects_non_finite_values(adapter_dir, lib, bad):
    def poison(s):
        t = s[f"{Q0}.lora_B.weight"].clone()
        t[3, 1] = bad
        s[f"{Q0}.lora_B.weight"] = t

    _edit_tensors(adapter_dir, poison)
    with pytest.raises(InvalidAdapter, match="q_proj: lora_B holds NaN or infinite values"):
        lib.add(adapter_dir, "x")


@pytest.mark.parametrize("edit, match", [
    (lambda s: {**s, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)},
     "is not a LoRA tensor"),
    (lambda s: {k: v for k, v in s.items() if k != f"{Q0}.lora_B.weight"}, "needs both lora_A and lora_B"),
    (lambda s: {**s, f"{Q0}.lora_A.weight": torch.zeros(4, 64, dtype=torch.int32)}, "expected a floating-point"),
    (lambda s: {**s, f"{Q0}.lora_A.other.weight": torch.zeros(4, 64)}, "duplicates"),
])
def test_rejects_bad_tensors(adapter_dir, lib, edit, match):
    _edit_tensors(adapter_dir, edit)
    with pytest.raises(InvalidAdapter, match=match):
        lib.add(adapter_dir, "x")


def test_rejects_corrupt_safetensors(adapter_dir, lib):
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(InvalidAdapter, match="not a readable safetensors file"):
        lib.add(adapter_dir, "x")


def test_rejects_files_over_size_cap(adapter_dir, tmp_path, base_shapes):
    size = (adapter_dir / "adapter_model.safetensors").stat().st_size
    with Library(tmp_path / "small", base_shapes=base_shapes, max_bytes=size - 1) as small:
        with pytest.raises(InvalidAdapter, match=r"adapter_model\.safetensors is .* over the size limit"):
            small.add(adapter_dir, "x")
        assert len(small) == 0


def test_write_peft_dir_is_atomic(make_weights, tmp_path, monkeypatch, same_weights):
    out = tmp_path / "exports" / "a"
    import safetensors.torch as st  # peft_io imports it when writing

    real_save = st.save_file

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        write_peft_dir(make_weights(0), out)
    assert not out.exists() and list(out.parent.iterdir()) == []
    monkeypatch.setattr(st, "save_file", real_save)
    write_peft_dir(make_weights(0), out)
    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        write_peft_dir(make_weights(1), out, overwrite=True)
    assert [p.name for p in out.parent.iterdir()] == ["a"]  # the old export is intact, no temp folder left
    assert same_weights(read_peft_dir(out), make_weights(0))


def test_write_peft_dir_overwrite(make_weights, tmp_path, same_weights):
    out = tmp_path / "a"
    write_peft_dir(make_weights(0), out)
    with pytest.raises(LibraryError, match="not empty; pass overwrite=True"):
        write_peft_dir(make_weights(1), out)
    write_peft_dir(make_weights(1), out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert same_weights(read_peft_dir(out), make_weights(1))
