"""Re-routing at generation: when the routed mixture looks poor for a prompt, pick another one.

Two signals, both measured in float32 without autocast:

* the prompt's loss: mean token NLL of the raw prompt text under the mixture;
* the mean entropy (nats) of the next-token distributions of the first ``n_tokens`` tokens the
  mixture generates greedily for the chat-formatted prompt (a short probe, then discarded).

If either exceeds its threshold in :class:`~loramix.config.RefineConfig`, one action is applied:
``widen`` routes again with ``k + widen_k``; ``drop`` removes the adapter whose removal lowers the
prompt loss most (weights renormalised; one adapter dropped leaves the base model); ``base`` uses
the base model; ``auto`` scores all of those and the original mixture in one batch and keeps the
lowest prompt loss ("keep" when the original wins). The engine then generates with the result.

:func:`refine_for_ask` is the engine's hook (it logs ``reroute`` events); :func:`refine_eval`
measures, for a benchmark, whether refining lowers the loss of reference answers.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from loramix.config import RefineConfig, RouteConfig

if TYPE_CHECKING:
    from loramix.app import Loramix

Mixture = list[tuple[str, float]]


@dataclass
class Decision:
    """What refining chose for one prompt (no side effects yet)."""

    triggered: bool
    prompt_loss: float
    entropy: float
    before: Mixture
    after: Mixture
    chosen: str | None = None  # widen | drop | base | keep; None when not triggered
    after_shown: list[dict[str, Any]] | None = None  # route-style dicts when a route produced ``after``
    candidate_losses: dict[str, float] = field(default_factory=dict)


@dataclass
class RefineOutcome:
    """The mixture to generate with, what to show, ``Answer.info["refine"]`` and the ids already counted."""

    mixture: Mixture
    shown: list[dict[str, Any]]
    info: dict[str, Any]
    recorded: set[str]


# --- measurements -------------------------------------------------------------------------------
def prompt_losses(engine: Loramix, prompt: str, mixtures: Sequence[Mixture]) -> list[float]:
    """Mean token NLL of ``prompt`` under each mixture, one batched pass (float32)."""
    from loramix.evaluate.score import score_texts

    if not mixtures:
        return []
    with engine._lock:
        scores = score_texts(engine.mixer, [prompt] * len(mixtures), list(mixtures))
    return [s.loss for s in scores]


def probe_entropy(engine: Loramix, ids: torch.Tensor, mixture: Mixture, n_tokens: int) -> float:
    """Mean entropy (nats) of the first ``n_tokens`` greedy next-token distributions; ids (1, T)."""
    tok = engine.base.tokenizer
    with engine._lock:
        mm = engine.mixer
        with mm.mixture([mixture]), torch.inference_mode():
            out = mm.model.generate(  # type: ignore[operator]
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens, do_sample=False,
                output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    logits = torch.cat([s.float() for s in out.logits], dim=0)  # (steps, V)
    logp = torch.log_softmax(logits, dim=-1)  # (steps, V)
    ent = -(logp.exp() * logp).sum(-1)  # (steps,)
    return float(ent.mean())


def triggered(cfg: RefineConfig, prompt_loss: float, entropy: float) -> bool:
    """Whether either signal is over its threshold."""
    return bool((cfg.max_prompt_loss is not None and prompt_loss > cfg.max_prompt_loss)
                or (cfg.max_entropy is not None and entropy > cfg.max_entropy))


# --- candidates ---------------------------------------------------------------------------------
def without(mixture: Mixture, i: int) -> Mixture:
    """The mixture minus its i-th adapter, weights renormalised to the old total."""
    rest = [m for j, m in enumerate(mixture) if j != i]
    total, kept = sum(w for _, w in mixture), sum(w for _, w in rest)
    if not rest or kept <= 0:
        return []
    return [(a, w * total / kept) for a, w in rest]


def _widened(engine: Loramix, prompt: str, route_cfg: RouteConfig | None,
             cfg: RefineConfig) -> tuple[Mixture, list[dict[str, Any]]] | None:
    if route_cfg is None:
        return None
    r = engine.route(prompt, dataclasses.replace(route_cfg, k=route_cfg.k + cfg.widen_k))
    return r.mixture, r.to_dict()["adapters"]


def decide(engine: Loramix, prompt: str, ids: torch.Tensor, mixture: Mixture, route_cfg: RouteConfig | None,
           cfg: RefineConfig, force: bool = False) -> Decision:
    """Measure the mixture and, if over a threshold (or ``force``), choose the refined one."""
    loss = prompt_losses(engine, prompt, [mixture])[0]
    ent = probe_entropy(engine, ids, mixture, cfg.n_tokens)
    d = Decision(triggered(cfg, loss, ent), loss, ent, list(mixture), list(mixture))
    if not (d.triggered or force):
        return d
    cands: list[tuple[str, Mixture, list[dict[str, Any]] | None]] = []
    if cfg.action in ("widen", "auto"):
        wide = _widened(engine, prompt, route_cfg, cfg)
        if wide is not None:
            cands.append(("widen", wide[0], wide[1]))
    if cfg.action in ("drop", "auto") and mixture:
        cands += [("drop", without(mixture, i), None) for i in range(len(mixture))]
    if cfg.action in ("base", "auto") and mixture:
        cands.append(("base", [], None))
    if not cands:  # e.g. drop/base on the base model already, or widen without a route
        d.chosen = "keep"
        return d
    losses = prompt_losses(engine, prompt, [c[1] for c in cands])
    if cfg.action == "auto":
        cands.append(("keep", list(mixture), None))
        losses.append(loss)
    for (name, _, _), v in zip(cands, losses, strict=True):
        d.candidate_losses[name] = min(v, d.candidate_losses.get(name, math.inf))
    best = min(range(len(cands)), key=lambda i: losses[i])  # first wins ties: widen, drop, base, keep
    d.chosen, d.after, d.after_shown = cands[best]
    return d


# --- the engine hook ----------------------------------------------------------------------------
def _finite(x: float) -> float | None:
    return round(x, 5) if math.isfinite(x) else None


def _shown(engine: Loramix, mixture: Mixture, before: list[dict[str, Any]]) -> list[dict[str, Any]]:
    prev = {a["id"]: a for a in before}
    out = []
    for aid, w in mixture:
        rec = prev.get(aid) or {"name": engine.library.get(aid).name, "id": aid}
        out.append({**rec, "weight": w})
    return out


def _brief(shown: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": a["name"], "id": a["id"], "weight": round(float(a["weight"]), 5)} for a in shown]


def refine_for_ask(engine: Loramix, prompt: str, ids: torch.Tensor, mixture: Mixture,
                   shown: list[dict[str, Any]], route_cfg: RouteConfig | None, cfg: RefineConfig) -> RefineOutcome:
    """Decide, log a ``reroute`` event on every adapter before or after, and say what to generate with."""
    t0 = time.perf_counter()
    d = decide(engine, prompt, ids, mixture, route_cfg, cfg)
    new_shown = shown if d.after == d.before else (d.after_shown or _shown(engine, d.after, shown))
    info: dict[str, Any] = {
        "triggered": d.triggered, "prompt_loss": _finite(d.prompt_loss), "entropy": _finite(d.entropy),
        "max_prompt_loss": cfg.max_prompt_loss, "max_entropy": cfg.max_entropy,
        "action": cfg.action if d.triggered else None, "chosen": d.chosen,
        "candidate_losses": {k: _finite(v) for k, v in d.candidate_losses.items()},
        "before": _brief(shown), "after": _brief(new_shown),
    }
    recorded: set[str] = set()
    if d.triggered:
        ids_hit = list(dict.fromkeys([a for a, _ in d.before] + [a for a, _ in d.after]))
        if ids_hit:
            detail = {k: info[k] for k in ("prompt_loss", "entropy", "action", "chosen")}
            detail |= {"before": [a["name"] for a in info["before"]], "after": [a["name"] for a in info["after"]],
                       "prompt": prompt[:200]}
            engine.library.record_use(ids_hit, event="reroute", detail=detail)
            recorded = set(ids_hit)
    info["ms"] = round((time.perf_counter() - t0) * 1000.0, 1)
    return RefineOutcome(list(d.after), new_shown, info, recorded)


# --- benchmark helper ---------------------------------------------------------------------------
def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def refine_eval(engine: Loramix, prompts: Sequence[str], targets: Sequence[str], route_cfg: RouteConfig,
                cfg: RefineConfig | None = None, force: bool = False) -> dict[str, Any]:
    """Loss of each target given its prompt under the routed mixture and under the refined one.

    ``force`` applies the action to every prompt (what if refine always triggered). Nothing is logged
    to the library. Losses are mean token NLL of the target tokens (float32); means are per prompt.
    """
    from loramix.evaluate.score import score_texts

    if len(prompts) != len(targets):
        raise ValueError(f"got {len(prompts)} prompts but {len(targets)} targets; expected one target per prompt")
    cfg = cfg or RefineConfig(enabled=True)
    routes = engine.router.route_batch(list(prompts), route_cfg)
    rows: list[dict[str, Any]] = []
    befores: list[Mixture] = []
    afters: list[Mixture] = []
    for prompt, r in zip(prompts, routes, strict=True):
        d = decide(engine, prompt, engine.chat_ids(prompt), r.mixture, route_cfg, cfg, force=force)
        befores.append(d.before)
        afters.append(d.after)
        rows.append({"prompt": prompt[:200], "triggered": d.triggered, "chosen": d.chosen,
                     "prompt_loss": d.prompt_loss, "entropy": d.entropy})
    n = len(prompts)
    with engine._lock:
        scores = score_texts(engine.mixer, list(prompts) * 2, befores + afters, targets=list(targets) * 2)
    for i, row in enumerate(rows):
        row["loss_without"], row["loss_with"] = scores[i].loss, scores[n + i].loss
    return {**summarize(rows), "rows": rows}


CHOICES = ("widen", "drop", "base", "keep", "none")  # "none": not triggered, nothing chosen


def count_choices(chosen: Sequence[str | None]) -> dict[str, int]:
    """How often each choice was made; every row is counted once (``None`` as "none")."""
    out = dict.fromkeys(CHOICES, 0)
    for c in chosen:
        key = "none" if c is None else str(c)
        out[key] = out.get(key, 0) + 1
    return out


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The refine summary of per-prompt rows (``triggered``, ``chosen``, ``loss_without``, ``loss_with``)."""
    without_l, with_l = [r["loss_without"] for r in rows], [r["loss_with"] for r in rows]
    return {
        "n": len(rows), "triggered": sum(bool(r["triggered"]) for r in rows),
        "changed": sum(r["chosen"] not in (None, "keep") for r in rows),
        "loss_without": _mean(without_l), "loss_with": _mean(with_l),
        "delta": _mean(with_l) - _mean(without_l),
        "improved": sum(r["loss_with"] < r["loss_without"] - 1e-9 for r in rows),
        "worsened": sum(r["loss_with"] > r["loss_without"] + 1e-9 for r in rows),
        "chosen": count_choices([r["chosen"] for r in rows]),
    }


