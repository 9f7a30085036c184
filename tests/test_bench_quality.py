"""The benchmark helpers (bench/quality_eval.py), experts trained to a plateau, and bench/mix_throughput.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from loramix.app import Loramix
from loramix.config import TrainConfig
from loramix.lora import LoraWeights
from loramix.testing import random_lora
from loramix.train.corpora import Doc
from loramix.train.expert import train_expert

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from quality_eval import Scorer, arrow_diagnostics, plot_arrow, query_target, split_val_test  # noqa: E402


def test_split_val_test_keeps_a_key_on_one_side() -> None:
    docs = [Doc(f"text {i}", f"key{i // 3}", "law") for i in range(12)]  # 4 keys of 3 docs
    val, test = split_val_test(docs, 4, seed=0, domain="law")
    assert len(val) + len(test) == 12 and len(val) >= 4
    assert not {d.key for d in val} & {d.key for d in test}
    assert split_val_test(docs, 4, seed=0, domain="law") == (val, test)  # deterministic


def test_query_target_cuts_the_query_like_the_benchmark_and_a_short_continuation() -> None:
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    assert query_target(text, 16, 3) == ("alpha beta gamma", " delta epsilon zeta")
    assert query_target("one two three four five", 200, 5) == ("one two", " three four five")  # short: half
    assert query_target("single", 200, 5) is None


def test_scorer_caches_rows_and_keys_them_by_adapter_fingerprint(tmp_path: Path, tiny_base_dir: Path) -> None:
    eng = Loramix(tmp_path / "home", base=tiny_base_dir)
    ids = {n: eng.add_weights(random_lora(eng.base, seed=i), n).id for i, n in enumerate(("a", "b"))}
    path = tmp_path / "scores.json"
    sc = Scorer(path, lambda: eng.mixer, ids, {"a": "fp-a", "b": "fp-b"})
    texts = ["the cat sat on the mat", "a ship sails at dawn"]
    mixes = [[("a", 1.0)], [("a", 0.5), ("b", 0.5)]]
    first = sc.score(texts, mixes)
    assert sc.scored == 2 and all(np.isfinite(first))
    assert sc.score(texts, mixes) == first and sc.scored == 2  # cached
    base = sc.score(texts, [[], []])
    assert sc.scored == 4 and base != first  # another mixture is another row
    again = Scorer(path, lambda: eng.mixer, ids, {"a": "fp-a", "b": "fp-b"})
    assert again.score(texts, mixes) == first and again.scored == 0  # read back from disk
    retrained = Scorer(path, lambda: eng.mixer, ids, {"a": "fp-a2", "b": "fp-b"})
    retrained.score(texts[:1], mixes[:1])
    assert retrained.scored == 1  # a new fingerprint is never served a stale loss


def test_arrow_diagnostics_see_dominant_and_shared_directions(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 16, generator=g)
    b1 = torch.zeros(8, 4)
    b1[:, 0] = torch.randn(8, generator=g)  # rank-1 update: all energy on one direction
    same = {"x": LoraWeights(4, 8.0, {"l": (a, b1)}), "y": LoraWeights(4, 8.0, {"l": (a, 2 * b1)})}
    d = arrow_diagnostics(same)
    assert d["top_share"] == pytest.approx(1.0) and d["cross_cos"] == pytest.approx(1.0)  # same prototype
    assert d["names"] == ["x", "y"] and np.allclose(d["pair_cos"], 1.0, atol=1e-4)
    rnd = {n: LoraWeights(4, 8.0, {"l": (torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g))})
           for n in "xyz"}
    d = arrow_diagnostics(rnd)
    assert 0.25 <= d["top_share"] < 1.0 and d["cross_cos"] < 0.9 and d["flat_share"] == 0.25
    m = np.asarray(d["pair_cos"])  # (3, 3): ones on the diagonal, the pairs' mean |cos| off it
    assert np.allclose(np.diag(m), 1.0, atol=1e-4)
    assert m[~np.eye(3, dtype=bool)].mean() == pytest.approx(d["cross_cos"], abs=1e-3)  # one layer: the same mean
    assert (m[~np.eye(3, dtype=bool)] < 0.9).all()
    assert plot_arrow(d, tmp_path / "arrow.png").stat().st_size > 1000


def test_expert_stops_on_a_plateau_and_keeps_the_best_weights(tiny_base_dir: Path) -> None:
    texts = [f"the {w} sat on the mat and looked at the {w} again" for w in ("cat", "dog", "owl", "fox")] * 8
    cfg = TrainConfig(steps=60, batch_size=2, seq_len=16, eval_every=2, patience=1, min_delta=100.0)
    w, rep = train_expert(str(tiny_base_dir), texts, cfg, progress=False)
    assert rep.stop_reason == "plateau" and rep.steps == 2 and rep.best_step == 0
    assert [s for s, _ in rep.eval_curve] == [0, 2]
    assert all(float(b.abs().max()) == 0.0 for _, b in w.layers.values())  # step 0: PEFT's B starts at zero
    assert rep.eval_loss_after == pytest.approx(rep.eval_loss_before)
    cfg = TrainConfig(steps=60, batch_size=2, seq_len=16, eval_every=2, patience=50, max_seconds=0.0)
    _, rep = train_expert(str(tiny_base_dir), texts, cfg, progress=False)
    assert rep.stop_reason == "time" and rep.steps == 1


def test_mix_throughput_runs_and_checks_logits_against_peft(tiny_base_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(BENCH / "mix_throughput.py"), "--base", str(tiny_base_dir), "--adapters", "4",
                          "--batch", "2", "--tokens", "8", "--decode-steps", "2", "--repeats", "1", "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    keys = {"base_tok_s", "one_adapter_tok_s", "mix3_tok_s", "peft_one_adapter_tok_s", "peft_mix3_tok_s",
            "peft_mix3_cached_tok_s", "decode_base_tok_s", "decode_mix3_tok_s"}
    assert keys <= set(res) and all(res[k] > 0 for k in keys)
    assert res["logits_match"] is True and max(res["logits_max_abs_diff"].values()) < 1e-3


def test_quality_skip_names_only_optional_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import quality

    args = quality.parse_args(["--out", str(tmp_path), "--skip", "clusters,merged"])
    assert set(args.skip.split(",")) <= set(quality.SKIPPABLE)
    with pytest.raises(SystemExit):
        quality.parse_args(["--out", str(tmp_path), "--skip", "experts"])
    assert "unknown stage(s) experts" in capsys.readouterr().err
