"""Re-routing at generation: triggers, the actions, events in the library, the benchmark helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loramix.app import Loramix
from loramix.base import BaseModel
from loramix.config import GenerateConfig, RefineConfig, RouteConfig
from loramix.errors import ConfigError
from loramix.refine import (
    apply_thresholds,
    calibrate,
    count_choices,
    decide,
    refine_eval,
    summarize,
    without,
)
from loramix.testing import HashEncoder, random_lora

PROMPT = "botany is the study of plants"
GEN = GenerateConfig(max_new_tokens=3)


@pytest.fixture
def engine(tmp_path: Path, tiny_base_dir: Path, tiny_base: BaseModel, monkeypatch: pytest.MonkeyPatch) -> Loramix:
    import loramix.route.router as router_mod

    monkeypatch.setattr(router_mod, "get_encoder", lambda *a, **k: HashEncoder())
    eng = Loramix(home=tmp_path / "home", base=tiny_base_dir)
    for i, std in enumerate((0.02, 0.08, 0.2, 0.4)):
        eng.add_weights(random_lora(tiny_base, seed=i, std=std), f"a{i}", description=f"adapter number {i}")
    return eng


def _decide(eng: Loramix, k: int, cfg: RefineConfig, force: bool = True):
    rcfg = RouteConfig(k=k, temperature=1.0)
    mixture = eng.route(PROMPT, rcfg).mixture
    return decide(eng, PROMPT, eng.chat_ids(PROMPT), mixture, rcfg, cfg, force=force)


def test_triggers_above_threshold_only(engine: Loramix) -> None:
    d = _decide(engine, 2, RefineConfig(max_prompt_loss=None, max_entropy=None), force=False)
    assert not d.triggered and d.after == d.before and d.chosen is None
    loss, ent = d.prompt_loss, d.entropy
    assert 0 < loss < 20 and 0 < ent < 10
    cases = [((loss - 0.01, None), True), ((loss + 0.01, None), False), ((None, ent - 0.01), True),
             ((None, ent + 0.01), False), ((loss + 0.01, ent + 0.01), False), ((loss + 0.01, ent - 0.01), True)]
    for (max_loss, max_ent), want in cases:
        cfg = RefineConfig(max_prompt_loss=max_loss, max_entropy=max_ent, action="base")
        d = _decide(engine, 2, cfg, force=False)
        assert d.triggered is want, (max_loss, max_ent)
        assert (d.after == []) is want


def test_widen_routes_more_adapters(engine: Loramix) -> None:
    d = _decide(engine, 1, RefineConfig(action="widen", widen_k=2))
    assert d.chosen == "widen" and len(d.before) == 1 and len(d.after) == 3
    assert d.before[0][0] in [a for a, _ in d.after]


def test_drop_removes_the_least_contributing(engine: Loramix) -> None:
    d = _decide(engine, 3, RefineConfig(action="drop"))
    assert d.chosen == "drop" and len(d.before) == 3 and len(d.after) == 2
    assert sum(w for _, w in d.after) == pytest.approx(1.0)
    loo = [engine.score(PROMPT, adapters=without(d.before, i))["loss"] for i in range(3)]
    dropped = next(i for i, (a, _) in enumerate(d.before) if a not in [x for x, _ in d.after])
    assert loo[dropped] == pytest.approx(min(loo), abs=1e-5)
    assert d.candidate_losses["drop"] == pytest.approx(min(loo), abs=1e-5)


def test_base_and_auto(engine: Loramix) -> None:
    d = _decide(engine, 2, RefineConfig(action="base"))
    assert d.chosen == "base" and d.after == []
    d = _decide(engine, 2, RefineConfig(action="auto"))
    assert set(d.candidate_losses) == {"widen", "drop", "base", "keep"}
    assert d.candidate_losses[d.chosen] == pytest.approx(min(d.candidate_losses.values()))
    assert engine.score(PROMPT, adapters=d.after or None)["loss"] == pytest.approx(
        min(d.candidate_losses.values()), abs=1e-4)


def test_ask_records_reroute_events(engine: Loramix) -> None:
    lib = engine.library
    rcfg = RouteConfig(k=2)
    before = [a for a, _ in engine.route(PROMPT, rcfg).mixture]
    quiet = engine.ask(PROMPT, route=rcfg, gen=GEN, refine=RefineConfig(enabled=True, max_prompt_loss=1e9,
                                                                       max_entropy=1e9))
    info = quiet.info["refine"]
    assert info["triggered"] is False and info["action"] is None
    assert [a["id"] for a in info["after"]] == before == [a["id"] for a in quiet.adapters]
    assert all(lib.get(a).use_count == 1 and not lib.events(a) for a in before)

    ans = engine.ask(PROMPT, route=rcfg, gen=GEN, refine=RefineConfig(enabled=True, max_prompt_loss=0.0,
                                                                     action="base"))
    info = ans.to_dict()["refine"]
    assert info["triggered"] is True and info["chosen"] == "base" and info["after"] == [] and ans.adapters == []
    assert [a["id"] for a in info["before"]] == before
    for a in before:
        assert lib.get(a).use_count == 2
        (ev,) = lib.events(a)
        assert ev["event"] == "reroute" and ev["detail"]["chosen"] == "base" and ev["detail"]["after"] == []

    off = engine.ask(PROMPT, route=rcfg, gen=GEN, refine=RefineConfig(enabled=False, max_prompt_loss=0.0))
    assert "refine" not in off.info


def test_refine_eval(engine: Loramix) -> None:
    prompts = [PROMPT, "the ship sailed to the harbour"]
    targets = [" and zoology is the study of animals.", " in the morning."]
    rcfg = RouteConfig(k=2)
    res = refine_eval(engine, prompts, targets, rcfg, RefineConfig(action="base"), force=True)
    assert res["n"] == 2 and res["changed"] == 2
    assert res["chosen"] == {"widen": 0, "drop": 0, "base": 2, "keep": 0, "none": 0}
    base = [engine.score(p + t)["loss"] for p, t in zip(prompts, targets, strict=True)]
    assert all(np.isfinite(r["loss_with"]) and np.isfinite(r["loss_without"]) for r in res["rows"])
    assert res["loss_with"] != pytest.approx(res["loss_without"])
    assert res["loss_with"] < max(base) + 10  # scored the targets only: a sane number
    none = refine_eval(engine, prompts, targets, rcfg, RefineConfig(max_prompt_loss=1e9, max_entropy=1e9))
    assert none["triggered"] == 0 and none["delta"] == pytest.approx(0.0)
    assert none["chosen"]["none"] == 2 and sum(none["chosen"].values()) == none["n"]  # untriggered rows counted
    assert not engine.library.events(engine.library.ids()[0])


def test_summary_counts_every_choice() -> None:
    rows = [{"triggered": False, "chosen": None, "loss_without": 2.0, "loss_with": 2.0},
            {"triggered": True, "chosen": "keep", "loss_without": 3.0, "loss_with": 3.0},
            {"triggered": True, "chosen": "drop", "loss_without": 3.0, "loss_with": 2.5},
            {"triggered": True, "chosen": "drop", "loss_without": 1.0, "loss_with": 1.5}]
    s = summarize(rows)
    assert s["chosen"] == {"widen": 0, "drop": 2, "base": 0, "keep": 1, "none": 1}
    assert sum(s["chosen"].values()) == s["n"] == 4
    assert (s["triggered"], s["changed"], s["improved"], s["worsened"]) == (3, 2, 1, 1)
    assert count_choices([None, None, "widen"]) == {"widen": 1, "drop": 0, "base": 0, "keep": 0, "none": 2}


def test_calibrate_picks_thresholds_that_lower_the_mean_loss() -> None:
    # refining helps where the prompt loss is high (> 5) and hurts where it is low
    forced = [{"prompt_loss": pl, "entropy": 1.0, "triggered": True, "chosen": "drop",
               "loss_without": 3.0, "loss_with": 3.0 + (-0.5 if pl > 5 else 0.4)} for pl in (2.0, 4.0, 6.0, 8.0)]
    cal = calibrate(forced)
    assert cal["max_entropy"] is None and 4.0 <= cal["max_prompt_loss"] < 6.0
    assert cal["triggered"] == 2 and cal["loss_with"] == pytest.approx(3.0 - 0.25)
    assert cal["chosen"]["none"] == 2
    never = apply_thresholds(forced, None, None)
    assert all(r["loss_with"] == r["loss_without"] and r["chosen"] is None for r in never)


def test_refine_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="refine action"):
        RefineConfig(action="shrug")
    with pytest.raises(ConfigError):
        RefineConfig(widen_k=0)
