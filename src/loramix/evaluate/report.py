"""The quality report: the schema of ``report.json``, the product targets, markdown and plots.

``report.json`` (written by :func:`write_report_json`, which validates it first)::

    {"loss":    {SETTING: {"mean": x, DOMAIN: x, ...}, ...},   # mean token NLL (nats), macro mean
     "routing": {ROUTER: {"top1": f, "top3": f, ...}, ...},     # fractions in [0, 1]
     "targets": {NAME: {"description", "value", "threshold", "pass", ...}},
     "timing":  {STAGE: {"wall_s": s, "cpu_s": s}, ...},
     "config":  {...}, ...}

A setting or router that could not run has ``None`` values and a ``"skipped"`` reason.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SETTINGS = ("base", "oracle", "routed_top1", "routed_mix", "uniform", "merged_linear", "merged_ties")
ROUTERS = ("tfidf", "untrained", "label_free", "likelihood", "supervised", "arrow")
# routers that are engine strategies (usable by `loramix route`), with their strategy names
STRATEGY_OF = {"untrained": "semantic", "label_free": "trained", "likelihood": "semantic",
               "label_free_likelihood": "trained", "supervised": "supervised", "arrow": "arrow"}
RERANK_OF = {"likelihood": "likelihood", "label_free_likelihood": "likelihood"}  # the others: rerank "none"
# routers that learn from or route by the adapters' loss, with no labels; the targets judge the one of them
# with the lowest validation loss of its top-3 mixture
LABEL_FREE = ("label_free", "likelihood", "label_free_likelihood")

MIX_VS_ORACLE_MAX = 0.02  # routed mixture loss at most 2% above the oracle's
MIX_VS_BASE_MIN = 0.10  # routed mixture loss at least 10% below the base model's
BEST_TOP1_MIN = 0.95
LABEL_FREE_GAIN = 0.05  # label-free top-1 >= untrained + 0.05 ...
LABEL_FREE_TOL = 0.01  # ... or within 0.01 of the supervised router
KEYS_A_GAIN = 0.03  # condition a (example keys): label_free top-1 >= untrained + 0.03, top-3 loss no worse
DESC_GAIN = 0.20  # condition b (description keys): label_free top-1 >= untrained (b) + 0.20 ...
DESC_LOSS_TOL = 0.02  # ... and its routed loss within 2% of condition a's untrained router
QUESTIONS_MIN = 0.95  # the default router's top-1 on the hand-written questions and held-out texts
REFINE_SHARE_MIN = 0.30  # refine recovers >= 30% of the routed-to-oracle gap on the hard subset ...
REFINE_REST_MAX = 0.005  # ... with no more than 0.5% loss on the rest
_EPS = 1e-9  # thresholds are inclusive; float noise must not flip them


# --- small helpers --------------------------------------------------------------------------------
def _num(x: Any) -> float | None:
    """A finite float, else None."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays converted, NaN and inf become None, paths strings."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def loss_table(per_text: Mapping[str, Sequence[float]], domains: Sequence[str]) -> dict[str, float | None]:
    """``{"mean": macro mean over domains, DOMAIN: mean over its texts}`` from per-text losses."""
    per: dict[str, float | None] = {}
    vals: list[float] = []
    for d in domains:
        xs = [float(x) for x in per_text.get(d, []) if _num(x) is not None]
        per[d] = sum(xs) / len(xs) if xs else None
        if xs:
            vals.append(sum(xs) / len(xs))
    return {"mean": (sum(vals) / len(vals)) if vals and len(vals) == len(domains) else None, **per}


def skipped(reason: str, keys: Sequence[str] = ("mean",)) -> dict[str, Any]:
    """The entry of a setting or router that did not run."""
    return {**{k: None for k in keys}, "skipped": reason}


def best_router(routing: Mapping[str, Mapping[str, Any]], candidates: Sequence[str] = tuple(STRATEGY_OF)) -> str | None:
    """The candidate with the highest top-1 (then top-3; ties: candidate order), None if none ran."""
    ran = [(c, _num(routing.get(c, {}).get("top1")), _num(routing.get(c, {}).get("top3"))) for c in candidates]
    ran = [(c, t1, t3 or 0.0) for c, t1, t3 in ran if t1 is not None]
    if not ran:
        return None
    return max(ran, key=lambda r: (r[1], r[2], -candidates.index(r[0])))[0]


