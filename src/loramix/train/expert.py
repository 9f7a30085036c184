"""Train one expert LoRA adapter on a list of texts (PEFT on a private copy of the base model)."""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from loramix.base import load_base
from loramix.config import TrainConfig
from loramix.errors import TrainingError
from loramix.lora import LoraWeights


@dataclass
class TrainReport:
    eval_loss_before: float
    eval_loss_after: float
    steps: int
    train_texts: int
    eval_texts: int
    tokens_seen: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss) when eval_every > 0
    best_step: int | None = None
    stop_reason: str = "steps"  # steps | plateau | time

    def to_dict(self) -> dict:
        return asdict(self)


def _pack(tokenizer, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Concatenate texts (EOS between them) into one stream and cut it into rows: (N, seq_len)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for enc in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(enc)
        stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise TrainingError(f"the training texts hold {len(stream)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)  # (N, seq_len)


def _pair_rows(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int, pad: int) -> tuple[torch.Tensor, ...]:
    """(prompt ids, target ids) pairs -> right-padded (ids, labels, mask), each (N, T); labels are -100
    except on target tokens, so the loss is on the text only (not on the passages or the query)."""
    rows: list[tuple[list[int], int]] = []
    for p, t in pairs:
        target = list(t)[:max_len - 1]
        seq = (list(p) + target)[-max_len:]
        rows.append((seq, len(seq) - len(target)))
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (N, T)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # (N, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (N, T)
    for i, (r, first) in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        labels[i, first:len(r)] = ids[i, first:len(r)]
        mask[i, :len(r)] = 1
    return ids, labels, mask


def _batch(rows: tuple[torch.Tensor, ...], pick: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model kwargs for these rows: packed text (labels = inputs) or padded pairs (ids, labels, mask)."""
    if len(rows) == 1:
        x = rows[0][pick]  # (b, T)
        return {"input_ids": x, "labels": x}
    ids, labels, mask = (r[pick] for r in rows)
    width = int(mask.sum(1).max())  # trim the batch's common padding
    return {"input_ids": ids[:, :width], "labels": labels[:, :width], "attention_mask": mask[:, :width]}


@torch.no_grad()
def _eval_loss(model, rows: tuple[torch.Tensor, ...], batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    n = len(rows[0])
    for i in range(0, n, batch_size):
        pick = torch.arange(i, min(n, i + batch_size))
        total += float(model(**_batch(rows, pick)).loss) * len(pick)
        count += len(pick)
    return total / max(count, 1)


def split_examples(items: Sequence[Any], cfg: TrainConfig) -> tuple[list[Any], list[Any]]:
    """(eval, train): shuffled with ``cfg.seed``, capped at ``cfg.max_examples``, ``cfg.eval_fraction`` (at
    least 2) held out. Refuses fewer than 4 examples."""
    if len(items) < 4:
        raise TrainingError(f"need at least 4 non-empty training texts, got {len(items)}")
    shuffled = list(items)
    random.Random(cfg.seed).shuffle(shuffled)
    shuffled = shuffled[: cfg.max_examples]
    n_eval = max(2, int(len(shuffled) * cfg.eval_fraction))
    return shuffled[:n_eval], shuffled[n_eval:]


def train_expert(base_path: str | None, texts: Sequence[str], cfg: TrainConfig | None = None,
                 progress: bool = True, description: str = "",
                 pairs: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None,
                 pair_max_len: int = 512) -> tuple[LoraWeights, TrainReport]:
    """LoRA-train the base on ``texts``; returns the adapter and eval losses before and after.

    With ``pairs`` (prompt token ids, target token ids), e.g. retrieved passages + query and the text
    that follows, it trains on those instead (``texts`` is ignored), with the loss on target tokens only.
    """
    from loramix.config import offline_env

    offline_env()
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    cfg = cfg or TrainConfig()
    items: list = [p for p in pairs if len(p[1])] if pairs is not None else [t for t in texts if t.strip()]
    eval_texts, train_texts = split_examples(items, cfg)
    torch.manual_seed(cfg.seed)
    bm = load_base(base_path)
    tok, model = bm.tokenizer, bm.model
    train_rows: tuple[torch.Tensor, ...]
    eval_rows: tuple[torch.Tensor, ...]
    if pairs is not None:
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        train_rows = _pair_rows(train_texts, pair_max_len, pad)  # (N, T) x3
        eval_rows = tuple(r[:24] for r in _pair_rows(eval_texts, pair_max_len, pad))
    else:
        train_rows = (_pack(tok, train_texts, cfg.seq_len),)  # (N, T)
        eval_rows = (_pack(tok, eval_texts, cfg.seq_len)[:24],)  # (M, T)
    n_layers = int(model.config.num_hidden_layers)  # type: ignore[union-attr]
    first = int(n_layers * cfg.layers_from)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha,  # type: ignore[arg-type]
                      target_modules=list(cfg.target_modules), lora_dropout=0.0,
                      layers_to_transform=list(range(first, n_layers)), task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pm = get_peft_model(model, lcfg)
    start = time.perf_counter()
    before = _eval_loss(pm, eval_rows, cfg.batch_size)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    losses: list[float] = []
    order = torch.randperm(len(train_rows[0]), generator=torch.Generator().manual_seed(cfg.seed))
    pm.train()
    curve: list[tuple[int, float]] = [(0, before)]
    best_loss, best_step, stale, stop = before, 0, 0, "steps"
    best_state = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]train {task.fields[name]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), disable=not progress,
                  transient=False) as bar:
        task = bar.add_task("train", total=cfg.steps, name=description or "expert", loss="-")
        for step in range(cfg.steps):
            pick = order[(torch.arange(cfg.batch_size) + step * cfg.batch_size) % len(order)]
            loss = pm(**_batch(train_rows, pick)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            recent = f"{sum(losses[-10:]) / len(losses[-10:]):.3f}"
            bar.update(task, advance=1, loss=recent)
            if progress and not bar.console.is_terminal and (step + 1) % 10 == 0:  # logs get plain lines
                bar.console.print(f"train {description or 'expert'}: step {step + 1}/{cfg.steps} loss {recent}")
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                ev = _eval_loss(pm, eval_rows, cfg.batch_size)
                pm.train()
                curve.append((step + 1, ev))
                if ev < best_loss - cfg.min_delta:
                    best_loss, best_step, stale = ev, step + 1, 0
                    best_state = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
                else:
                    stale += 1
                if stale >= cfg.patience:
                    stop = "plateau"
                    break
            if cfg.max_seconds is not None and time.perf_counter() - start > cfg.max_seconds:
                stop = "time"
                break
    if cfg.eval_every and losses and curve[-1][0] != len(losses):  # stopped between evaluations (time):
        ev = _eval_loss(pm, eval_rows, cfg.batch_size)  # the last weights compete too, or a time cap hit before
        curve.append((len(losses), ev))  # the first evaluation would hand back the untrained adapter
        if ev < best_loss - cfg.min_delta:
            best_loss, best_step = ev, len(losses)
            best_state = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    if cfg.eval_every:  # keep the best evaluated weights
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if n in best_state:
                    p.copy_(best_state[n])
    after = _eval_loss(pm, eval_rows, cfg.batch_size)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
    weights = LoraWeights.from_peft_state_dict(state, {"r": cfg.rank, "lora_alpha": cfg.alpha})
    report = TrainReport(eval_loss_before=before, eval_loss_after=after, steps=len(losses), train_texts=len(train_texts),
                         eval_texts=len(eval_texts), tokens_seen=len(losses) * cfg.batch_size * int(train_rows[0].shape[1]),
                         seconds=time.perf_counter() - start, losses=losses, eval_curve=curve,
                         best_step=best_step if cfg.eval_every else None, stop_reason=stop)
    return weights, report
