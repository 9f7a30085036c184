"""Export round trip: peft save -> Library.add -> Library.export -> PeftModel.from_pretrained."""

from __future__ import annotations

import json

import torch

from loramix.base import load_base
from loramix.lora import LoraWeights


def _inputs(base) -> dict[str, torch.Tensor]:
    enc = base.tokenizer(["the quick brown fox jumps", "int main(void) { return 0; }"], return_tensors="pt",
                         padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def _peft_logits(base_dir, adapter_dir) -> torch.Tensor:
    from peft import PeftModel

    base = load_base(base_dir)
    model = PeftModel.from_pretrained(base.model, str(adapter_dir))
    model.eval()
    return model(**_inputs(base)).logits


@torch.no_grad()
def _by_hand_logits(base_dir, w: LoraWeights) -> torch.Tensor:
    base = load_base(base_dir)
    mods = dict(base.model.named_modules())
    for path in w.layers:
        mods[path].weight += w.delta(path)  # W + scale * B @ A
    return base.model(**_inputs(base)).logits


def test_peft_round_trip_gives_identical_logits(lib, tiny_base_dir, peft_adapter_dir, tmp_path):
    original = _peft_logits(tiny_base_dir, peft_adapter_dir)
    base_only = load_base(tiny_base_dir)
    with torch.no_grad():
        plain = base_only.model(**_inputs(base_only)).logits
    assert not torch.allclose(original, plain, atol=1e-4)  # the adapter really changes the output

    rec = lib.add(peft_adapter_dir, "rt")
    out = lib.export(rec.id, tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    exported = _peft_logits(tiny_base_dir, out)
    assert torch.equal(exported, original)
    torch.testing.assert_close(_by_hand_logits(tiny_base_dir, lib.load("rt")), original, atol=1e-5, rtol=1e-5)


def test_export_of_partial_adapter_adapts_only_its_layers(lib, tiny_base_dir, make_weights, tmp_path):
    """An adapter on layer 1's q_proj and o_proj only: PEFT must not add (random) LoRA to the other layers."""
    w = make_weights(4, targets=("q_proj", "o_proj"), layers=[1])
    w.extra_config = {"init_lora_weights": False}  # unmatched targets would get random LoRA weights
    lib.add_weights(w, "partial")
    out = lib.export("partial", tmp_path / "partial")
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == [
        "model.layers.1.self_attn.o_proj", "model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(_peft_logits(tiny_base_dir, out), _by_hand_logits(tiny_base_dir, w),
                               atol=1e-5, rtol=1e-5)
