"""Train one nano adapter (loramix.nano): only the r x r cores learn, over the base's frozen SVD basis.

Each adapted linear layer becomes ``y = W x + U_r (M (Vh_r x))``; ``M`` starts at zero, so training
starts from the base model exactly, like LoRA's zero-initialised ``B``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from loramix.base import load_base
from loramix.config import TrainConfig
from loramix.errors import TrainingError
from loramix.nano import NanoBasis, NanoWeights, base_fingerprint, compute_basis
from loramix.train.expert import TrainReport, _eval_loss, _pack, split_examples

__all__ = ["NanoLinear", "nano_paths", "train_nano"]


class NanoLinear(nn.Module):
    """A frozen linear layer plus ``U_r M Vh_r`` with a trainable core ``M`` (r, r)."""

    def __init__(self, base_layer: nn.Linear, u: torch.Tensor, vh: torch.Tensor) -> None:
        super().__init__()
        self.base_layer = base_layer
        dtype = base_layer.weight.dtype
        self.u: torch.Tensor
        self.vh: torch.Tensor
        self.register_buffer("u", u.to(dtype), persistent=False)  # (n_out, r)
        self.register_buffer("vh", vh.to(dtype), persistent=False)  # (r, n_in)
        self.core = nn.Parameter(torch.zeros(vh.shape[0], vh.shape[0], dtype=dtype))  # (r, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.vh.T  # (B, T, r)
        return self.base_layer(x) + (h @ self.core.T) @ self.u.T  # (B, T, n_out)


def nano_paths(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """The module paths a nano adapter adapts: ``cfg.target_modules`` in the top ``1 - layers_from`` layers."""
    n_layers = int(model.config.num_hidden_layers)  # type: ignore[union-attr,arg-type]
    first = int(n_layers * cfg.layers_from)
    out = []
    for path, mod in model.named_modules():
        parts = path.split(".")
        if (isinstance(mod, nn.Linear) and parts[-1] in cfg.target_modules and "layers" in parts
                and int(parts[parts.index("layers") + 1]) >= first):
            out.append(path)
    if not out:
        raise TrainingError(f"no linear layer matches target_modules {cfg.target_modules}; expected names like q_proj")
    return sorted(out)


def train_nano(base_path: str | None, texts: Sequence[str], cfg: TrainConfig | None = None,
               basis: NanoBasis | None = None, bases: Any = None, progress: bool = True,
               description: str = "") -> tuple[NanoWeights, TrainReport, NanoBasis]:
    """Train the cores of a nano adapter on ``texts``; returns it, eval losses, and the basis used
    (``basis`` when given, else the one of this base and rank in ``bases`` (a library's BasisStore) when it
    holds it, else computed from the base's weights and stored there)."""
    cfg = cfg or TrainConfig(kind="nano")
    eval_texts, train_texts = split_examples([t for t in texts if t.strip()], cfg)
    torch.manual_seed(cfg.seed)
    bm = load_base(base_path)
    tok, model = bm.tokenizer, bm.model
    if basis is None:
        basis_id = f"{base_fingerprint(model)}-r{cfg.rank}"
        if bases is not None and basis_id in bases.ids():
            basis = bases.get(basis_id)
        else:
            basis = compute_basis(model, cfg.rank)
            if bases is not None:
                bases.put(basis)
    if basis.rank != cfg.rank:
        raise TrainingError(f"the nano basis has rank {basis.rank} but the config asks for rank {cfg.rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    mods = dict(model.named_modules())
    paths = nano_paths(model, cfg)
    missing = [p for p in paths if p not in basis.layers]
    if missing:
        raise TrainingError(f"the nano basis {basis.id} lacks layers {missing[:3]}...; expected a basis of this base")
    layers: dict[str, NanoLinear] = {}
    for path in paths:
        u, vh = basis.layers[path]
        layer = NanoLinear(mods[path], u, vh)  # type: ignore[arg-type]
        parent, _, child = path.rpartition(".")
        setattr(mods[parent], child, layer)
        layers[path] = layer
    train_rows = _pack(tok, train_texts, cfg.seq_len)  # (N, T)
    eval_rows = (_pack(tok, eval_texts, cfg.seq_len)[:24],)  # (M, T)
    start = time.perf_counter()
    before = _eval_loss(model, eval_rows, cfg.batch_size)
    params = [layer.core for layer in layers.values()]
    opt = torch.optim.AdamW(params, lr=cfg.nano_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(cfg.seed))
    losses: list[float] = []
    model.train()
    for step in range(cfg.steps):
        pick = order[(torch.arange(cfg.batch_size) + step * cfg.batch_size) % len(order)]
        x = train_rows[pick]  # (b, T)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress and (step + 1) % 10 == 0:
            print(f"train {description or 'nano'}: step {step + 1}/{cfg.steps} "
                  f"loss {sum(losses[-10:]) / len(losses[-10:]):.3f}", flush=True)
    after = _eval_loss(model, eval_rows, cfg.batch_size)
    weights = NanoWeights(rank=cfg.rank, basis_id=basis.id,
                          cores={p: layer.core.detach().float().clone() for p, layer in layers.items()})
    report = TrainReport(eval_loss_before=before, eval_loss_after=after, steps=cfg.steps, train_texts=len(train_texts),
                         eval_texts=len(eval_texts), tokens_seen=cfg.steps * cfg.batch_size * cfg.seq_len,
                         seconds=time.perf_counter() - start, losses=losses)
    return weights, report, basis
