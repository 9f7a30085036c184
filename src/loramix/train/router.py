"""Train the router from each adapter's contribution to the LM loss (Atlas-style perplexity distillation).

No domain labels are read. For each (query, target) pair the current router (semantic, untrained
keys) proposes ``k`` candidates; the mixer scores the target given the query (mean token NLL, see
:func:`loramix.evaluate.score.score_texts`) under

* ``kl``: each candidate alone; target distribution ``softmax(-loss / tau)``;
* ``loop``: the uniform mix of the other ``k - 1`` candidates (leave one out); target
  ``softmax(loss_without_k / tau)``: an adapter whose removal hurts gets more mass.

A :class:`~loramix.route.trained.RouterHead` is trained with AdamW to minimise ``KL(target || router)``
over the candidates, the LM side frozen. By default (``learn="keys"``) it learns only one key per
adapter (and the temperature): the query side stays the frozen encoder, so a few hundred pairs fit
n x d numbers, not a d x d map. Each key starts at its stored key (from examples or a one-line
description) or at the loss-weighted centroid of the training queries, and an L2 term pulls it back
toward the stored key; start, pull, tau, step and the blend with the stored keys are picked by the
routed loss on held-out pairs. Losses are cached per row in ``meta/router/losses.npz`` keyed by a hash of the
base model, the query, the target and the mixture's adapter blobs (sha256), so retraining only scores
new rows. The supervised baseline (:func:`train_supervised_router`) is a classifier over adapters
trained with Gumbel-softmax on texts labelled with the adapter they belong to.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from loramix.config import RouterTrainConfig
from loramix.errors import TrainingError
from loramix.route.trained import ENCODER_DIR, RouterHead, router_dir, save_head, save_supervised

if TYPE_CHECKING:
    from loramix.app import Loramix

LOSS_CACHE = "losses.npz"
SUPERVISED_GRID = (0.0, 1e-2, 1e-1)  # weight decays tried by the supervised head, picked on held-out texts
Mixture = list[tuple[str, float]]


@dataclass
class RouterReport:
    """What :func:`train_router` did; KL in nats, agreement = router top-1 == target top-1."""

    objective: str
    n_queries: int
    n_train: int
    n_val: int
    k: int
    tau: float
    steps: int
    train_kl: float
    val_kl: float
    val_kl_before: float
    train_agree: float
    val_agree: float
    val_agree_before: float
    val_p_best: float  # mean router probability of the target's best candidate
    val_p_best_before: float
    temperature: float
    rows_scored: int  # mixer rows computed (the rest came from the cache)
    rows_cached: int
    seconds: float
    path: str
    validation: dict[str, Any] = field(default_factory=dict)  # held-out routed losses, mix, verdict

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SupervisedReport:
    n_texts: int
    n_train: int
    n_val: int
    n_adapters: int
    train_acc: float
    val_acc: float
    steps: int
    seconds: float
    path: str
    weight_decay: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- data -------------------------------------------------------------------------------------
def split_texts(texts: Sequence[str], query_fraction: float = 0.4, max_words: int = 128,
                target_words: int | None = None) -> tuple[list[str], list[str]]:
    """Cut plain texts into (query, target): the first ``query_fraction`` of the words (of the first
    ``max_words``) is the query, the rest the target (keeping its leading whitespace), cut to its
    first ``target_words`` words when given (short continuations are cheap to score). Texts of fewer
    than 2 words are skipped."""
    queries, targets = [], []
    for text in texts:
        words = list(re.finditer(r"\S+", text))[:max_words]
        if len(words) < 2:
            continue
        n_q = min(len(words) - 1, max(1, round(len(words) * query_fraction)))
        cut = words[n_q - 1].end()
        last = words[-1] if target_words is None else words[min(len(words), n_q + target_words) - 1]
        queries.append(text[:cut].strip())
        targets.append(text[cut: last.end()])
    return queries, targets


def _jsonl_rows(path: Path) -> list[dict[str, Any]] | None:
    if not (path.is_file() and path.suffix in (".jsonl", ".ndjson")):
        return None
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise TrainingError(f"{path}:{i}: not valid JSON ({e})") from e
    return rows if rows and all(isinstance(r, dict) for r in rows) else None


def load_pairs(spec: str, cfg: RouterTrainConfig | None = None) -> tuple[list[str], list[str]]:
    """(queries, targets) for ``--data``: JSONL with "query"/"target" (or "input"/"output"), else any
    :func:`loramix.train.corpora.load_source` spec cut by :func:`split_texts`."""
    from loramix.train.corpora import load_source

    cfg = cfg or RouterTrainConfig()
    rows = _jsonl_rows(Path(spec).expanduser())
    if rows is not None:
        qs = [r.get("query", r.get("input")) for r in rows]
        ts = [r.get("target", r.get("output")) for r in rows]
        if all(isinstance(x, str) for x in qs + ts):  # a target gets a leading space to follow its query
            return [str(q) for q in qs], [str(t) if str(t)[:1].isspace() else f" {t}" for t in ts]
    return split_texts(load_source(spec), cfg.query_fraction, cfg.max_words, cfg.target_words)


def load_labelled(engine: Loramix, spec: str | None) -> tuple[list[str], list[str]]:
    """(texts, adapter names) for the supervised baseline: JSONL with "text" and "adapter" (or
    "label"), else (``spec`` None) every adapter's stored examples labelled with its name."""
    if spec is None:
        lib = engine.library
        pairs = [(e, rec.name) for rec in lib.list() for e in lib.examples(rec.id) if e.strip()]
        if not pairs:
            raise TrainingError("no adapter has stored examples; pass --data with 'text' and 'adapter' fields")
        return [t for t, _ in pairs], [n for _, n in pairs]
    rows = _jsonl_rows(Path(spec).expanduser())
    if rows is None or not all(isinstance(r.get("text"), str) and isinstance(r.get("adapter", r.get("label")), str)
                               for r in rows):
        raise TrainingError(f"--labels needs a JSONL file whose rows have 'text' and 'adapter' (or 'label'); got {spec!r}")
    return [str(r["text"]) for r in rows], [str(r.get("adapter", r.get("label"))) for r in rows]