# --- targets ------------------------------------------------------------------------------------------
def _target(description: str, value: float | None, threshold: float, ok: bool | None, **extra: Any) -> dict[str, Any]:
    return {"description": description, "value": value, "threshold": threshold, "pass": ok, **extra}


def _loss(entry: Mapping[str, Any] | None, k: str) -> float | None:
    return _num(((entry or {}).get("loss") or {}).get(k))


def pick_label_free(routing: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The label-free router (of :data:`LABEL_FREE`) with the lowest validation loss of its top-3 mixture
    (ties: higher validation top-1); None if none ran."""
    ran = []
    for name in LABEL_FREE:
        val = (routing.get(name) or {}).get("val") or {}
        l3, t1 = _num((val.get("loss") or {}).get("top3")), _num(val.get("top1"))
        if l3 is not None:
            ran.append((l3, -(t1 or 0.0), LABEL_FREE.index(name), name))
    return min(ran)[3] if ran else None


def router_targets(routing: Mapping[str, Mapping[str, Any]], report: Mapping[str, Any]) -> dict[str, Any]:
    """Issue-8 targets: label-free router in both key conditions, supervised vs keys, questions, refine.

    "label_free" in the targets is the label-free router picked on the validation split
    (:func:`pick_label_free`), per key condition."""
    out: dict[str, Any] = {}
    lf_a = pick_label_free(routing) or "label_free"
    un, lf = routing.get("untrained", {}), routing.get(lf_a, {})
    u1, l1 = _num(un.get("top1")), _num(lf.get("top1"))
    u3l, l3l = _loss(un, "top3"), _loss(lf, "top3")
    ok = None if None in (u1, l1, u3l, l3l) else bool(l1 >= u1 + KEYS_A_GAIN - _EPS and l3l <= u3l + _EPS)  # type: ignore[operator]
    out["label_free_keys"] = _target(
        "example keys: label_free top-1 >= untrained + 0.03 and its top-3 loss no worse than untrained's",
        None if l1 is None or u1 is None else l1 - u1, KEYS_A_GAIN, ok, label_free_top1=l1, untrained_top1=u1,
        label_free_top3_loss=l3l, untrained_top3_loss=u3l, label_free_router=lf_a)
    desc = report.get("routing_desc_only") or {}
    lf_b = pick_label_free(desc) or "label_free"
    ub1, lb1 = _num(desc.get("untrained", {}).get("top1")), _num(desc.get(lf_b, {}).get("top1"))
    lb3l = _loss(desc.get(lf_b), "top3")
    rel = None if lb3l is None or not u3l else lb3l / u3l - 1.0
    ok = None if None in (ub1, lb1, rel) else bool(lb1 >= ub1 + DESC_GAIN - _EPS and rel <= DESC_LOSS_TOL + _EPS)  # type: ignore[operator]
    out["label_free_desc_only"] = _target(
        "description keys: label_free top-1 >= untrained (desc) + 0.20, top-3 loss within 2% of example-keys untrained",
        None if lb1 is None or ub1 is None else lb1 - ub1, DESC_GAIN, ok, label_free_top1=lb1, untrained_top1=ub1,
        loss_vs_keys_untrained=rel, label_free_router=lf_b)
    s1 = _num(routing.get("supervised", {}).get("top1"))
    out["supervised_vs_keys"] = _target(
        "supervised linear head top-1 not below the untrained keys", None if s1 is None or u1 is None else s1 - u1,
        0.0, None if s1 is None or u1 is None else s1 >= u1 - _EPS, supervised=s1, untrained=u1)
    name = report.get("default_router")
    d = routing.get(name, {}) if isinstance(name, str) else {}
    q, t1 = _num(d.get("questions_top1")), _num(d.get("top1"))
    out["default_router_top1"] = _target(
        "default router top-1 >= 0.95 on the hand-written questions and on the held-out texts",
        None if q is None or t1 is None else min(q, t1), QUESTIONS_MIN,
        None if q is None or t1 is None else min(q, t1) >= QUESTIONS_MIN - _EPS, router=name, questions=q, held_out=t1)
    ref = report.get("refine") or {}
    share = _num((ref.get("hard") or {}).get("recovered_share"))
    rest = _num((ref.get("rest") or {}).get("relative_change"))
    out["refine_hard"] = _target(
        "refine recovers >= 30% of the routed-to-oracle gap on the hard subset, <= 0.5% loss on the rest",
        share, REFINE_SHARE_MIN,
        None if share is None or rest is None else bool(share >= REFINE_SHARE_MIN - _EPS and rest <= REFINE_REST_MAX + _EPS),
        rest_relative_change=rest)
    return out


def evaluate_targets(loss: Mapping[str, Mapping[str, Any]], routing: Mapping[str, Mapping[str, Any]],
                     report: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The product targets with measured values and pass/fail (``None`` when a needed number is missing).

    With ``report`` (the rest of report.json), the router targets of :func:`router_targets` too."""
    mix = _num(loss.get("routed_mix", {}).get("mean"))
    oracle = _num(loss.get("oracle", {}).get("mean"))
    base = _num(loss.get("base", {}).get("mean"))
    out: dict[str, Any] = {}
    gap = mix / oracle - 1.0 if mix is not None and oracle else None
    out["mix_vs_oracle"] = _target(
        "routed mixture (top-3) mean loss within 2% of the oracle adapter's", gap, MIX_VS_ORACLE_MAX,
        None if gap is None else gap <= MIX_VS_ORACLE_MAX + _EPS, routed_mix=mix, oracle=oracle)
    gain = 1.0 - mix / base if mix is not None and base else None
    out["mix_vs_base"] = _target(
        "routed mixture mean loss at least 10% below the base model's", gain, MIX_VS_BASE_MIN,
        None if gain is None else gain >= MIX_VS_BASE_MIN - _EPS, routed_mix=mix, base=base)
    name = best_router(routing)
    top1 = _num(routing[name]["top1"]) if name else None
    out["best_router_top1"] = _target(
        "best router (engine strategies) top-1 accuracy at least 0.95", top1, BEST_TOP1_MIN,
        None if top1 is None else top1 >= BEST_TOP1_MIN - _EPS, router=name)
    lf_name = pick_label_free(routing) or "label_free"
    lf = _num(routing.get(lf_name, {}).get("top1"))
    un = _num(routing.get("untrained", {}).get("top1"))
    sup = _num(routing.get("supervised", {}).get("top1"))
    checks = []
    if lf is not None and un is not None:
        checks.append(lf >= un + LABEL_FREE_GAIN - _EPS)
    if lf is not None and sup is not None:
        checks.append(lf >= sup - LABEL_FREE_TOL - _EPS)
    ok: bool | None = any(checks) if checks else None
    if ok is False and (un is None or sup is None):
        ok = None  # the condition that might pass could not be checked
    out["label_free"] = _target(
        "label-free router top-1 >= untrained + 0.05, or within 0.01 of the supervised router", lf,
        LABEL_FREE_GAIN, ok, untrained=un, supervised=sup, router=lf_name,
        gain_over_untrained=None if lf is None or un is None else lf - un,
        gap_to_supervised=None if lf is None or sup is None else sup - lf)
    if report is not None:
        out |= router_targets(routing, report)
    return out


# --- schema --------------------------------------------------------------------------------------------
def validate_report(report: Mapping[str, Any]) -> list[str]:
    """Problems with a report's shape (empty when valid): required keys, numbers, fractions in [0, 1]."""
    errors: list[str] = []
    for key in ("loss", "routing", "targets", "timing", "config"):
        if not isinstance(report.get(key), Mapping):
            errors.append(f"missing section {key!r} (a JSON object)")
    loss: Mapping[str, Any] = report["loss"] if isinstance(report.get("loss"), Mapping) else {}
    for s in SETTINGS:
        entry = loss.get(s)
        if not isinstance(entry, Mapping) or "mean" not in entry:
            errors.append(f"loss.{s}: missing (expected an object with 'mean')")
            continue
        for k, v in entry.items():
            if k == "skipped":
                continue
            if v is not None and _num(v) is None:
                errors.append(f"loss.{s}.{k}: {v!r} is not a finite number or null")
            elif v is not None and v < 0:
                errors.append(f"loss.{s}.{k}: {v} is negative; a loss is >= 0")
        if entry.get("mean") is None and "skipped" not in entry:
            errors.append(f"loss.{s}.mean is null without a 'skipped' reason")
    routing: Mapping[str, Any] = report["routing"] if isinstance(report.get("routing"), Mapping) else {}
    for r in ROUTERS:
        entry = routing.get(r)
        if not isinstance(entry, Mapping) or "top1" not in entry or "top3" not in entry:
            errors.append(f"routing.{r}: missing (expected an object with 'top1' and 'top3')")
            continue
        for k in ("top1", "top3"):
            v = entry[k]
            if v is None:
                if "skipped" not in entry:
                    errors.append(f"routing.{r}.{k} is null without a 'skipped' reason")
            elif _num(v) is None or not 0.0 <= float(v) <= 1.0:
                errors.append(f"routing.{r}.{k}: {v!r} is not a fraction in [0, 1]")
        t1, t3 = _num(entry.get("top1")), _num(entry.get("top3"))
        if t1 is not None and t3 is not None and t3 < t1 - 1e-12:
            errors.append(f"routing.{r}: top3 {t3} < top1 {t1}")
    targets: Mapping[str, Any] = report["targets"] if isinstance(report.get("targets"), Mapping) else {}
    for name, t in targets.items():
        if not isinstance(t, Mapping) or "value" not in t or "pass" not in t:
            errors.append(f"targets.{name}: expected an object with 'value' and 'pass'")
        elif t["pass"] not in (True, False, None):
            errors.append(f"targets.{name}.pass: {t['pass']!r} is not true, false or null")
    return errors


def write_report_json(path: str | Path, report: Mapping[str, Any], strict: bool = True) -> Path:
    """Write the report (JSON-safe, NaN -> null) atomically; with ``strict``, refuse an invalid one."""
    data = jsonable(report)
    errors = validate_report(data)
    if errors and strict:
        raise ValueError("invalid report: " + "; ".join(errors))
    if errors:
        data["schema_errors"] = errors
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# --- markdown ------------------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 3) -> str:
    v = _num(x)
    return "–" if v is None else f"{v:.{digits}f}"


def _pass(p: Any) -> str:
    return {True: "**PASS**", False: "**FAIL**"}.get(p, "n/a")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def render_markdown(report: Mapping[str, Any], plots: Mapping[str, str] | None = None) -> str:
    """The human report: command, targets, loss and routing tables, extras, timing, plots, notes."""
    cfg = report.get("config", {})
    lines = ["# loramix quality benchmark", ""]
    if report.get("command"):
        lines += ["```", str(report["command"]), "```", ""]
    domains = list(cfg.get("domains", []))
    lines += [f"Mode: **{cfg.get('mode', '?')}**; {len(domains)} domains; base `{cfg.get('base', '?')}`; "
              f"{cfg.get('test_per_domain', '?')} held-out texts per domain (asked; "
              f"{cfg.get('n_test', '?')} in all), {cfg.get('train_per_domain', '?')} training texts per domain; "
              f"expert steps {cfg.get('train', {}).get('steps', '?')}. Status: **{report.get('status', '?')}**.", ""]
    if report.get("error"):
        lines += [f"**Error:** `{report['error']}`", ""]

    lines += ["## Targets", ""]
    rows = []
    for name, t in report.get("targets", {}).items():
        extra = ", ".join(f"{k} {_fmt(v) if _num(v) is not None else v}" for k, v in t.items()
                          if k not in ("description", "value", "threshold", "pass") and v is not None)
        rows.append([name, t.get("description", ""), _fmt(t.get("value"), 4), _fmt(t.get("threshold"), 2),
                     _pass(t.get("pass")), extra])
    lines += _table(["target", "what", "value", "threshold", "result", "details"], rows) + [""]

    loss = report.get("loss", {})
    settings = [s for s in loss if isinstance(loss[s], Mapping)]
    lines += ["## Held-out loss (mean token NLL, nats; lower is better)", ""]
    rows = [[f"**{d}**" if d == "mean" else d, *(_fmt(loss[s].get(d)) for s in settings)] for d in ["mean", *domains]]
    lines += _table(["domain", *settings], rows) + [""]
    notes = [f"- `{s}` skipped: {loss[s]['skipped']}" for s in settings if loss[s].get("skipped")]
    if cfg.get("settings"):
        notes += [f"- `{s}`: {what}" for s, what in cfg["settings"].items()]
    lines += notes + ([""] if notes else [])

    routing = report.get("routing", {})
    lines += ["## Routers: accuracy and the loss they deliver (test split)", ""]
    lbr = report.get("loss_by_router") or {}
    if lbr:
        lines += [f"Reference: base {_fmt(lbr.get('base', {}).get('top1'))}, oracle "
                  f"{_fmt(lbr.get('oracle', {}).get('top1'))} (mean token NLL of the full held-out texts).", ""]
    header = ["keys", "router", "top-1", "top-3", "loss top-1", "loss top-3", "questions top-1", "val top-1",
              "val loss top-3", "seconds", "note"]
    rows = []
    for cond, table in (("examples", routing), ("description", report.get("routing_desc_only") or {})):
        for r, e in table.items():
            note = e.get("skipped") or e.get("note") or ""
            val = e.get("val") or {}
            rows.append([cond, r, _fmt(e.get("top1")), _fmt(e.get("top3")), _fmt(_loss(e, "top1")), _fmt(_loss(e, "top3")),
                         _fmt(e.get("questions_top1")), _fmt(val.get("top1")), _fmt((val.get("loss") or {}).get("top3")),
                         _fmt(e.get("seconds"), 1), note])
    lines += _table(header, rows) + [""]
    if report.get("best_router"):
        lines += [f"Best engine router: **{report['best_router']}**, chosen on the validation split "
                  f"({report.get('best_router_rule', 'see notes')}); used for `routed_top1`, `routed_mix`, refine "
                  "and the confusion matrix.", ""]
    if "default_router" in report:
        lines += [f"Default router (what `loramix route` uses with the example-keys library): "
                  f"**{report.get('default_router')}**; with the description-keys library: "
                  f"**{report.get('default_router_desc_only', '–')}**. The trained head is the default strategy only where its "
                  "stored held-out verdict says it beats the keys; an engine re-ranks the strategy's top 8 by each "
                  "adapter's likelihood of the query by default (`rerank='auto'`).", ""]
    for cond, key in (("example", "label_free"), ("description", "label_free")):
        table = routing if cond == "example" else (report.get("routing_desc_only") or {})
        v = ((table.get(key) or {}).get("train") or {}).get("validation")
        if v:
            lines += [f"- label_free ({cond} keys) held-out check on {v.get('n_val')} pairs: routed loss keys "
                      f"{_fmt(v.get('routed_loss_keys'), 4)}, head {_fmt(v.get('routed_loss_trained'), 4)}, paired gain "
                      f"{_fmt(v.get('gain'), 4)} +- {_fmt(v.get('gain_se'), 4)} (learns {v.get('learn', 'head')}, start "
                      f"{v.get('init', 'keys')}, pull {v.get('key_reg', '–')}, mix {v.get('mix')}, tau {v.get('tau')}, "
                      f"best step {v.get('best_step')}); beats keys: **{v.get('beats_keys')}**"]
            rr = v.get("rerank") or {}
            if "gain" in rr:
                lines += [f"- likelihood re-ranking ({cond} keys) held-out check on {rr.get('n_val')} pairs (continuation "
                          f"loss only): keys' first {_fmt(rr.get('loss_keys'), 4)}, re-ranked first "
                          f"{_fmt(rr.get('loss_reranked'), 4)}, paired gain {_fmt(rr.get('gain'), 4)} +- "
                          f"{_fmt(rr.get('gain_se'), 4)}, first candidate changed on {_fmt(rr.get('changed'))} of them; "
                          f"hurts: **{rr.get('hurts')}** (the CLI and server re-rank unless it does)"]
    diag = report.get("arrow_diagnostics")
    if diag:
        lines += [f"- arrow diagnostics: top singular direction holds {_fmt(diag.get('top_share'))} of an update's "
                  f"energy (flat spectrum: {_fmt(diag.get('flat_share'))}); mean |cos| between two experts' prototypes "
                  f"at the same layer {_fmt(diag.get('cross_cos'))} (random vectors: {_fmt(diag.get('random_cos'))})"]
    lines += [""]

    clusters = report.get("clusters")
    if clusters:
        lines += ["## Clusters (k-means segments of the training texts)", ""]
        if clusters.get("skipped"):
            lines += [f"Skipped: {clusters['skipped']}", ""]
        else:
            lines += [f"- ARI of segments vs true domains: **{_fmt(clusters.get('ari'))}**",
                      f"- routing mapped via each cluster's majority domain: top-1 {_fmt(clusters.get('top1'))}, "
                      f"top-3 {_fmt(clusters.get('top3'))} ({clusters.get('routing', 'not measured')})",
                      f"- domains that are no cluster's majority: {', '.join(clusters.get('unmapped_domains', [])) or 'none'}",
                      ""]
    refine = report.get("refine")
    if refine:
        lines += ["## Refine (re-routing when the routed mixture looks poor)", ""]
        if refine.get("skipped"):
            lines += [f"Skipped: {refine['skipped']}", ""]
        else:
            lines += [f"{refine.get('n')} held-out prompts (query = first words, target = the rest), router "
                      f"`{refine.get('router')}`: loss without refine {_fmt(refine.get('loss_without'))}, with "
                      f"{_fmt(refine.get('loss_with'))} (delta {_fmt(refine.get('delta'), 4)}); triggered "
                      f"{refine.get('triggered')}, changed {refine.get('changed')}, improved {refine.get('improved')}, "
                      f"worsened {refine.get('worsened')}; chosen {refine.get('chosen')}. "
                      f"**{refine_verdict(refine.get('delta'))}**", ""]
            if refine.get("hard"):
                h, r = refine["hard"], refine.get("rest") or {}
                lines += [f"Thresholds calibrated on {refine.get('calibrated_on')}: max_prompt_loss "
                          f"{refine.get('max_prompt_loss')}, max_entropy {refine.get('max_entropy')}. Hard subset "
                          f"(first route wrong, {h.get('n')} prompts): loss {_fmt(h.get('loss_without'))} -> "
                          f"{_fmt(h.get('loss_with'))}, oracle {_fmt(h.get('oracle'))}; recovered share of the gap "
                          f"**{_fmt(h.get('recovered_share'))}**. Rest ({r.get('n')} prompts): relative change "
                          f"{_fmt(r.get('relative_change'), 4)}.", ""]

    timing = report.get("timing", {})
    if timing:
        lines += ["## Wall time per stage", ""]
        rows = [[s, _fmt(t.get("wall_s"), 1), _fmt(t.get("cpu_s"), 1), t.get("status", "")] for s, t in timing.items()]
        lines += _table(["stage", "wall s", "cpu s", "status"], rows) + [""]

    if plots:
        lines += ["## Plots", ""]
        for title, file in plots.items():
            lines += [f"### {title}", "", f"![{title}]({file})", ""]
    if report.get("notes"):
        lines += ["## Method notes", "", *[f"- {n}" for n in report["notes"]], ""]
    return "\n".join(lines)


def refine_verdict(delta: Any, tol: float = 0.005) -> str:
    """A sentence on whether refining helped, given the mean loss change (with - without)."""
    d = _num(delta)
    if d is None:
        return "No verdict: refine did not produce numbers."
    if d < -tol:
        return f"Re-routing helps: mean loss {d:+.4f} nats."
    if d > tol:
        return f"Re-routing hurts: mean loss {d:+.4f} nats."
    return f"No clear effect: mean loss {d:+.4f} nats (|delta| <= {tol})."


# --- plots --------------------------------------------------------------------------------------------
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(matrix: np.ndarray, labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion heat map (rows: gold, columns: predicted; last column 'none' if present)."""
    plt = _plt()
    m = np.asarray(matrix, dtype=float)
    cols = list(labels) + (["(none)"] if m.shape[1] == len(labels) + 1 else [])
    if m.shape[1] == len(labels) + 1 and m[:, -1].sum() == 0:
        m, cols = m[:, :-1], cols[:-1]
    frac = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = 2.0 + 0.45 * max(len(cols), 4)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("routed top-1")
    ax.set_ylabel("true domain")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j]:
                ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=6,
                        color="white" if frac[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.04, label="share of the domain's queries")
    ax.set_title(title or "routing confusion")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss_bars(loss: Mapping[str, Mapping[str, Any]], domains: Sequence[str], path: str | Path,
                   settings: Sequence[str] | None = None, title: str = "") -> Path:
    """Grouped bars: per domain (and the mean), the loss under each setting that has numbers."""
    plt = _plt()
    settings = [s for s in (settings or list(loss))
                if s in loss and any(_num(loss[s].get(g)) is not None for g in ["mean", *domains])]
    groups = ["mean", *domains]
    width = 0.8 / max(len(settings), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(groups) + 3.5), 4.5))
    x = np.arange(len(groups))
    for i, s in enumerate(settings):
        ys = [(_num(loss[s].get(g)) or 0.0) for g in groups]
        ax.bar(x + (i - (len(settings) - 1) / 2) * width, ys, width, label=s)
    vals = [v for s in settings for g in groups if (v := _num(loss[s].get(g))) is not None]
    if vals:  # zoom in: the settings differ by a few percent
        lo, hi = min(vals), max(vals)
        ax.set_ylim(max(0.0, lo - 0.15 * (hi - lo) - 0.05), hi + 0.05 * (hi - lo) + 0.05)
    ax.set_xticks(x, groups, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("mean token NLL (nats; axis zoomed)")
    ax.set_title(title or "held-out loss per domain")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