def apply_thresholds(forced: Sequence[dict[str, Any]], max_prompt_loss: float | None,
                     max_entropy: float | None) -> list[dict[str, Any]]:
    """Rows of a ``force=True`` run as they would be with these thresholds: a row that would not have
    triggered keeps its routed mixture (``loss_with`` = ``loss_without``, chosen None)."""
    cfg = RefineConfig(enabled=True, max_prompt_loss=max_prompt_loss, max_entropy=max_entropy)
    out = []
    for r in forced:
        hit = triggered(cfg, r["prompt_loss"], r["entropy"])
        out.append({**r, "triggered": hit, "chosen": r["chosen"] if hit else None,
                    "loss_with": r["loss_with"] if hit else r["loss_without"]})
    return out


def calibrate(forced: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Thresholds that minimise the mean loss of a ``force=True`` run's rows (a validation split).

    Candidates: each signal's observed values (and "never"), one signal at a time and both together;
    ties go to the rule that triggers least. Returns the thresholds and the summary they give.
    """
    if not forced:
        raise ValueError("calibrate needs at least one row of a force=True refine_eval run")
    pls = sorted({r["prompt_loss"] for r in forced if math.isfinite(r["prompt_loss"])})
    ents = sorted({r["entropy"] for r in forced if math.isfinite(r["entropy"])})
    grid_l: list[float | None] = [None, *pls, min(pls, default=0.0) - 1.0]
    grid_e: list[float | None] = [None, *ents, min(ents, default=0.0) - 1.0]
    best: tuple[float, int, float | None, float | None] | None = None
    for lth in grid_l:
        for eth in grid_e:
            rows = apply_thresholds(forced, lth, eth)
            m = _mean([r["loss_with"] for r in rows])
            key = (m, sum(r["triggered"] for r in rows), lth, eth)
            if best is None or key[:2] < best[:2]:
                best = key
    assert best is not None
    return {"max_prompt_loss": best[2], "max_entropy": best[3],
            **summarize(apply_thresholds(forced, best[2], best[3]))}