# --- losses -----------------------------------------------------------------------------------
def _base_signature(engine: Loramix) -> str:
    path = engine.base_path().resolve()
    st = (path / "config.json").stat()
    return f"{path}:{st.st_mtime_ns}"


class _LossCache:
    """Row hash -> loss, persisted as an npz of two arrays (no pickle)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, float] = {}
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    self.data = dict(zip(z["keys"].tolist(), z["values"].tolist(), strict=True))
            except (OSError, ValueError, KeyError):
                self.data = {}  # unreadable cache: recompute

    def save(self) -> None:
        tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, keys=np.array(list(self.data), dtype="<U32"), values=np.array(list(self.data.values()), np.float32))
        os.replace(tmp, self.path)


def mixture_losses(engine: Loramix, queries: Sequence[str], targets: Sequence[str], mixtures: Sequence[Mixture],
                   max_len: int = 256, cache: bool = True) -> tuple[np.ndarray, int]:
    """Mean token NLL of ``targets[i]`` given ``queries[i]`` under ``mixtures[i]``: ``(R,)`` losses and the
    number of rows actually scored (the others were cached)."""
    lib = engine.library
    blobs: dict[str, str] = {}

    def blob(aid: str) -> str:
        if aid not in blobs:
            blobs[aid] = lib.get(aid).blob
        return blobs[aid]

    base = _base_signature(engine)
    keys = [hashlib.blake2b(json.dumps([base, max_len, q, t, [[blob(a), round(w, 6)] for a, w in m]]).encode(),
                            digest_size=16).hexdigest() for q, t, m in zip(queries, targets, mixtures, strict=True)]
    store = _LossCache(router_dir(lib) / LOSS_CACHE) if cache else None
    known = store.data if store is not None else {}
    todo = [i for i, k in enumerate(keys) if k not in known]
    fresh: dict[str, float] = {}
    if todo:
        from loramix.evaluate.score import score_texts

        with engine._lock:
            mm = engine.mixer
            for chunk in _chunks(todo, mixtures, mm.cfg.capacity):
                scores = score_texts(mm, [queries[i] for i in chunk], [mixtures[i] for i in chunk],
                                     targets=[targets[i] for i in chunk], max_len=max_len)
                fresh.update((keys[i], s.loss) for i, s in zip(chunk, scores, strict=True))
        if store is not None:
            store.data.update(fresh)
            store.save()
    out = np.array([fresh[k] if k in fresh else known[k] for k in keys], dtype=np.float32)  # (R,)
    return out, len(todo)


def _chunks(rows: list[int], mixtures: Sequence[Mixture], capacity: int) -> list[list[int]]:
    """Split rows so that no call to the mixer needs more distinct adapters than it has slots."""
    out: list[list[int]] = []
    cur: list[int] = []
    seen: set[str] = set()
    for i in rows:
        ids = {a for a, _ in mixtures[i]}
        if cur and len(seen | ids) > capacity:
            out.append(cur)
            cur, seen = [], set()
        cur.append(i)
        seen |= ids
    return [*out, cur] if cur else out


def _grid(engine: Loramix, queries: Sequence[str], targets: Sequence[str], candidates: Sequence[Sequence[str]],
          objective: str, max_len: int, cache: bool, score_query: bool = False) -> tuple[np.ndarray, int]:
    k = len(candidates[0]) if len(candidates) else 0
    if score_query:  # the loss covers the query's own tokens too: the whole text, no prompt
        queries, targets = [""] * len(queries), [q + t for q, t in zip(queries, targets, strict=True)]
    if any(len(c) != k for c in candidates):
        raise ValueError("every query needs the same number of candidates")
    qs, ts, mixes = [], [], []
    for q, t, cands in zip(queries, targets, candidates, strict=True):
        for j in range(k):
            if objective == "kl":
                mixes.append([(cands[j], 1.0)])
            else:  # loop: uniform mix of the others
                others = [a for i, a in enumerate(cands) if i != j]
                mixes.append([(a, 1.0 / len(others)) for a in others])
            qs.append(q)
            ts.append(t)
    losses, n = mixture_losses(engine, qs, ts, mixes, max_len=max_len, cache=cache)
    return losses.reshape(len(queries), k), n  # (N, K)


def candidate_losses(engine: Loramix, queries: Sequence[str], targets: Sequence[str],
                     candidates: Sequence[Sequence[str]], max_len: int = 256, cache: bool = True,
                     score_query: bool = False) -> np.ndarray:
    """``(N, K)`` loss of each target given its query with each candidate adapter alone (cached); with
    ``score_query`` the loss of the whole text ``query + target``."""
    return _grid(engine, queries, targets, candidates, "kl", max_len, cache, score_query)[0]


def loo_losses(engine: Loramix, queries: Sequence[str], targets: Sequence[str],
               candidates: Sequence[Sequence[str]], max_len: int = 256, cache: bool = True) -> np.ndarray:
    """``(N, K)`` loss under the uniform mix of the candidates without candidate k (cached)."""
    return _grid(engine, queries, targets, candidates, "loop", max_len, cache)[0]


def target_distribution(losses: np.ndarray, objective: str, tau: float) -> np.ndarray:
    """``softmax(-loss / tau)`` (kl) or ``softmax(loss_without_k / tau)`` (loop), per row: ``(N, K)``."""
    z = (-losses if objective == "kl" else losses) / tau  # (N, K)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


# --- training ---------------------------------------------------------------------------------
def _split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(int(round(n * val_fraction)), n - 1)
    return perm[n_val:], perm[:n_val]


def _progress(enabled: bool, label: str) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), disable=not enabled)


class _QueryEncoder:
    """Query embeddings: precomputed (frozen encoder) or recomputed with grad (fine-tuned copy)."""

    def __init__(self, engine: Loramix, queries: list[str], finetune: bool) -> None:
        enc = engine.router.encoder
        self.queries = queries
        self.frozen = torch.from_numpy(enc.encode(queries))  # (N, d)
        self.model = copy.deepcopy(enc.model) if finetune else None  # never touch the shared encoder

    def __call__(self, idx: np.ndarray, grad: bool) -> torch.Tensor:
        if self.model is None:
            return self.frozen[torch.as_tensor(idx)]  # (B, d)
        self.model.train(grad)
        with torch.set_grad_enabled(grad):
            prep = getattr(self.model, "preprocess", None) or self.model.tokenize  # tokenize: older versions
            feats = prep([self.queries[int(i)] for i in idx])
            emb = self.model(feats)["sentence_embedding"]  # (B, d)
            return F.normalize(emb, dim=-1)


def _routed_loss(logits: torch.Tensor, losses: torch.Tensor) -> float:
    """Mean loss of each row's top-1 candidate under the router's logits (N, K) and candidate losses (N, K)."""
    pick = logits.argmax(dim=1, keepdim=True)  # (N, 1)
    return float(losses.gather(1, pick).mean())


def _val_key(logits: torch.Tensor, losses: torch.Tensor) -> tuple[float, float]:
    """(routed loss, expected loss under softmax(logits)): the held-out criterion, ties broken by confidence."""
    return _routed_loss(logits, losses), float((F.softmax(logits, dim=1) * losses).sum(dim=1).mean())


def train_router(engine: Loramix, queries: Sequence[str], targets: Sequence[str],
                 cfg: RouterTrainConfig | None = None, progress: bool = True) -> RouterReport:
    """Distil the adapters' losses on (query, target) pairs into the router head; saves it with the library.

    A held-out share of the pairs (``val_fraction``) keeps the head from drifting away from the keys:
    the head is evaluated every ``eval_every`` steps by its *routed loss* on them (the loss of the
    candidate it ranks first) and the best state is kept (step 0 is the starting keys); each ``tau``
    (``tau_grid`` when None), each L2 pull toward the stored keys (``key_reg_grid``) and each start
    (stored keys; with ``centroid_init`` also the loss-weighted query centroids) is fitted, the lowest
    held-out routed loss wins (ties: the stronger pull); finally its scores are interpolated with the
    untrained cosines, ``mix`` in ``mix_grid`` picked on the same held-out pairs. The verdict ``beats_keys``
    (held-out routed loss below the keys' by more than ``min_gain``) is stored with the head, and
    :func:`loramix.route.trained.default_strategy` uses the head by default only when it is True.
    """
    cfg = cfg or RouterTrainConfig()
    t0 = time.perf_counter()
    queries, targets = list(queries), list(targets)
    if len(queries) != len(targets):
        raise TrainingError(f"{len(queries)} queries but {len(targets)} targets")
    keep = [i for i, (q, t) in enumerate(zip(queries, targets, strict=True)) if q.strip() and t.strip()]
    if len(keep) > cfg.max_pairs:
        keep = sorted(np.random.default_rng(cfg.seed).choice(keep, cfg.max_pairs, replace=False).tolist())
    queries, targets = [queries[i] for i in keep], [targets[i] for i in keep]
    if len(queries) < 4:
        raise TrainingError(f"need at least 4 non-empty (query, target) pairs, got {len(queries)}")
    router = engine.router
    router.sync()
    if router.index.ntotal < 2:
        raise TrainingError("the router learns to rank adapters: the library needs at least 2 with routing keys")
    qenc = _QueryEncoder(engine, queries, cfg.finetune_encoder)
    k = min(cfg.k, router.index.ntotal)
    hits = router.dense_search(qenc.frozen.numpy(), k, None)
    cands = [[a for a, _ in row] for row in hits]
    if any(len(c) != k for c in cands):
        raise TrainingError(f"every query needs {k} candidates from the keys; some adapters lack a routing key")
    losses, scored = _grid(engine, queries, targets, cands, cfg.objective, cfg.max_len, True, cfg.score_query)  # (N, K)
    # the candidate-alone loss drives the routed-loss check for both objectives
    alone = losses if cfg.objective == "kl" else _grid(engine, queries, targets, cands, "kl", cfg.max_len, True,
                                                       cfg.score_query)[0]
    loss_t = torch.from_numpy(alone)  # (N, K)
    table = sorted({a for row in cands for a in row})
    key_ids, key_mat = engine.library.keys(table)
    keys = dict(zip(key_ids, np.asarray(key_mat, np.float32), strict=True))
    key_t = torch.from_numpy(np.stack([keys[a] for a in table]))  # (n, d)
    row = {a: i for i, a in enumerate(table)}
    cand = torch.tensor([[row[a] for a in c] for c in cands])  # (N, K)
    train_idx, val_idx = _split(len(queries), cfg.val_fraction, cfg.seed)
    if len(val_idx) == 0:
        val_idx = train_idx  # no held-out pairs asked for: the check runs on the training pairs
    tv = torch.as_tensor(val_idx)
    untrained_logits = torch.einsum("bd,bkd->bk", qenc.frozen[tv], key_t[cand[tv]])  # (V, K) cosines
    keys_loss = _routed_loss(untrained_logits, loss_t[tv])
    taus = [cfg.tau] if cfg.tau is not None else (list(cfg.tau_grid) if cfg.objective == "kl" else [cfg.target_tau])
    key0 = F.normalize(key_t, dim=-1)  # (n, d) the stored keys, the regulariser's anchor
    tt = torch.as_tensor(train_idx)

    def centroids(p: torch.Tensor) -> torch.Tensor:
        """Each adapter's loss-weighted mean of the training queries, normalised (stored key if it got no mass)."""
        mass = torch.zeros(len(table), key_t.shape[1]).index_add_(
            0, cand[tt].reshape(-1), (p[tt, :, None] * qenc.frozen[tt][:, None, :]).reshape(-1, key_t.shape[1]))
        got = mass.norm(dim=1, keepdim=True) > 1e-6  # (n, 1)
        return torch.where(got, F.normalize(mass, dim=-1), key0)  # (n, d)

    def fit(tau: float, reg: float, init: str) -> tuple[RouterHead, tuple[float, float], int, dict[str, Any]]:
        p = torch.from_numpy(target_distribution(losses, cfg.objective, tau))  # (N, K)
        torch.manual_seed(cfg.seed)
        head = RouterHead(key_t, cfg.temperature, cfg.learn_temperature)
        if init == "centroid":
            with torch.no_grad():
                head.key_delta.copy_(centroids(p) - key_t)
        if cfg.learn == "keys":
            head.proj.requires_grad_(False)  # the query side stays the encoder's embedding
        groups: list[dict[str, Any]] = [{"params": [w for w in head.parameters() if w.requires_grad], "lr": cfg.lr}]
        if qenc.model is not None:
            groups.append({"params": list(qenc.model.parameters()), "lr": cfg.encoder_lr})
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay if cfg.learn == "head" else 0.0)
        rng = np.random.default_rng(cfg.seed)

        def val_loss() -> tuple[float, float]:
            with torch.no_grad():
                return _val_key(head(qenc(val_idx, grad=False), cand[tv]), loss_t[tv])

        best = (val_loss(), 0, copy.deepcopy(head.state_dict()))
        with _progress(progress, f"train router (tau {tau:g}, reg {reg:g}, {init})") as bar:
            task = bar.add_task("router", total=cfg.steps, loss="-")
            for step in range(1, cfg.steps + 1):
                b = rng.choice(train_idx, size=min(cfg.batch_size, len(train_idx)), replace=False)
                logits = head(qenc(b, grad=True), cand[torch.as_tensor(b)])  # (B, K)
                loss = F.kl_div(F.log_softmax(logits, dim=1), p[torch.as_tensor(b)], reduction="batchmean")
                if reg > 0:  # drift check in the loss: keep the keys near the ones the library stores
                    loss = loss + reg * ((head.effective_keys() - key0) ** 2).sum(dim=1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(task, advance=1, loss=f"{float(loss.detach()):.4f}")
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    v = val_loss()
                    if v < best[0]:
                        best = (v, step, copy.deepcopy(head.state_dict()))
        head.load_state_dict(best[2])
        return head, best[0], best[1], {"p": p}  # type: ignore[return-value]

    inits = ["keys", "centroid"] if cfg.centroid_init else ["keys"]
    fits = [((tau, reg, init), *fit(tau, reg, init)) for tau in taus for reg in cfg.key_reg_grid for init in inits]
    (tau, key_reg, init), head, _, best_step, extra = min(fits, key=lambda f: (f[2], -f[0][1], f[0][0]))
    p = extra["p"]
    with torch.no_grad():
        temp = head.temperature
        trained_val = head(qenc(val_idx, grad=False), cand[tv]) * temp  # (V, K) cosines
    mix_keys = {m: _val_key((m * trained_val + (1 - m) * untrained_logits) / temp, loss_t[tv]) for m in cfg.mix_grid}
    mix = min(mix_keys, key=lambda m: (mix_keys[m], m))  # ties: closer to the keys
    mix_scores = {m: v[0] for m, v in mix_keys.items()}
    routed = mix_scores[mix]
    with torch.no_grad():  # paired per-pair gain of the chosen scores over the keys
        lv = loss_t[tv]
        chosen = (mix * trained_val + (1 - mix) * untrained_logits).argmax(dim=1, keepdim=True)  # (V, 1)
        gain = lv.gather(1, untrained_logits.argmax(dim=1, keepdim=True)) - lv.gather(1, chosen)  # (V, 1)
        g_mean = float(gain.mean())
        g_se = float(gain.std() / len(gain) ** 0.5) if len(gain) > 1 else float("inf")
    beats = bool(mix > 0 and g_mean > cfg.min_gain + 1e-9 and g_mean > cfg.verdict_z * g_se)
    validation = {"n_val": int(len(val_idx)), "routed_loss_keys": keys_loss, "routed_loss_trained": routed,
                  "gain": g_mean, "gain_se": g_se, "z": cfg.verdict_z,
                  "mix": mix, "mix_losses": {str(m): v for m, v in mix_scores.items()}, "tau": tau,
                  "key_reg": key_reg, "init": init, "learn": cfg.learn,
                  "fit_losses": {f"tau={f[0][0]:g},reg={f[0][1]:g},{f[0][2]}": f[2][0] for f in fits},
                  "best_step": best_step, "beats_keys": beats,
                  "min_gain": cfg.min_gain,
                  "rule": "beats_keys: on the held-out pairs the routed loss is lower than the keys' by more than "
                          "min_gain and by more than z standard errors of the paired per-pair gain"}
    validation["rerank"] = rerank_verdict(engine, [queries[i] for i in val_idx], [targets[i] for i in val_idx],
                                          [hits[i] for i in val_idx], cfg)
    best = p.argmax(dim=1)  # (N,)

    def evaluate(idx: np.ndarray) -> tuple[float, float, float]:
        if len(idx) == 0:
            return float("nan"), float("nan"), float("nan")
        with torch.no_grad():
            ix = torch.as_tensor(idx)
            logq = F.log_softmax(head(qenc(idx, grad=False), cand[ix]), dim=1)  # (n, K)
            kl = F.kl_div(logq, p[ix], reduction="batchmean")
            agree = (logq.argmax(dim=1) == best[ix]).float().mean()
            p_best = logq.exp().gather(1, best[ix, None]).mean()
        return float(kl), float(agree), float(p_best)

    train_m, val_m = evaluate(train_idx), evaluate(val_idx)
    with torch.no_grad():
        logq0 = F.log_softmax(untrained_logits / cfg.temperature, dim=1)
        kl0 = float(F.kl_div(logq0, p[tv], reduction="batchmean"))
        agree0 = float((logq0.argmax(dim=1) == best[tv]).float().mean())
        pbest0 = float(logq0.exp().gather(1, best[tv, None]).mean())
    folder = router_dir(engine.library)
    if qenc.model is not None:
        qenc.model.eval()
        qenc.model.save(str(folder / ENCODER_DIR), safe_serialization=True)
    report = RouterReport(
        objective=cfg.objective, n_queries=len(queries), n_train=len(train_idx), n_val=len(val_idx), k=cand.shape[1],
        tau=tau, steps=best_step, train_kl=train_m[0], val_kl=val_m[0], val_kl_before=kl0,
        train_agree=train_m[1], val_agree=val_m[1], val_agree_before=agree0, val_p_best=val_m[2],
        val_p_best_before=pbest0, temperature=float(head.temperature.detach()), rows_scored=scored,
        rows_cached=losses.size - scored, seconds=time.perf_counter() - t0, path="", validation=validation)
    config = {"objective": cfg.objective, "k": k, "tau": tau, "steps": cfg.steps, "best_step": best_step,
              "lr": cfg.lr, "seed": cfg.seed, "mix": mix, "learn": cfg.learn, "key_reg": key_reg, "init": init,
              "validation": validation,
              "encoder": router.encoder.name, "finetuned_encoder": cfg.finetune_encoder,
              "base": engine.base_path().name, "created": time.time(), "report": report.to_dict()}
    report.path = str(save_head(engine.library, head, table, config))
    return report


def rerank_verdict(engine: Loramix, queries: Sequence[str], targets: Sequence[str],
                   hits: Sequence[Sequence[tuple[str, float]]], cfg: RouterTrainConfig) -> dict[str, Any]:
    """Held-out check of the likelihood re-ranking (:mod:`loramix.route.likelihood`) on this library.

    Per held-out pair: the loss of the continuation given the query (never the query's own tokens) under
    the keys' first candidate against the re-ranked first candidate, with the default ``RouteConfig``
    prior and candidate count. ``hurts`` (the mean paired gain below zero by more than ``verdict_z``
    standard errors) makes :func:`loramix.route.trained.default_rerank` turn the re-ranking off.
    """
    from loramix.config import RouteConfig
    from loramix.route.likelihood import rerank

    rc = RouteConfig(k=1)
    n = min(rc.rerank_k, min(len(h) for h in hits)) if hits else 0
    if n < 2 or len(queries) < 2:
        return {"n_val": len(queries), "hurts": False, "beats_keys": False, "note": "too few pairs or candidates"}
    heads = [list(h[:n]) for h in hits]
    cands = [[a for a, _ in h] for h in heads]
    firsts = [r[0][0] for r in rerank(engine.query_nll, queries, heads, rc)]  # the router's own rule
    pick = np.array([c.index(a) for c, a in zip(cands, firsts, strict=True)])  # (V,); the keys' first is 0
    cont = _grid(engine, queries, targets, cands, "kl", cfg.max_len, True, False)[0].astype(np.float64)  # (V, n)
    rows = np.arange(len(pick))
    gain = cont[:, 0] - cont[rows, pick]  # (V,) > 0: the re-ranking's pick predicts the continuation better
    g_mean, g_se = float(gain.mean()), float(gain.std(ddof=1) / len(gain) ** 0.5)
    return {"n_val": len(queries), "k": n, "prior": rc.rerank_prior, "changed": float((pick != 0).mean()),
            "loss_keys": float(cont[:, 0].mean()), "loss_reranked": float(cont[rows, pick].mean()),
            "gain": g_mean, "gain_se": g_se, "z": cfg.verdict_z,
            "beats_keys": bool(g_mean > cfg.verdict_z * g_se), "hurts": bool(g_mean < -cfg.verdict_z * g_se),
            "rule": "hurts: on the held-out pairs the continuation loss under the re-ranked first candidate is "
                    "higher than under the keys' first by more than z standard errors of the paired gain; "
                    "then the CLI and server route without the re-ranking"}


def train_supervised_router(engine: Loramix, texts: Sequence[str], labels: Sequence[str],
                            cfg: RouterTrainConfig | None = None, progress: bool = True) -> SupervisedReport:
    """Linear classifier (encoder dim -> adapters) over the frozen encoder, trained with cross-entropy on
    texts labelled with the adapter (name or id) they belong to; saved as ``supervised.safetensors``.

    It starts as the nearest-key router (weights = keys / temperature, zero bias; adapters without a
    key start at zero), so step 0 is the untrained router. A held-out share (``val_fraction``) picks
    the weight decay in :data:`SUPERVISED_GRID` and the step (early stopping on held-out accuracy,
    then cross-entropy).
    """
    cfg = cfg or RouterTrainConfig()
    t0 = time.perf_counter()
    if len(texts) != len(labels):
        raise TrainingError(f"{len(texts)} texts but {len(labels)} labels")
    lib = engine.library
    ids = [lib.get(name).id for name in labels]  # AdapterNotFound names the unknown label
    classes = sorted(set(ids))
    if len(classes) < 2 or len(texts) < 4:
        raise TrainingError("the supervised router needs at least 4 texts labelled with at least 2 adapters")
    y = torch.tensor([classes.index(a) for a in ids])  # (N,)
    x = torch.from_numpy(engine.router.encoder.encode(list(texts)))  # (N, d)
    train_idx, val_idx = _split(len(texts), cfg.val_fraction, cfg.seed)
    if len(val_idx) == 0:
        val_idx = train_idx
    key_ids, key_mat = lib.keys(classes)
    init = torch.zeros(len(classes), x.shape[1])  # (C, d)
    for a, kv in zip(key_ids, np.asarray(key_mat, np.float32), strict=True):
        init[classes.index(a)] = torch.from_numpy(kv) / cfg.temperature
    xt, yt, xv, yv = x[train_idx], y[train_idx], x[val_idx], y[val_idx]

    def score(lin: torch.nn.Linear) -> tuple[float, float]:
        with torch.no_grad():
            lv = lin(xv)  # (V, C)
            return float((lv.argmax(dim=1) == yv).float().mean()), float(F.cross_entropy(lv, yv))

    best: tuple[float, float, int, float, dict[str, torch.Tensor]] | None = None
    with _progress(progress, "train supervised router") as bar:
        task = bar.add_task("supervised", total=cfg.steps * len(SUPERVISED_GRID), loss="-")
        for wd in SUPERVISED_GRID:
            torch.manual_seed(cfg.seed)
            lin = torch.nn.Linear(x.shape[1], len(classes))
            with torch.no_grad():
                lin.weight.copy_(init)
                lin.bias.zero_()
            opt = torch.optim.AdamW(lin.parameters(), lr=cfg.lr, weight_decay=wd)
            rng = np.random.default_rng(cfg.seed)
            for step in range(cfg.steps + 1):
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    val_acc, ce = score(lin)
                    if best is None or (val_acc, -ce) > (best[0], -best[1]):
                        best = (val_acc, ce, step, wd, {k: v.detach().clone() for k, v in lin.state_dict().items()})
                if step == cfg.steps:
                    break
                b = torch.as_tensor(rng.choice(len(train_idx), size=min(cfg.batch_size, len(train_idx)), replace=False))
                loss = F.cross_entropy(lin(xt[b]), yt[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(task, advance=1, loss=f"{float(loss.detach()):.4f}")
    assert best is not None
    lin = torch.nn.Linear(x.shape[1], len(classes))
    lin.load_state_dict(best[4])

    def acc(idx: np.ndarray) -> float:
        with torch.no_grad():
            ix = torch.as_tensor(idx)
            return float((lin(x[ix]).argmax(dim=1) == y[ix]).float().mean())

    report = SupervisedReport(len(texts), len(train_idx), len(val_idx), len(classes), acc(train_idx), acc(val_idx),
                              best[2], time.perf_counter() - t0, "", weight_decay=best[3])
    config = {"encoder": engine.router.encoder.name, "loss": "cross-entropy", "init": "keys / temperature",
              "steps": best[2], "weight_decay": best[3], "lr": cfg.lr, "created": time.time(),
              "report": report.to_dict()}
    report.path = str(save_supervised(lib, lin, classes, config))
    return report
