"""Experts from unlabelled text: clustering with the real MiniLM encoder, one adapter per segment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loramix.app import Loramix
from loramix.config import TrainConfig
from loramix.errors import ConfigError
from loramix.route import Encoder, get_encoder
from loramix.train.experts import cluster_texts, load_texts, segment_ari, top_terms, train_experts

KITCHEN = [f"Stir the {x} into the simmering soup, season with salt and pepper, and bake the bread for {m} minutes."
           for x, m in [("onions", 20), ("garlic", 25), ("carrots", 30), ("butter", 35), ("cream", 40),
                        ("tomatoes", 45), ("basil", 50), ("mushrooms", 55), ("potatoes", 60), ("leeks", 65)]]
CODE = [f"The compiler reports a segmentation fault when the {x} pointer is dereferenced in the C program at line {n}."
        for x, n in [("null", 12), ("dangling", 40), ("freed", 77), ("stack", 93), ("heap", 120),
                     ("array", 150), ("string", 188), ("struct", 201), ("buffer", 244), ("file", 290)]]
TINY = TrainConfig(steps=2, seq_len=16, batch_size=2, rank=2, alpha=4.0)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return get_encoder()


def test_cluster_texts_separates_families(encoder: Encoder) -> None:
    texts = [t for pair in zip(KITCHEN, CODE, strict=True) for t in pair]
    truth = ["kitchen", "code"] * len(KITCHEN)
    labels, centroids = cluster_texts(texts, 2, encoder, seed=0)
    assert labels.shape == (20,) and centroids.shape == (2, encoder.dim)
    assert segment_ari(labels, truth) > 0.9
    assert segment_ari(labels, truth) == pytest.approx(segment_ari(cluster_texts(texts, 2, encoder, seed=0)[0], truth))
    terms = top_terms(texts, labels, 2)
    kitchen_seg = int(labels[0])
    assert {"soup", "bread"} & set(terms[kitchen_seg]) and {"compiler", "pointer"} & set(terms[1 - kitchen_seg])


def test_segment_ari_and_errors(encoder: Encoder) -> None:
    assert segment_ari([0, 0, 1, 1], ["a", "a", "b", "b"]) == pytest.approx(1.0)
    assert segment_ari([1, 1, 0, 0], ["a", "a", "b", "b"]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        segment_ari([0, 1], ["a"])
    with pytest.raises(Exception, match="segments"):
        cluster_texts(["one", "two"], 3, encoder)


def test_load_texts_labels(tmp_path: Path) -> None:
    rows = [{"text": t, "label": "kitchen"} for t in KITCHEN[:3]] + [{"text": t, "domain": "code"} for t in CODE[:3]]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    texts, labels = load_texts(str(tmp_path / "d.jsonl"))
    assert texts == KITCHEN[:3] + CODE[:3] and labels == ["kitchen"] * 3 + ["code"] * 3
    assert load_texts(str(tmp_path / "d.jsonl"), limit=4)[1] is not None
    (tmp_path / "a.txt").write_text("\n".join(KITCHEN))
    (tmp_path / "b.txt").write_text("\n".join(CODE))
    spec = f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}"
    texts, labels = load_texts(spec, limit=10)
    assert len(texts) == 10 and labels == [str(tmp_path / "a.txt")] * 5 + [str(tmp_path / "b.txt")] * 5
    texts, labels = load_texts(str(tmp_path / "a.txt"))
    assert texts == KITCHEN and labels is None


def test_train_experts_registers_keyed_adapters(tmp_path: Path, tiny_base_dir: Path, encoder: Encoder) -> None:
    eng = Loramix(home=tmp_path / "home", base=tiny_base_dir)
    texts = KITCHEN + CODE
    truth = ["kitchen"] * 10 + ["code"] * 10
    res = train_experts(eng, texts, 2, TINY, seed=0, true_labels=truth, source="synthetic", progress=False)
    assert res["ari"] > 0.9 and sorted(res["sizes"]) == [10, 10] and not res["skipped"]
    lib = eng.library
    assert sorted(r.name for r in lib.list()) == ["cluster-0", "cluster-1"]
    ids, keys = lib.keys()
    assert len(ids) == 2 and np.allclose(np.linalg.norm(keys, axis=1), 1.0, atol=1e-4)
    for seg in res["segments"]:
        rec = lib.get(seg["name"])
        assert rec.has_key and rec.id == seg["id"] and seg["terms"][0] in rec.description
        examples = set(lib.examples(rec.id))
        assert len(examples) == seg["size"] and (examples <= set(KITCHEN) or examples <= set(CODE))
        assert len(seg["labels"]) == 1
    kitchen = lib.get(next(s["name"] for s in res["segments"] if "kitchen" in s["labels"]))
    assert eng.route("How long do I bake bread with garlic butter?").adapters[0].id == kitchen.id
    with pytest.raises(ConfigError, match="already exist"):
        train_experts(eng, texts, 2, TINY, progress=False)


def test_cli_train_experts(tmp_path: Path, tiny_base_dir: Path, encoder: Encoder) -> None:
    from typer.testing import CliRunner

    from loramix.cli import app

    (tmp_path / "kitchen.txt").write_text("\n".join(KITCHEN))
    (tmp_path / "code.txt").write_text("\n".join(CODE))
    data = f"{tmp_path / 'kitchen.txt'},{tmp_path / 'code.txt'}"
    result = CliRunner().invoke(app, ["train", "experts", "--data", data, "--n", "2", "--prefix", "seg", "--steps", "2",
                                      "--seq-len", "16", "--batch-size", "2", "--rank", "2", "--home",
                                      str(tmp_path / "home"), "--base", str(tiny_base_dir), "--json"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout.strip().splitlines()[-1])
    assert res["ari"] > 0.9 and [s["name"] for s in res["segments"]] == ["seg-0", "seg-1"]


def test_a_time_cap_before_the_first_evaluation_keeps_the_trained_weights(tiny_base_dir: Path) -> None:
    """Stopped on time between evaluations, the last weights are evaluated and compete with the best so far
    (before, a cap hit ahead of the first evaluation handed back the untrained, all-zero adapter)."""
    from loramix.train.expert import train_expert

    texts = [f"the {w} sat on the mat and looked at the {w} again" for w in ("cat", "dog", "owl", "fox")] * 8
    cfg = TrainConfig(steps=60, batch_size=2, seq_len=16, eval_every=10, patience=5, max_seconds=0.0, min_delta=-1.0)
    w, rep = train_expert(str(tiny_base_dir), texts, cfg, progress=False)
    assert rep.stop_reason == "time" and rep.steps == 1 and [s for s, _ in rep.eval_curve] == [0, 1]
    assert rep.best_step == 1 and any(float(b.abs().max()) > 0 for _, b in w.layers.values())
    cfg = TrainConfig(steps=60, batch_size=2, seq_len=16, eval_every=10, patience=5, max_seconds=0.0, min_delta=100.0)
    w, rep = train_expert(str(tiny_base_dir), texts, cfg, progress=False)
    assert rep.best_step == 0 and all(float(b.abs().max()) == 0.0 for _, b in w.layers.values())  # no gain: step 0
