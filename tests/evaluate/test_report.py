"""The quality report: targets, schema, JSON writer, markdown and plots (no models)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from loramix.evaluate.report import (
    ROUTERS,
    SETTINGS,
    best_router,
    evaluate_targets,
    jsonable,
    loss_table,
    pick_label_free,
    plot_confusion,
    plot_loss_bars,
    refine_verdict,
    render_markdown,
    skipped,
    validate_report,
    write_report_json,
)

DOMAINS = ["law", "music"]


def _loss(**means: float) -> dict:
    base = {"base": 4.0, "oracle": 3.0, "routed_top1": 3.05, "routed_mix": 3.04, "uniform": 3.5,
            "merged_linear": 3.5, "merged_ties": 3.6}
    base.update(means)
    return {s: {"mean": v, "law": v - 0.1, "music": v + 0.1} for s, v in base.items()}


def _routing(**top1: float | None) -> dict:
    vals = {"tfidf": 0.8, "untrained": 0.85, "label_free": 0.92, "likelihood": 0.88, "supervised": 0.93, "arrow": 0.6}
    vals.update(top1)
    return {r: ({"top1": v, "top3": min(1.0, v + 0.05)} if v is not None else skipped("not landed", ("top1", "top3")))
            for r, v in vals.items()}


def _report(**kw) -> dict:
    loss, routing = kw.pop("loss", _loss()), kw.pop("routing", _routing())
    return {"loss": loss, "routing": routing, "targets": evaluate_targets(loss, routing),
            "timing": {"experts": {"wall_s": 1.5, "cpu_s": 2.0, "status": "ok"}},
            "config": {"domains": DOMAINS, "mode": "quick"}, **kw}


# --- loss table / best router ---------------------------------------------------------------------
def test_loss_table_macro_mean_over_domains():
    t = loss_table({"law": [1.0, 3.0], "music": [4.0]}, DOMAINS)
    assert t == {"mean": 3.0, "law": 2.0, "music": 4.0}  # mean of domain means, not of texts
    assert list(t)[0] == "mean"
    t = loss_table({"law": [1.0, float("nan")]}, DOMAINS)
    assert t["law"] == 1.0 and t["music"] is None and t["mean"] is None  # a missing domain: no mean


def test_best_router_ignores_tfidf_and_skipped_and_breaks_ties_on_top3():
    r = _routing(tfidf=0.99)
    assert best_router(r) == "supervised"
    r["label_free"] = {"top1": 0.93, "top3": 1.0}
    assert best_router(r) == "label_free"  # same top-1, better top-3
    assert best_router(_routing(untrained=None, label_free=None, likelihood=None, supervised=None, arrow=None)) is None


# --- targets --------------------------------------------------------------------------------------
def test_targets_pass_with_good_numbers():
    t = evaluate_targets(_loss(), _routing(supervised=0.96))
    assert t["mix_vs_oracle"]["pass"] is True  # 3.04 / 3.0 - 1 = 1.33% <= 2%
    assert math.isclose(t["mix_vs_oracle"]["value"], 3.04 / 3.0 - 1)
    t = evaluate_targets(_loss(routed_mix=3.05), _routing(supervised=0.96))
    assert t["mix_vs_oracle"]["pass"] is True  # 1.7% <= 2%
    assert math.isclose(t["mix_vs_base"]["value"], 1 - 3.05 / 4.0)
    assert t["mix_vs_base"]["pass"] is True
    assert t["best_router_top1"] == {**t["best_router_top1"], "value": 0.96, "pass": True, "router": "supervised"}
    assert t["label_free"]["pass"] is True  # 0.92 >= 0.85 + 0.05


def test_targets_fail_and_boundaries():
    t = evaluate_targets(_loss(routed_mix=3.07, base=3.3), _routing())
    assert t["mix_vs_oracle"]["pass"] is False  # 2.33% > 2%
    assert t["mix_vs_base"]["pass"] is False  # 7% < 10%
    assert t["best_router_top1"]["pass"] is False  # 0.93 < 0.95
    # exactly at the thresholds passes
    t = evaluate_targets(_loss(oracle=3.0, routed_mix=3.06, base=3.4), _routing(supervised=0.95))
    assert t["mix_vs_oracle"]["pass"] is True
    assert t["mix_vs_base"]["pass"] is True
    assert t["best_router_top1"]["pass"] is True


@pytest.mark.parametrize(("lf", "un", "sup", "ok"), [
    (0.90, 0.85, 0.99, True),  # exactly untrained + 0.05
    (0.89, 0.85, 0.99, False),  # neither condition
    (0.89, 0.88, 0.90, True),  # within 0.01 of supervised
    (0.95, 0.94, 0.90, True),  # above supervised counts as within
    (0.80, 0.85, None, None),  # gain fails and the supervised check is missing: undecided
    (0.91, 0.85, None, True),  # gain passes: supervised not needed
    (None, 0.85, 0.90, None),  # label-free missing
])
def test_label_free_target(lf, un, sup, ok):
    t = evaluate_targets(_loss(), _routing(label_free=lf, untrained=un, supervised=sup))["label_free"]
    assert t["pass"] is ok
    assert t["value"] == lf


def test_label_free_targets_judge_the_router_picked_on_validation():
    r = _routing(label_free=0.80, likelihood=0.91, untrained=0.85)
    r["label_free"]["val"] = {"top1": 0.9, "loss": {"top3": 3.70}}
    r["likelihood"]["val"] = {"top1": 0.8, "loss": {"top3": 3.60}}  # lower val loss wins, whatever its test top-1
    assert pick_label_free(r) == "likelihood"
    assert evaluate_targets(_loss(), r)["label_free"] == {**evaluate_targets(_loss(), r)["label_free"],
                                                           "value": 0.91, "router": "likelihood", "pass": True}
    r["label_free"]["val"]["loss"]["top3"] = 3.50
    assert pick_label_free(r) == "label_free"
    assert evaluate_targets(_loss(), r)["label_free"]["pass"] is False  # 0.80 < 0.85 + 0.05 and far from 0.93
    assert pick_label_free(_routing()) is None  # no validation figures: nothing to pick


def test_targets_missing_losses_are_undecided():
    loss = _loss()
    loss["routed_mix"] = skipped("no router")
    t = evaluate_targets(loss, _routing())
    assert t["mix_vs_oracle"]["pass"] is None and t["mix_vs_oracle"]["value"] is None
    assert t["mix_vs_base"]["pass"] is None


# --- schema / writer ------------------------------------------------------------------------------
def test_valid_report_has_no_errors_and_round_trips(tmp_path):
    rep = _report(extra=np.float32(1.5))
    assert validate_report(rep) == []
    path = write_report_json(tmp_path / "r.json", rep)
    data = json.loads(path.read_text())
    assert set(SETTINGS) <= set(data["loss"]) and set(ROUTERS) <= set(data["routing"])
    assert data["extra"] == 1.5
    for r in ROUTERS:
        for k in ("top1", "top3"):
            v = data["routing"][r][k]
            assert v is None or 0.0 <= v <= 1.0
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left nothing behind


def test_percent_values_and_missing_sections_are_rejected(tmp_path):
    rep = _report()
    rep["routing"]["tfidf"]["top1"] = 80.0  # a percentage, not a fraction
    del rep["loss"]["merged_ties"]
    del rep["timing"]
    errors = validate_report(rep)
    assert any("routing.tfidf.top1" in e for e in errors)
    assert any("loss.merged_ties" in e for e in errors)
    assert any("'timing'" in e for e in errors)
    with pytest.raises(ValueError, match="invalid report"):
        write_report_json(tmp_path / "r.json", rep)
    # non-strict: written anyway, with the problems listed
    data = json.loads(write_report_json(tmp_path / "r.json", rep, strict=False).read_text())
    assert data["schema_errors"] == errors


def test_null_values_need_a_skipped_reason():
    rep = _report()
    rep["routing"]["arrow"] = {"top1": None, "top3": None}
    rep["loss"]["uniform"] = {"mean": None}
    errors = validate_report(rep)
    assert any("routing.arrow.top1 is null" in e for e in errors)
    assert any("loss.uniform.mean is null" in e for e in errors)
    rep["routing"]["arrow"]["skipped"] = "x"
    rep["loss"]["uniform"]["skipped"] = "x"
    assert validate_report(rep) == []


def test_top3_below_top1_and_negative_loss_are_errors():
    rep = _report()
    rep["routing"]["arrow"] = {"top1": 0.9, "top3": 0.5}
    rep["loss"]["base"]["law"] = -1.0
    errors = validate_report(rep)
    assert any("top3" in e for e in errors) and any("negative" in e for e in errors)


def test_jsonable_converts_numpy_and_non_finite():
    out = jsonable({"a": np.arange(3), "b": np.float64("nan"), "c": (np.int64(2), float("inf")), 3: np.bool_(True)})
    assert out == {"a": [0, 1, 2], "b": None, "c": [2, None], "3": True}
    json.dumps(out, allow_nan=False)


# --- markdown / plots -----------------------------------------------------------------------------
def test_markdown_shows_command_targets_tables_and_plots():
    rep = _report(command="python bench/quality.py --out X --quick", status="complete", best_router="supervised")
    rep["routing"]["arrow"] = skipped("loramix.route.arrow is not available", ("top1", "top3"))
    md = render_markdown(rep, {"Routing confusion": "confusion.png"})
    assert "python bench/quality.py --out X --quick" in md
    assert "| mix_vs_base |" in md and "**PASS**" in md and "**FAIL**" in md
    assert "| **mean** | 4.000 | 3.000 |" in md
    assert "| examples | arrow | – | – |" in md and "not available" in md
    assert "![Routing confusion](confusion.png)" in md


def test_refine_verdict():
    assert refine_verdict(-0.05).startswith("Re-routing helps")
    assert refine_verdict(0.05).startswith("Re-routing hurts")
    assert refine_verdict(0.001).startswith("No clear effect")
    assert refine_verdict(None).startswith("No verdict")


def test_plots_are_written(tmp_path):
    m = np.array([[5, 1, 0], [0, 6, 0]])
    p = plot_confusion(m, DOMAINS, tmp_path / "c.png", "t")
    assert p.read_bytes()[:4] == b"\x89PNG"
    loss = _loss()
    loss["merged_ties"] = skipped("x")
    p = plot_loss_bars(loss, DOMAINS, tmp_path / "l.png")
    assert p.stat().st_size > 1000


# --- issue-8 router targets -----------------------------------------------------------------------
def _r(top1, loss3, q=None, loss1=None):
    return {"top1": top1, "top3": 1.0, "loss": {"top1": loss1 if loss1 is not None else loss3, "top3": loss3},
            "questions_top1": q}


def _router_report(lf_a=0.90, lf_a_loss=3.70, lf_b=0.80, lf_b_loss=3.74, default="label_free", share=0.4, rest=0.001):
    routing = {"untrained": _r(0.85, 3.72, q=0.9), "label_free": _r(lf_a, lf_a_loss, q=0.96),
               "supervised": _r(0.86, 3.71)}
    rep = {"routing_desc_only": {"untrained": _r(0.55, 3.95), "label_free": _r(lf_b, lf_b_loss)},
           "default_router": default, "refine": {"hard": {"recovered_share": share}, "rest": {"relative_change": rest}}}
    return routing, rep


def test_router_targets_pass_and_fail_on_the_issue_thresholds():
    from loramix.evaluate.report import router_targets

    routing, rep = _router_report()
    t = router_targets(routing, rep)
    assert t["label_free_keys"]["pass"] is True and t["label_free_keys"]["value"] == pytest.approx(0.05)
    assert t["label_free_desc_only"]["pass"] is True  # +0.25 and 3.74 / 3.72 - 1 = 0.5% <= 2%
    assert t["supervised_vs_keys"]["pass"] is True
    assert t["default_router_top1"]["pass"] is False and t["default_router_top1"]["value"] == pytest.approx(0.90)
    assert t["refine_hard"]["pass"] is True
    routing, rep = _router_report(lf_a=0.87, lf_a_loss=3.73, lf_b=0.70, lf_b_loss=3.80, share=0.2, rest=0.01)
    t = router_targets(routing, rep)
    assert t["label_free_keys"]["pass"] is False  # +0.02 < 0.03 and worse top-3 loss
    assert t["label_free_desc_only"]["pass"] is False  # +0.15 < 0.20
    assert t["refine_hard"]["pass"] is False
    routing, rep = _router_report(lf_b_loss=3.72 * 1.03)
    assert router_targets(routing, rep)["label_free_desc_only"]["pass"] is False  # loss 3% above keys' untrained


def test_router_targets_undecided_without_numbers_and_in_evaluate_targets():
    from loramix.evaluate.report import router_targets

    t = router_targets({}, {})
    assert all(v["pass"] is None for v in t.values())
    routing, rep = _router_report()
    full = evaluate_targets(_loss(), {**_routing(), **routing}, rep)
    assert {"mix_vs_oracle", "label_free", "label_free_keys", "label_free_desc_only", "default_router_top1"} <= set(full)
    assert "label_free_keys" not in evaluate_targets(_loss(), _routing())  # old call: old targets only


def test_markdown_shows_loss_by_router_desc_only_and_default():
    routing, rep = _router_report()
    report = _report()
    report["routing"] = {**report["routing"], **routing}
    report |= rep | {"loss_by_router": {"base": {"top1": 4.5, "top3": 4.5}, "oracle": {"top1": 3.7, "top3": 3.7}},
                     "best_router": "label_free", "best_router_rule": "lowest val loss"}
    md = render_markdown(report)
    assert "| description | label_free | 0.800 |" in md and "| examples | label_free | 0.900 |" in md
    assert "Default router" in md and "**label_free**" in md and "base 4.500, oracle 3.700" in md
